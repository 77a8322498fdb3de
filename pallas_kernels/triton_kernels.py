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

from pallas_kernels.reference import hadamard_matrix

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
def _quant_kernel(*refs, k_total, bk, qmax, has_smooth, has_had, has_l1, had_block, single_pass, grouped):
    it = iter(refs)
    x_ref = next(it)
    s_ref = next(it) if has_smooth else None
    h_ref = next(it) if has_had else None
    l1_ref = next(it) if has_l1 else None
    q_ref, sc_ref = next(it), next(it)
    xl1_ref = next(it) if has_l1 else None
    nk = k_total // bk
    bm = x_ref.shape[0]

    def load(kk):
        x = x_ref[:, pl.ds(kk * bk, bk)].astype(jnp.float32)
        if has_smooth:
            x = x / s_ref[:, pl.ds(kk * bk, bk)].astype(jnp.float32)
        if has_had:
            h = h_ref[...]  # ±1 (bf16, exact), block-diagonal over the bk chunk
            hi = x.astype(jnp.bfloat16)
            lo = (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)
            x = (jnp.dot(hi, h, preferred_element_type=jnp.float32)
                 + jnp.dot(lo, h, preferred_element_type=jnp.float32)) * (1.0 / float(np.sqrt(had_block)))
        return x

    def sweep1_value(kk, x, amax, acc):
        amax = jnp.maximum(amax, jnp.max(jnp.abs(x), axis=1, keepdims=True))
        if has_l1:
            acc = acc + jnp.dot(x.astype(jnp.bfloat16), l1_ref[pl.ds(kk * bk, bk), :],
                                preferred_element_type=jnp.float32)
        return amax, acc

    def sweep1(kk, carry):
        return sweep1_value(kk, load(kk), *carry)

    r = l1_ref.shape[1] if has_l1 else 1
    if grouped:  # one scale per (row, bk-chunk): a single sweep
        def chunk(kk, acc):
            x = load(kk)
            scale = jnp.maximum(jnp.max(jnp.abs(x), axis=1, keepdims=True) / qmax, _TINY)
            sc_ref[:, pl.ds(kk, 1)] = scale
            q_ref[:, pl.ds(kk * bk, bk)] = jnp.clip(_round_even(x / scale), -qmax - 1, qmax).astype(jnp.int8)
            if has_l1:
                acc = acc + jnp.dot(x.astype(jnp.bfloat16), l1_ref[pl.ds(kk * bk, bk), :],
                                    preferred_element_type=jnp.float32)
            return acc
        acc = jax.lax.fori_loop(0, nk, chunk, jnp.zeros((bm, r), jnp.float32))
        if has_l1:
            xl1_ref[...] = acc.astype(xl1_ref.dtype)
        return
    if single_pass:  # every chunk stays in registers (static unroll): X read once
        amax = jnp.zeros((bm, 1), jnp.float32)
        acc = jnp.zeros((bm, r), jnp.float32)
        chunks = []
        for kk in range(nk):
            x = load(kk)
            chunks.append(x)
            amax, acc = sweep1_value(kk, x, amax, acc)
        scale = jnp.maximum(amax / qmax, _TINY)
        sc_ref[...] = scale
        if has_l1:
            xl1_ref[...] = acc.astype(xl1_ref.dtype)
        for kk, x in enumerate(chunks):
            q = jnp.clip(_round_even(x / scale), -qmax - 1, qmax)
            q_ref[:, pl.ds(kk * bk, bk)] = q.astype(jnp.int8)
        return

    amax0 = jnp.zeros((bm, 1), jnp.float32)
    acc0 = jnp.zeros((bm, r), jnp.float32)
    amax, acc = jax.lax.fori_loop(0, nk, sweep1, (amax0, acc0))
    scale = jnp.maximum(amax / qmax, _TINY)
    sc_ref[...] = scale
    if has_l1:
        xl1_ref[...] = acc.astype(xl1_ref.dtype)

    def sweep2(kk, c):
        x = load(kk)
        q = jnp.clip(_round_even(x / scale), -qmax - 1, qmax)
        q_ref[:, pl.ds(kk * bk, bk)] = q.astype(jnp.int8)
        return c

    jax.lax.fori_loop(0, nk, sweep2, 0)


def quantize_act(x: jax.Array, *, bits: int = 8, smooth: Optional[jax.Array] = None,
                 had_block: int = 0, l1: Optional[jax.Array] = None, group_size: int = 0,
                 block_m: int = 16, num_warps: int = 4, num_stages: int = 1, single_pass: bool = False,
                 interpret: bool = False):
    """Fused dynamic per-token activation quantization (see module docstring).

    Args:
      x: ``[M, K]`` bf16/f32, ``M % block_m == 0``.  smooth: ``[K]``.  had_block: 0 or a
        power of two ≥ 16 dividing K.  l1: ``[K, r]`` (r ≥ 16), any float dtype.
      group_size: 0 = one scale per token; G (a power of two ≥ 16 dividing K, and equal
        to ``had_block`` if both are set) = one scale per token and G channels, in one sweep.
      single_pass: keep the row block's chunks in registers (one read of X; for
        ``block_m · K`` up to ~16K elements per 4 warps) instead of two sweeps over K.
    Returns: codes int8 ``[M, K]``, scale f32 ``[M, 1]`` (``[M, K/G]``), ``x' L1`` bf16
    ``[M, r]`` (or None).
    """
    m, k = x.shape
    qmax = 2 ** (bits - 1) - 1
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
    kern = functools.partial(_quant_kernel, k_total=k, bk=bk, qmax=qmax, has_smooth=smooth is not None,
                             has_had=bool(had_block), has_l1=l1 is not None, had_block=had_block,
                             single_pass=single_pass, grouped=bool(group_size))
    outs = pl.pallas_call(kern, grid=(m // block_m,), in_specs=specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret,
                          compiler_params=None if interpret else _params(num_warps, num_stages),
                          name="jaxdq_quantize_act")(*args)
    return outs[0], outs[1], (outs[2] if l1 is not None else None)


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


def _gemm_kernel(*refs, k_total, bk, packed, kmajor, grouped, has_bias, has_lr, has_gate, has_res):
    it = iter(refs)
    x_ref, w_ref, sx_ref, sw_ref = next(it), next(it), next(it), next(it)
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
             packed: bool = False, w_kmajor: bool = False, out_dtype=jnp.bfloat16, block_m: int = 128,
             block_n: int = 128, block_k: Optional[int] = None, num_warps: int = 8, num_stages: int = 3,
             interpret: bool = False):
    """Integer GEMM with fused epilogue; semantics of :func:`pallas_kernels.reference.int_gemm`.

    ``w_kmajor``: ``wq`` is stored ``[N, K]`` (packed ``[N, K/2]``, pairs along K), the
    layout of ``QLinear(w_layout="nk")``; else ``[K, N]`` (packed ``[K, N/2]``).
    ``sx`` ``[M, 1]`` per token or ``[M, K/G]`` per (token, group); ``sw`` ``[1, N]`` or ``[K/G, N]``.
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
                             grouped=grouped, has_bias=bias is not None, has_lr=xa is not None,
                             has_gate=gate is not None, has_res=residual is not None)
    return pl.pallas_call(
        kern, grid=(m // block_m, n // block_n), in_specs=specs,
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), interpret=interpret,
        compiler_params=None if interpret else _params(num_warps, num_stages),
        name="jaxdq_int_gemm")(*args)
