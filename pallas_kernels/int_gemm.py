"""Integer GEMM with a fused epilogue (Pallas-Triton; any CUDA GPU, ``interpret=True`` on CPU).

* :func:`int_gemm`: int8 × int8 → int32 ``tt.dot`` (on sm_90 Triton emits wgmma s8
  when the operand layouts allow, i.e. a K-major weight, ``w_kmajor=True``; else
  mma.sync s8), fused epilogue (scales, zero-point correction, bias, low-rank
  ``XA @ L2`` as a bf16 dot into the same tile, gate, residual).  Packed int4 weights are
  unpacked to int8 in registers before the int8 dot (W4A8 / W4A4); per-group scales are
  applied per K-tile (tile_k = group size).
* :class:`GemmConfig`: its tile sizes and launch parameters (frozen, hashable).
* :func:`int_gemm_reference`: the pure-jnp semantics (also the reference of the Hopper
  kernel, :func:`pallas_kernels.int_gemm_hopper.int8_gemm_ws`);
  :func:`unpack_int4_reference` (the int4 packing), :func:`weight_colsum`.

Notation: ``X [M, K]`` activations, ``W [K, N]`` weights, ``Y = X W``.  Integer codes are
int8 (4-bit codes carried in int8, or packed two per byte in uint8); scales are float32.
The kernel matches the reference to bf16 rounding (the integer part is exact).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import pow2_divisor, tiled_gemm_call, unpack_int4_reference, weight_colsum

__all__ = ["GemmConfig", "int_gemm", "int_gemm_reference", "unpack_int4_reference", "weight_colsum"]


# --------------------------------------------------------------------------- reference
def int_gemm_reference(xq: jax.Array, wq: jax.Array, sx: jax.Array, sw: jax.Array, *,
                       bias: Optional[jax.Array] = None, xa: Optional[jax.Array] = None,
                       l2: Optional[jax.Array] = None, residual: Optional[jax.Array] = None,
                       gate: Optional[jax.Array] = None, x_zero: Optional[jax.Array] = None,
                       w_colsum: Optional[jax.Array] = None, packed: bool = False, w_kmajor: bool = False,
                       activation: Optional[str] = None, out_dtype=jnp.bfloat16) -> jax.Array:
    """Integer GEMM with fused epilogue: the reference (float32 math).

    ``y = Σ_g (xq[:, g] @ W[g]) · sx · sw[g] + bias + xa @ l2``, then
    ``out = residual + gate · act(y)`` (each term optional; ``activation`` "gelu_tanh":
    ``jax.nn.gelu(y, approximate=True)`` in float32).  With asymmetric activations
    (``x_zero``, per token, one scale group): ``y = (xq @ W - x_zero ⊗ colsum(W)) · sx · sw + ...``
    = ``((xq - x_zero) @ W) · sx · sw + ...``, the zero-point correction.

    Args:
      xq: int8 ``[M, K]`` activation codes.  wq: int8 ``[K, N]`` codes, or uint8
        ``[K, N/2]`` when ``packed`` (int4, see :func:`unpack_int4_reference`); with
        ``w_kmajor`` the same stored ``[N, K]`` (packed ``[N, K/2]``, pairs along K).
      sx: float32 ``[M, 1]`` per-token scale, or ``[M, K/G]`` per (token, group).
        sw: float32 ``[1, N]`` per channel or ``[K/G, N]`` per group of G input channels.
      bias: ``[N]``.  xa: ``[M, r]`` (``x' L1``), l2: ``[r, N]`` low-rank up-projection.
      residual: ``[M, N]``.  gate: ``[B, N]`` with ``M % B == 0``: row m uses
        ``gate[m // (M / B)]`` (DiT's per-sample gate over its tokens).
      x_zero: float32 ``[M, 1]`` activation zero points (see
        :func:`pallas_kernels.quantize_act.quantize_act_reference`).  w_colsum: ignored
        (the kernels take it precomputed; the reference computes ``colsum(W)`` itself).
    Returns: ``out_dtype [M, N]``.
    """
    del w_colsum
    w = unpack_int4_reference(wq) if packed else wq
    if w_kmajor:
        w = w.T
    m, k = xq.shape
    n = w.shape[1]
    sx = sx.astype(jnp.float32)
    sw = sw.astype(jnp.float32)
    groups = max(sw.shape[0], sx.shape[1])
    g = k // groups
    if x_zero is not None and groups > 1:
        raise ValueError("activation zero points need one scale group (per-token activations)")
    if groups == 1:
        acc = jax.lax.dot_general(xq, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        y = acc.astype(jnp.float32)
        if x_zero is not None:
            y = y - x_zero.astype(jnp.float32) * weight_colsum(w)
        y = y * sw * sx
    else:  # exact int32 partial product per group, then its scales (memory O(M N))
        swg = jnp.broadcast_to(sw, (groups, n))
        sxg = jnp.broadcast_to(sx, (m, groups))

        def body(i, y):
            xg = jax.lax.dynamic_slice_in_dim(xq, i * g, g, axis=1)
            wg = jax.lax.dynamic_slice_in_dim(w, i * g, g, axis=0)
            part = jax.lax.dot_general(xg, wg, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
            sxi = jax.lax.dynamic_slice_in_dim(sxg, i, 1, axis=1)
            return y + part.astype(jnp.float32) * swg[i] * sxi
        y = jax.lax.fori_loop(0, groups, body, jnp.zeros((m, n), jnp.float32))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    if xa is not None:
        y = y + jnp.dot(xa.astype(jnp.float32), l2.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    if activation == "gelu_tanh":
        y = jax.nn.gelu(y, approximate=True)
    elif activation is not None:
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    if gate is not None:
        reps = m // gate.shape[0]
        y = y * jnp.repeat(gate.astype(jnp.float32), reps, axis=0)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return y.astype(out_dtype)


# --------------------------------------------------------------------------- tuning config
@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiles and launch parameters of :func:`int_gemm` (frozen: a static jit argument).

    block_m, block_n: output tile (each clipped to M, N; ``M % block_m == 0``,
    ``N % block_n == 0``).  block_k: K chunk (None = the largest power of two dividing K,
    at most 128; group scales make it the group size).  num_warps, num_stages: Triton's.
    interpret: run in Pallas' interpreter (CPU).
    """

    block_m: int = 128
    block_n: int = 128
    block_k: Optional[int] = None
    num_warps: int = 8
    num_stages: int = 3
    interpret: bool = False


# --------------------------------------------------------------------------- kernel
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


@functools.partial(jax.jit, static_argnames=("packed", "w_kmajor", "out_dtype", "config"))
def int_gemm(xq, wq, sx, sw, *, bias=None, xa=None, l2=None, residual=None, gate=None,
             x_zero=None, w_colsum=None, packed: bool = False, w_kmajor: bool = False,
             out_dtype=jnp.bfloat16, config: GemmConfig = GemmConfig()):
    """Integer GEMM with fused epilogue; semantics of :func:`int_gemm_reference`.

    Jitted (static: ``packed``, ``w_kmajor``, ``out_dtype``, ``config``), so a model
    calling it from many layers of one shape lowers it once.

    ``w_kmajor``: ``wq`` is stored ``[N, K]`` (packed ``[N, K/2]``, pairs along K), the
    layout of ``QLinear(w_layout="nk")``; else ``[K, N]`` (packed ``[K, N/2]``).
    ``sx`` ``[M, 1]`` per token or ``[M, K/G]`` per (token, group); ``sw`` ``[1, N]`` or ``[K/G, N]``.
    ``x_zero`` f32 ``[M, 1]``: asymmetric activation zero points (per-token scales only);
    ``w_colsum`` f32 ``[1, N]`` the weight codes' column sums over K (computed here when None).
    ``config``: :class:`GemmConfig`.  Requirements: ``M % block_m == 0``, ``N % block_n == 0``;
    group scales make ``block_k`` the group size; the gate's tokens per sample ``M / B``
    divisible by block_m.
    """
    m, k = xq.shape
    if w_kmajor:
        n = wq.shape[0]
    else:
        n = wq.shape[1] * (2 if packed else 1)
    groups = max(sw.shape[0], sx.shape[1])
    grouped = groups > 1
    bk = (k // groups) if grouped else (config.block_k or pow2_divisor(k, 128))
    block_m, block_n = min(config.block_m, m), min(config.block_n, n)
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
    return tiled_gemm_call(kern, args, specs, m=m, n=n, bm=block_m, bn=block_n, out_dtype=out_dtype, config=config,
                           name="jaxdq_int_gemm")
