"""Pure-jnp references of every kernel in :mod:`pallas_kernels` (float32 math).

Notation: ``X [M, K]`` activations (tokens × input channels), ``W [K, N]`` weights,
``Y = X W``.  Integer codes are int8 (4-bit codes are carried in int8 too); scales
are float32.  The kernels must match these functions: integer codes exactly,
float outputs to bf16 rounding.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

_TINY = 1e-8  # scale floor, as jaxdq.quant.quantizer

from jaxdq.quant.hadamard import hadamard_matrix  # noqa: E402  (float64 numpy; shared with the transform)
from jaxdq.quant.quantizer import QuantSpec, quantize_activation  # noqa: E402  (asymmetric codes)


def block_hadamard(x: jax.Array, block: int) -> jax.Array:
    """``x [..., K]``: each contiguous group of ``block`` channels times ``H_block/sqrt(block)``.

    Same semantics as ``jaxdq.quant.hadamard.block_hadamard``; computed as a dense
    product per block (float32 at least, highest precision).
    """
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"channel count {k} is not a multiple of the Hadamard block {block}")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    h = jnp.asarray(hadamard_matrix(block), dtype)
    xb = x.astype(dtype).reshape(*x.shape[:-1], k // block, block)
    y = jnp.einsum("...gi,ij->...gj", xb, h, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(x.shape)


def transform_input(x: jax.Array, smooth: Optional[jax.Array] = None, had_block: int = 0) -> jax.Array:
    """``H(x / smooth)`` in float32: the online input transforms of a quantized linear."""
    x = x.astype(jnp.float32)
    if smooth is not None:
        x = x / smooth.astype(jnp.float32)
    if had_block:
        x = block_hadamard(x, had_block)
    return x


def quantize_act(x: jax.Array, *, bits: int = 8, smooth: Optional[jax.Array] = None,
                 had_block: int = 0, l1: Optional[jax.Array] = None, group_size: int = 0,
                 symmetric: bool = True):
    """Fused activation quantization (dynamic, symmetric, per token or per (token, group)).

    Args:
      x: ``[M, K]`` (bf16 or float32).  bits: 8 or 4 (4-bit codes in int8, ``[-8, 7]``).
      smooth: optional ``[K]`` divisor.  had_block: block-Hadamard size (0 = none).
      l1: optional ``[K, r]`` low-rank down-projection factor.
      group_size: 0 = one scale per token; G = one per token and G consecutive channels.
      symmetric: False = asymmetric per-token codes (``group_size`` must be 0): jaxdq's
        quantizer's ``u = clip(round(x'/s) + z, 0, 2^b - 1)`` with ``s = (hi - lo) / (2^b - 1)``,
        ``lo = min(x', 0)``, ``hi = max(x', 0)``, ``z = clip(round(-lo / s), 0, 2^b - 1)``,
        carried as signed int8 ``u - 2^(b-1)`` (what an s8 tensor-core GEMM takes) with the
        zero point shifted the same way.
    Returns:
      ``codes`` int8 ``[M, K]``, ``scale`` float32 ``[M, 1]`` (or ``[M, K / G]``;
      ``absmax / qmax`` floored at 1e-8), and ``xl1`` float32 ``[M, r]`` = ``x' @ l1`` of
      the transformed, unquantized ``x'`` (None without ``l1``); asymmetric: a fourth
      output, the shifted zero point ``z - 2^(b-1)`` float32 ``[M, 1]``
      (``x' ≈ scale · (codes - zero)``).
    """
    xt = transform_input(x, smooth, had_block)
    xl1 = None if l1 is None else jnp.dot(xt, l1.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    if not symmetric:
        if group_size:
            raise ValueError("asymmetric activation codes are per token (group_size must be 0)")
        codes, scale, zero = quantize_activation(xt, QuantSpec(bits, symmetric=False, granularity="token"))
        half = 2 ** (bits - 1)
        return (codes.astype(jnp.int32) - half).astype(jnp.int8), scale, xl1, zero - half
    qmax = 2 ** (bits - 1) - 1
    m, k = xt.shape
    g = group_size or k
    xg = xt.reshape(m, k // g, g)
    scale = jnp.maximum(jnp.max(jnp.abs(xg), axis=-1, keepdims=True) / qmax, _TINY)
    codes = jnp.clip(jnp.round(xg / scale), -qmax - 1, qmax).astype(jnp.int8).reshape(m, k)
    return codes, scale[..., 0], xl1


def unpack_int4(packed: jax.Array) -> jax.Array:
    """uint8 ``[K, N/2]`` (element 2i low nibble, 2i+1 high) → signed int8 ``[K, N]`` in [-8, 7]."""
    p = packed.astype(jnp.int32)
    nib = jnp.stack([p & 0xF, (p >> 4) & 0xF], axis=-1)
    nib = jnp.where(nib > 7, nib - 16, nib)
    return nib.reshape(packed.shape[:-1] + (2 * packed.shape[-1],)).astype(jnp.int8)


def weight_colsum(wq: jax.Array, *, packed: bool = False, kmajor: bool = False) -> jax.Array:
    """f32 ``[N]``: Σ_k of the weight codes, the zero-point correction's ``colsum(W)``.

    ``wq``: int8 (or ``jnp.int4``) ``[K, N]``, ``[N, K]`` when ``kmajor``; ``packed``: uint8
    with pairs along the last axis (:func:`unpack_int4`).  Exact: |Σ| ≤ 128·K < 2^24.
    """
    w = unpack_int4(wq) if packed else wq
    return jnp.sum(w.astype(jnp.int32), axis=1 if kmajor else 0).astype(jnp.float32)


def int_gemm(xq: jax.Array, wq: jax.Array, sx: jax.Array, sw: jax.Array, *,
             bias: Optional[jax.Array] = None, xa: Optional[jax.Array] = None,
             l2: Optional[jax.Array] = None, residual: Optional[jax.Array] = None,
             gate: Optional[jax.Array] = None, packed: bool = False,
             x_zero: Optional[jax.Array] = None, out_dtype=jnp.bfloat16) -> jax.Array:
    """Integer GEMM with fused epilogue.

    ``y = Σ_g (xq[:, g] @ W[g]) · sx · sw[g] + bias + xa @ l2``, then
    ``out = residual + gate · y`` (each term optional).  With asymmetric activations
    (``x_zero``, per token, one scale group): ``y = (xq @ W - x_zero ⊗ colsum(W)) · sx · sw + ...``
    = ``((xq - x_zero) @ W) · sx · sw + ...``, the zero-point correction.

    Args:
      xq: int8 ``[M, K]`` activation codes.  wq: int8 ``[K, N]`` codes, or uint8
        ``[K, N/2]`` when ``packed`` (int4, see :func:`unpack_int4`).
      sx: float32 ``[M, 1]`` per-token scale, or ``[M, K/G]`` per (token, group).
        sw: float32 ``[1, N]`` per channel or ``[K/G, N]`` per group of G input channels.
      bias: ``[N]``.  xa: ``[M, r]`` (``x' L1``), l2: ``[r, N]`` low-rank up-projection.
      residual: ``[M, N]``.  gate: ``[B, N]`` with ``M % B == 0``: row m uses
        ``gate[m // (M / B)]`` (DiT's per-sample gate over its tokens).
      x_zero: float32 ``[M, 1]`` activation zero points (see :func:`quantize_act`).
    Returns: ``out_dtype [M, N]``.
    """
    w = unpack_int4(wq) if packed else wq
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
    if gate is not None:
        reps = m // gate.shape[0]
        y = y * jnp.repeat(gate.astype(jnp.float32), reps, axis=0)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return y.astype(out_dtype)


def qlinear_forward(x: jax.Array, wq: jax.Array, sw: jax.Array, *, bits: int = 8,
                    packed: bool = False, bias=None, smooth=None, had_block: int = 0,
                    l1=None, l2=None, act_group_size: int = 0, out_dtype=jnp.bfloat16) -> jax.Array:
    """Quantize (fused) then integer GEMM (fused): the composed quantized linear ``[M, K] → [M, N]``."""
    codes, sx, xl1 = quantize_act(x, bits=bits, smooth=smooth, had_block=had_block, l1=l1,
                                  group_size=act_group_size)
    return int_gemm(codes, wq, sx, sw, bias=bias, xa=xl1, l2=l2 if l1 is not None else None,
                    packed=packed, out_dtype=out_dtype)
