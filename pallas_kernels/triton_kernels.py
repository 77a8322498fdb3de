"""Pallas-Triton kernels (any CUDA GPU; also run with ``interpret=True`` on CPU).

* :func:`quantize_act`: bf16/f32 ``X [M, K]`` → int8 codes, per-token scales and
  ``X' L1`` in one kernel (``X' = H(X / smooth)``).  Two sweeps over K per row block:
  the first finds the row absmax and accumulates ``X' L1``, the second re-reads the
  (L2-resident) rows and writes the codes.  The block-Hadamard is a tensor-core
  product with the ±1 matrix on a bf16 hi/lo split of ``X'`` (≈16-bit mantissa).
* :func:`int_gemm`: int8 × int8 → int32 ``tt.dot`` (on sm_90 Triton emits wgmma s8
  when the operand layouts allow, else mma.sync s8), fused epilogue (scales, bias,
  low-rank ``XA @ L2`` as a bf16 dot into the same tile, gate, residual).  Packed
  int4 weights are unpacked to int8 in registers before the int8 dot (W4A8); per
  group weight scales are applied per K-tile (tile_k = group size).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

try:  # jax >= 0.7
    from jax.experimental.pallas import triton as plt
    _CompilerParams = plt.CompilerParams
except Exception:  # pragma: no cover
    plt = None
    _CompilerParams = None

from pallas_kernels.reference import hadamard_matrix, weight_colsum

_TINY = 1e-8


def _round_even(v):
    """``jnp.round`` (half to even) from floor (Pallas-Triton has no lowering for lax.round)."""
    f = jnp.floor(v)
    d = v - f
    odd = (f - 2.0 * jnp.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return jnp.where(up, f + 1.0, f)


def _params(num_warps, num_stages):
    if _CompilerParams is None:
        return None
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _pow2_divisor(k: int, cap: int) -> int:
    b = k & -k
    return min(b, cap)


# --------------------------------------------------------------------------- quantize
def _quant_kernel(*refs, k_total, bk, qmax, has_smooth, has_had, has_l1, had_block, single_pass, grouped,
                  symmetric, exact_divide):
    it = iter(refs)
    x_ref = next(it)
    s_ref = next(it) if has_smooth else None
    h_ref = next(it) if has_had else None
    l1_ref = next(it) if has_l1 else None
    q_ref, sc_ref = next(it), next(it)
    xl1_ref = next(it) if has_l1 else None
    zp_ref = None if symmetric else next(it)
    nk = k_total // bk
    bm = x_ref.shape[0]
    half = (qmax + 1) // 2  # asymmetric: codes in [0, qmax] stored shifted by -half as int8

    def divide(x, d):  # d [1, bk] or [bm, 1]: inexact mode multiplies by one reciprocal per d element
        return x / d if exact_divide else x * (1.0 / d)

    def load(kk):
        x = x_ref[:, pl.ds(kk * bk, bk)].astype(jnp.float32)
        if has_smooth:
            x = divide(x, s_ref[:, pl.ds(kk * bk, bk)].astype(jnp.float32))
        if has_had:
            h = h_ref[...]  # ±1 (bf16, exact), block-diagonal over the bk chunk
            hi = x.astype(jnp.bfloat16)
            lo = (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)
            x = (jnp.dot(hi, h, preferred_element_type=jnp.float32)
                 + jnp.dot(lo, h, preferred_element_type=jnp.float32)) * (1.0 / float(np.sqrt(had_block)))
        return x

    # row statistics: (absmax,) symmetric, (min, max) asymmetric
    def stats0():
        z = jnp.zeros((bm, 1), jnp.float32)
        return (z,) if symmetric else (z, z)  # zeros: the asymmetric range always includes 0

    def stats_update(st, x):
        if symmetric:
            return (jnp.maximum(st[0], jnp.max(jnp.abs(x), axis=1, keepdims=True)),)
        return (jnp.minimum(st[0], jnp.min(x, axis=1, keepdims=True)),
                jnp.maximum(st[1], jnp.max(x, axis=1, keepdims=True)))

    def qparams(st):
        """(scale, zero | None) as jaxdq.quant.quantizer computes them."""
        if symmetric:
            return jnp.maximum(st[0] / qmax, _TINY), None
        scale = jnp.maximum((st[1] - st[0]) / qmax, _TINY)
        return scale, jnp.clip(_round_even(-st[0] / scale), 0.0, float(qmax))

    def encode(x, scale, zero):
        if symmetric:
            return jnp.clip(_round_even(divide(x, scale)), -qmax - 1, qmax).astype(jnp.int8)
        return (jnp.clip(_round_even(divide(x, scale)) + zero, 0.0, float(qmax)) - half).astype(jnp.int8)

    def down_proj(kk, x, acc):
        if has_l1:
            acc = acc + jnp.dot(x.astype(jnp.bfloat16), l1_ref[pl.ds(kk * bk, bk), :],
                                preferred_element_type=jnp.float32)
        return acc

    def store_params(scale, zero):
        sc_ref[...] = scale
        if zp_ref is not None:
            zp_ref[...] = zero - half

    r = l1_ref.shape[1] if has_l1 else 1
    if grouped:  # one scale per (row, bk-chunk): a single sweep
        def chunk(kk, acc):
            x = load(kk)
            scale = jnp.maximum(jnp.max(jnp.abs(x), axis=1, keepdims=True) / qmax, _TINY)
            sc_ref[:, pl.ds(kk, 1)] = scale
            q_ref[:, pl.ds(kk * bk, bk)] = encode(x, scale, None)
            return down_proj(kk, x, acc)
        acc = jax.lax.fori_loop(0, nk, chunk, jnp.zeros((bm, r), jnp.float32))
        if has_l1:
            xl1_ref[...] = acc.astype(xl1_ref.dtype)
        return
    if single_pass:  # every chunk stays in registers (static unroll): X read once
        st, acc = stats0(), jnp.zeros((bm, r), jnp.float32)
        chunks = []
        for kk in range(nk):
            x = load(kk)
            chunks.append(x)
            st, acc = stats_update(st, x), down_proj(kk, x, acc)
        scale, zero = qparams(st)
        store_params(scale, zero)
        if has_l1:
            xl1_ref[...] = acc.astype(xl1_ref.dtype)
        for kk, x in enumerate(chunks):
            q_ref[:, pl.ds(kk * bk, bk)] = encode(x, scale, zero)
        return

    def sweep1(kk, carry):
        st, acc = carry
        x = load(kk)
        return stats_update(st, x), down_proj(kk, x, acc)

    st, acc = jax.lax.fori_loop(0, nk, sweep1, (stats0(), jnp.zeros((bm, r), jnp.float32)))
    scale, zero = qparams(st)
    store_params(scale, zero)
    if has_l1:
        xl1_ref[...] = acc.astype(xl1_ref.dtype)

    def sweep2(kk, c):
        q_ref[:, pl.ds(kk * bk, bk)] = encode(load(kk), scale, zero)
        return c

    jax.lax.fori_loop(0, nk, sweep2, 0)


def quantize_config(m: int, k: int, *, dot: bool, smooth: bool, grouped: bool) -> dict:
    """Launch parameters of :func:`quantize_act` for ``X [m, k]`` (H100 measurements).

    ``dot``: the kernel has a tensor-core product (the down-projection ``X' L1`` or the
    block-Hadamard), whose operand needs ≥ 16 rows per program; ``smooth``: the divide by
    the smoothing vector; ``grouped``: one scale per (token, group).  Chosen from
    bench/results/kernels_h100_run3.json (CUPTI), e.g. per-token without smoothing, 512×1152:
    one pass of 4 rows 2.5 µs vs 7.5 µs for two sweeps of 16; 8192×1152: 13.2 µs = 74% of
    HBM bandwidth; smoothing + rank-32 down-projection, 8192×1152: two sweeps of 64 rows
    43.9 µs vs 70.6 µs at the old 16-row default.  Returns keyword arguments for
    :func:`quantize_act` (``block_m`` divides any ``m`` that is a multiple of 32).
    """
    if grouped:
        return dict(block_m=32, num_warps=4, num_stages=3)
    if dot:
        if k > 2048:
            return dict(block_m=16, num_warps=4, num_stages=1)
        if m <= 1024:
            return dict(block_m=16, num_warps=8, single_pass=True)
        return dict(block_m=64, num_warps=8, num_stages=3)
    if smooth:
        if k <= 2048:
            return dict(block_m=4, num_warps=8, single_pass=True)
        return dict(block_m=4, num_warps=4, num_stages=3)
    if k <= 4608:
        return dict(block_m=4, num_warps=4, single_pass=True)
    return dict(block_m=8, num_warps=4, num_stages=3)


def quantize_act(x: jax.Array, *, bits: int = 8, smooth: Optional[jax.Array] = None,
                 had_block: int = 0, l1: Optional[jax.Array] = None, group_size: int = 0,
                 block_m: int = 16, num_warps: int = 4, num_stages: int = 1, single_pass: bool = False,
                 symmetric: bool = True, exact_divide: bool = True, interpret: bool = False):
    """Fused dynamic per-token activation quantization (see module docstring).

    Args:
      x: ``[M, K]`` bf16/f32, ``M % block_m == 0``.  smooth: ``[K]``.  had_block: 0 or a
        power of two ≥ 16 dividing K.  l1: ``[K, r]`` (r ≥ 16), any float dtype.
      group_size: 0 = one scale per token; G (a power of two ≥ 16 dividing K, and equal
        to ``had_block`` if both are set) = one scale per token and G channels, in one sweep.
      single_pass: keep the row block's chunks in registers (one read of X; for
        ``block_m · K`` up to ~16K elements per 4 warps) instead of two sweeps over K.
      symmetric: False = asymmetric per-token codes, shifted to int8, and a fourth output,
        the shifted zero point f32 ``[M, 1]`` (semantics: :func:`pallas_kernels.reference.quantize_act`).
      exact_divide: True = IEEE division by the smoothing vector and the scale, codes equal to the
        reference's; False = multiply by reciprocals (≤ 1 ulp off before rounding: a code can
        move by one at a .5 tie).
    Returns: codes int8 ``[M, K]``, scale f32 ``[M, 1]`` (``[M, K/G]``), ``x' L1`` bf16
    ``[M, r]`` (or None)[, zero f32 ``[M, 1]`` when asymmetric].
    """
    m, k = x.shape
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1
    if not symmetric and group_size:
        raise ValueError("asymmetric activation codes are per token (group_size must be 0)")
    if group_size and had_block and group_size != had_block:
        raise ValueError(f"per-group activation scales need had_block == group_size, got {had_block}, {group_size}")
    bk = group_size or had_block or _pow2_divisor(k, 512)
    assert m % block_m == 0 and k % bk == 0
    args, specs = [x], [pl.BlockSpec((block_m, k), lambda i: (i, 0))]
    if smooth is not None:
        args.append(smooth.reshape(1, k))
        specs.append(pl.BlockSpec((1, k), lambda i: (0, 0)))
    if had_block:
        args.append(jnp.asarray(hadamard_matrix(had_block) * np.sqrt(had_block), jnp.bfloat16))
        specs.append(pl.BlockSpec((had_block, had_block), lambda i: (0, 0)))
    ns = k // group_size if group_size else 1
    out_shape = [jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m, ns), jnp.float32)]
    out_specs = [pl.BlockSpec((block_m, k), lambda i: (i, 0)), pl.BlockSpec((block_m, ns), lambda i: (i, 0))]
    if l1 is not None:
        r = l1.shape[1]
        args.append(l1.astype(jnp.bfloat16))
        specs.append(pl.BlockSpec((k, r), lambda i: (0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((m, r), jnp.bfloat16))
        out_specs.append(pl.BlockSpec((block_m, r), lambda i: (i, 0)))
    if not symmetric:
        out_shape.append(jax.ShapeDtypeStruct((m, 1), jnp.float32))
        out_specs.append(pl.BlockSpec((block_m, 1), lambda i: (i, 0)))
    kern = functools.partial(_quant_kernel, k_total=k, bk=bk, qmax=qmax, has_smooth=smooth is not None,
                             has_had=bool(had_block), has_l1=l1 is not None, had_block=had_block,
                             single_pass=single_pass, grouped=bool(group_size), symmetric=symmetric,
                             exact_divide=exact_divide)
    outs = pl.pallas_call(kern, grid=(m // block_m,), in_specs=specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret,
                          compiler_params=None if interpret else _params(num_warps, num_stages),
                          name="jaxdq_quantize_act")(*args)
    xl1 = outs[2] if l1 is not None else None
    return (outs[0], outs[1], xl1) if symmetric else (outs[0], outs[1], xl1, outs[-1])


# --------------------------------------------------------------------------- int GEMM
def _unpack(p):
    """uint8 ``[bk, bn/2]`` → int8 ``[bk, bn]`` (low nibble first, sign-extended)."""
    p = p.astype(jnp.int32)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    lo = jnp.where(lo > 7, lo - 16, lo)
    hi = jnp.where(hi > 7, hi - 16, hi)
    w = jnp.stack([lo, hi], axis=-1).reshape(p.shape[0], 2 * p.shape[1])
    return w.astype(jnp.int8)


def _gemm_kernel(*refs, k_total, bk, packed, kmajor, grouped, has_zero, has_bias, has_lr, has_gate, has_res):
    it = iter(refs)
    x_ref, w_ref, sx_ref, sw_ref = next(it), next(it), next(it), next(it)
    zx_ref, ws_ref = (next(it), next(it)) if has_zero else (None, None)
    b_ref = next(it) if has_bias else None
    xa_ref, l2_ref = (next(it), next(it)) if has_lr else (None, None)
    g_ref = next(it) if has_gate else None
    r_ref = next(it) if has_res else None
    o_ref = next(it)
    bm, bn = o_ref.shape
    nk = k_total // bk
    wk_cols = bk // 2 if packed else bk
    act_grouped = sx_ref.shape[1] > 1

    def body(kk, acc):
        xk = x_ref[:, pl.ds(kk * bk, bk)]
        if kmajor:  # w [bn, K] (packed: pairs along K)
            wk = w_ref[:, pl.ds(kk * wk_cols, wk_cols)]
            if packed:
                wk = _unpack(wk)
            part = jax.lax.dot_general(xk, wk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        else:  # w [K, bn] (packed: pairs along N)
            wk = w_ref[pl.ds(kk * bk, bk), :]
            if packed:
                wk = _unpack(wk)
            part = jnp.dot(xk, wk, preferred_element_type=jnp.int32)
        if grouped:
            part = part.astype(jnp.float32)
            part = part * (sw_ref[pl.ds(kk, 1), :] if sw_ref.shape[0] > 1 else sw_ref[...])
            return acc + (part * sx_ref[:, pl.ds(kk, 1)] if act_grouped else part)
        return acc + part

    acc0 = jnp.zeros((bm, bn), jnp.float32 if grouped else jnp.int32)
    acc = jax.lax.fori_loop(0, nk, body, acc0)
    y = acc.astype(jnp.float32)
    if has_zero:  # asymmetric activations: Σ (q - z) w = Σ q w - z · colsum(w)
        y = y - zx_ref[...] * ws_ref[...]
    if not grouped:
        y = y * sw_ref[...]
    if not act_grouped:
        y = y * sx_ref[...]
    if has_bias:
        y = y + b_ref[...].astype(jnp.float32)
    if has_lr:
        y = y + jnp.dot(xa_ref[...], l2_ref[...], preferred_element_type=jnp.float32)
    if has_gate:
        y = y * g_ref[...].astype(jnp.float32)
    if has_res:
        y = y + r_ref[...].astype(jnp.float32)
    o_ref[...] = y.astype(o_ref.dtype)


def int_gemm(xq, wq, sx, sw, *, bias=None, xa=None, l2=None, residual=None, gate=None,
             x_zero=None, w_colsum=None,
             packed: bool = False, w_kmajor: bool = False, out_dtype=jnp.bfloat16, block_m: int = 128,
             block_n: int = 128, block_k: Optional[int] = None, num_warps: int = 8, num_stages: int = 3,
             interpret: bool = False):
    """Integer GEMM with fused epilogue; semantics of :func:`pallas_kernels.reference.int_gemm`.

    ``w_kmajor``: ``wq`` is stored ``[N, K]`` (packed ``[N, K/2]``, pairs along K), the
    layout of ``QLinear(w_layout="nk")``; else ``[K, N]`` (packed ``[K, N/2]``).
    ``sx`` ``[M, 1]`` per token or ``[M, K/G]`` per (token, group); ``sw`` ``[1, N]`` or ``[K/G, N]``.
    ``x_zero`` f32 ``[M, 1]``: asymmetric activation zero points (per-token scales only);
    ``w_colsum`` f32 ``[1, N]`` the weight codes' column sums over K (computed here when None).
    Requirements: ``M % block_m == 0``, ``N % block_n == 0``; group scales make ``block_k``
    the group size; the gate's tokens per sample ``M / B`` divisible by block_m.
    """
    m, k = xq.shape
    if w_kmajor:
        n = wq.shape[0]
    else:
        n = wq.shape[1] * (2 if packed else 1)
    groups = max(sw.shape[0], sx.shape[1])
    grouped = groups > 1
    bk = (k // groups) if grouped else (block_k or _pow2_divisor(k, 128))
    block_m, block_n = min(block_m, m), min(block_n, n)
    assert m % block_m == 0 and n % block_n == 0 and k % bk == 0, (m, n, k, block_m, block_n, bk)
    args = [xq, wq, sx.astype(jnp.float32), sw.astype(jnp.float32)]
    if w_kmajor:
        w_spec = pl.BlockSpec((block_n, wq.shape[1]), lambda i, j: (j, 0))
    else:
        w_spec = pl.BlockSpec((k, block_n // 2 if packed else block_n), lambda i, j: (0, j))
    specs = [pl.BlockSpec((block_m, k), lambda i, j: (i, 0)), w_spec,
             pl.BlockSpec((block_m, sx.shape[1]), lambda i, j: (i, 0)),
             pl.BlockSpec((sw.shape[0], block_n), lambda i, j: (0, j))]
    if x_zero is not None:
        if grouped:
            raise ValueError("activation zero points need per-token scales (one scale group)")
        if w_colsum is None:
            w_colsum = weight_colsum(wq, packed=packed, kmajor=w_kmajor)
        args += [x_zero.reshape(m, 1).astype(jnp.float32), w_colsum.reshape(1, n).astype(jnp.float32)]
        specs += [pl.BlockSpec((block_m, 1), lambda i, j: (i, 0)), pl.BlockSpec((1, block_n), lambda i, j: (0, j))]
    if bias is not None:
        args.append(bias.reshape(1, n))
        specs.append(pl.BlockSpec((1, block_n), lambda i, j: (0, j)))
    if xa is not None:
        r = xa.shape[1]
        args += [xa.astype(jnp.bfloat16), l2.astype(jnp.bfloat16)]
        specs += [pl.BlockSpec((block_m, r), lambda i, j: (i, 0)),
                  pl.BlockSpec((r, block_n), lambda i, j: (0, j))]
    if gate is not None:
        per = m // gate.shape[0]
        assert per % block_m == 0, "tokens per gate row must be a multiple of block_m"
        args.append(gate)
        specs.append(pl.BlockSpec((1, block_n), lambda i, j: (i * block_m // per, j)))
    if residual is not None:
        args.append(residual)
        specs.append(pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)))
    kern = functools.partial(_gemm_kernel, k_total=k, bk=bk, packed=packed, kmajor=w_kmajor,
                             grouped=grouped, has_zero=x_zero is not None, has_bias=bias is not None, has_lr=xa is not None,
                             has_gate=gate is not None, has_res=residual is not None)
    return pl.pallas_call(
        kern, grid=(m // block_m, n // block_n), in_specs=specs,
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), interpret=interpret,
        compiler_params=None if interpret else _params(num_warps, num_stages),
        name="jaxdq_int_gemm")(*args)
