"""Fused dynamic activation quantization: ``X [M, K]`` → int8 codes, scales and ``X' L1``.

* :func:`quantize_act` (Pallas-Triton; any CUDA GPU, and ``interpret=True`` on CPU):
  bf16/f32 ``X`` → int8 codes, per-token (or per-(token, group)) scales and ``X' L1`` in
  one kernel (``X' = H(X / smooth)``).  Two sweeps over K per row block: the first finds
  the row absmax and accumulates ``X' L1``, the second re-reads the (L2-resident) rows and
  writes the codes (or one pass with the row block kept in registers,
  ``QuantizeConfig.single_pass``).  The block-Hadamard is a tensor-core product with the
  ±1 matrix on a bf16 hi/lo split of ``X'`` (≈16-bit mantissa).
* :class:`QuantizeConfig`: its launch parameters (frozen, hashable);
  :func:`quantize_config`: the H100-measured choice per case.
* References (pure jnp, float32): :func:`block_hadamard_reference`,
  :func:`transform_input_reference`, :func:`quantize_act_reference`.  The kernel matches
  the reference's integer codes exactly (without Hadamard and with ``exact_divide``).

Notation: ``X [M, K]`` activations (tokens × input channels).  Integer codes are int8
(4-bit codes carried in int8 too); scales are float32.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels._common import (SCALE_FLOOR, pow2_divisor, round_half_even, sylvester_pm1, symmetric_int_codes,
                                     symmetric_scale, triton_compiler_params)



# --------------------------------------------------------------------------- references
def block_hadamard_reference(x: jax.Array, block: int) -> jax.Array:
    """``x [..., K]``: each contiguous group of ``block`` channels times ``H_block/sqrt(block)``.

    Same semantics as ``jaxdq.quant.hadamard.block_hadamard``; computed as a dense
    product per block (float32 at least, highest precision).
    """
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"channel count {k} is not a multiple of the Hadamard block {block}")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    h = jnp.asarray(sylvester_pm1(block) / math.sqrt(block), dtype)
    xb = x.astype(dtype).reshape(*x.shape[:-1], k // block, block)
    y = jnp.einsum("...gi,ij->...gj", xb, h, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(x.shape)


def transform_input_reference(x: jax.Array, smooth: Optional[jax.Array] = None, had_block: int = 0) -> jax.Array:
    """``H(x / smooth)`` in float32: the online input transforms of a quantized linear."""
    x = x.astype(jnp.float32)
    if smooth is not None:
        x = x / smooth.astype(jnp.float32)
    if had_block:
        x = block_hadamard_reference(x, had_block)
    return x


def quantize_act_reference(x: jax.Array, *, bits: int = 8, smooth: Optional[jax.Array] = None,
                           had_block: int = 0, l1: Optional[jax.Array] = None, group_size: int = 0,
                           symmetric: bool = True):
    """Fused activation quantization (dynamic, per token or per (token, group)): the reference.

    Args:
      x: ``[M, K]`` (bf16 or float32).  bits: 8 or 4 (4-bit codes in int8, ``[-8, 7]``).
      smooth: optional ``[K]`` divisor.  had_block: block-Hadamard size (0 = none).
      l1: optional ``[K, r]`` low-rank down-projection factor.
      group_size: 0 = one scale per token; G = one per token and G consecutive channels.
      symmetric: False = asymmetric per-token codes (``group_size`` must be 0), per row of
        ``x' = H(x / smooth)``: ``lo = min(x', 0)``, ``hi = max(x', 0)``,
        ``s = max((hi - lo) / (2^b - 1), 1e-8)``, ``z = clip(round(-lo / s), 0, 2^b - 1)``,
        ``u = clip(round(x' / s) + z, 0, 2^b - 1)`` (jaxdq's quantizer's asymmetric
        per-token codes; tests/test_kernels.py checks they are equal), carried as signed
        int8 ``u - 2^(b-1)`` (what an s8 tensor-core GEMM takes) with the zero point
        shifted the same way.
    Returns:
      ``codes`` int8 ``[M, K]``, ``scale`` float32 ``[M, 1]`` (or ``[M, K / G]``;
      ``absmax / qmax`` floored at 1e-8), and ``xl1`` float32 ``[M, r]`` = ``x' @ l1`` of
      the transformed, unquantized ``x'`` (None without ``l1``); asymmetric: a fourth
      output, the shifted zero point ``z - 2^(b-1)`` float32 ``[M, 1]``
      (``x' ≈ scale · (codes - zero)``).
    """
    xt = transform_input_reference(x, smooth, had_block)
    xl1 = None if l1 is None else jnp.dot(xt, l1.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    if not symmetric:
        if group_size:
            raise ValueError("asymmetric activation codes are per token (group_size must be 0)")
        umax = 2 ** bits - 1
        lo = jnp.minimum(jnp.min(xt, axis=-1, keepdims=True), 0.0)
        hi = jnp.maximum(jnp.max(xt, axis=-1, keepdims=True), 0.0)
        scale = jnp.maximum((hi - lo) / umax, SCALE_FLOOR)
        zero = jnp.clip(jnp.round(-lo / scale), 0, umax)
        u = jnp.clip(jnp.round(xt / scale) + zero, 0, umax)
        half = 2 ** (bits - 1)
        return (u - half).astype(jnp.int8), scale, xl1, zero - half
    qmax = 2 ** (bits - 1) - 1
    m, k = xt.shape
    g = group_size or k
    xg = xt.reshape(m, k // g, g)
    scale = jnp.maximum(jnp.max(jnp.abs(xg), axis=-1, keepdims=True) / qmax, SCALE_FLOOR)
    codes = jnp.clip(jnp.round(xg / scale), -qmax - 1, qmax).astype(jnp.int8).reshape(m, k)
    return codes, scale[..., 0], xl1


# --------------------------------------------------------------------------- tuning config
@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Launch parameters of :func:`quantize_act` (frozen: a static jit argument).

    block_m: rows per program (``M % block_m == 0``; ≥ 16 when the kernel has a
      tensor-core product, the down-projection or the Hadamard).  num_warps, num_stages:
      Triton's.  single_pass: keep the row block's chunks in registers (one read of X; for
      ``block_m · K`` up to ~16K elements per 4 warps) instead of two sweeps over K.
      exact_divide: True = IEEE division by the smoothing vector and the scale, codes equal
      to the reference's; False = multiply by reciprocals (≤ 1 ulp off before rounding: a
      code can move by one at a .5 tie).  interpret: run in Pallas' interpreter (CPU).
    """

    block_m: int = 16
    num_warps: int = 4
    num_stages: int = 1
    single_pass: bool = False
    exact_divide: bool = True
    interpret: bool = False



# --------------------------------------------------------------------------- kernel
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
        """(scale, zero | None) as :func:`quantize_act_reference` computes them."""
        if symmetric:
            return symmetric_scale(st[0], qmax), None
        scale = jnp.maximum((st[1] - st[0]) / qmax, SCALE_FLOOR)
        return scale, jnp.clip(round_half_even(-st[0] / scale), 0.0, float(qmax))

    def encode(x, scale, zero):
        if symmetric:
            return symmetric_int_codes(divide(x, scale), qmax)
        return (jnp.clip(round_half_even(divide(x, scale)) + zero, 0.0, float(qmax)) - half).astype(jnp.int8)

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
            scale = symmetric_scale(jnp.max(jnp.abs(x), axis=1, keepdims=True), qmax)
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


def quantize_config(m: int, k: int, *, dot: bool, smooth: bool, grouped: bool) -> QuantizeConfig:
    """Launch parameters of :func:`quantize_act` for ``X [m, k]`` (H100 measurements).

    ``dot``: the kernel has a tensor-core product (the down-projection ``X' L1`` or the
    block-Hadamard), whose operand needs ≥ 16 rows per program; ``smooth``: the divide by
    the smoothing vector; ``grouped``: one scale per (token, group).  Chosen from
    bench/results/kernels_h100_run3.json (CUPTI), e.g. per-token without smoothing, 512×1152:
    one pass of 4 rows 2.5 µs vs 7.5 µs for two sweeps of 16; 8192×1152: 13.2 µs = 74% of
    HBM bandwidth; smoothing + rank-32 down-projection, 8192×1152: two sweeps of 64 rows
    43.9 µs vs 70.6 µs at the old 16-row default.  Returns a :class:`QuantizeConfig`
    (``block_m`` divides any ``m`` that is a multiple of 32; fields not named take the
    class defaults; ``interpret`` False: ``dataclasses.replace`` it for CPU runs).
    """
    if grouped:
        return QuantizeConfig(block_m=32, num_warps=4, num_stages=3)
    if dot:
        if k > 2048:
            return QuantizeConfig(block_m=16, num_warps=4, num_stages=1)
        if m <= 1024:
            return QuantizeConfig(block_m=16, num_warps=8, single_pass=True)
        return QuantizeConfig(block_m=64, num_warps=8, num_stages=3)
    if smooth:
        if k <= 2048:
            return QuantizeConfig(block_m=4, num_warps=8, single_pass=True)
        return QuantizeConfig(block_m=4, num_warps=4, num_stages=3)
    if k <= 4608:
        return QuantizeConfig(block_m=4, num_warps=4, single_pass=True)
    return QuantizeConfig(block_m=8, num_warps=4, num_stages=3)


@functools.partial(jax.jit, static_argnames=("bits", "had_block", "group_size", "symmetric", "config"))
def quantize_act(x: jax.Array, *, bits: int = 8, smooth: Optional[jax.Array] = None,
                 had_block: int = 0, l1: Optional[jax.Array] = None, group_size: int = 0,
                 symmetric: bool = True, config: QuantizeConfig = QuantizeConfig()):
    """Fused dynamic per-token activation quantization (see the module docstring).

    Semantics: :func:`quantize_act_reference`.  Jitted (static: ``bits``, ``had_block``,
    ``group_size``, ``symmetric``, ``config``), so a model calling it from many layers of
    one shape lowers it once.

    Args:
      x: ``[M, K]`` bf16/f32, ``M % config.block_m == 0``.  smooth: ``[K]``.  had_block: 0
        or a power of two ≥ 16 dividing K.  l1: ``[K, r]`` (r ≥ 16), any float dtype.
      group_size: 0 = one scale per token; G (a power of two ≥ 16 dividing K, and equal
        to ``had_block`` if both are set) = one scale per token and G channels, in one sweep.
      symmetric: False = asymmetric per-token codes, shifted to int8, and a fourth output,
        the shifted zero point f32 ``[M, 1]``.
      config: :class:`QuantizeConfig` (launch parameters; :func:`quantize_config` picks them).
    Returns: codes int8 ``[M, K]``, scale f32 ``[M, 1]`` (``[M, K/G]``), ``x' L1`` bf16
    ``[M, r]`` (or None)[, zero f32 ``[M, 1]`` when asymmetric].
    """
    block_m, interpret = config.block_m, config.interpret
    m, k = x.shape
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1
    if not symmetric and group_size:
        raise ValueError("asymmetric activation codes are per token (group_size must be 0)")
    if group_size and had_block and group_size != had_block:
        raise ValueError(f"per-group activation scales need had_block == group_size, got {had_block}, {group_size}")
    bk = group_size or had_block or pow2_divisor(k, 512)
    assert m % block_m == 0 and k % bk == 0
    args, specs = [x], [pl.BlockSpec((block_m, k), lambda i: (i, 0))]
    if smooth is not None:
        args.append(smooth.reshape(1, k))
        specs.append(pl.BlockSpec((1, k), lambda i: (0, 0)))
    if had_block:
        args.append(jnp.asarray(sylvester_pm1(had_block), jnp.bfloat16))  # ±1, exact in bf16
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
                             single_pass=config.single_pass, grouped=bool(group_size), symmetric=symmetric,
                             exact_divide=config.exact_divide)
    outs = pl.pallas_call(kern, grid=(m // block_m,), in_specs=specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret,
                          compiler_params=None if interpret else triton_compiler_params(config.num_warps,
                                                                                        config.num_stages),
                          name="jaxdq_quantize_act")(*args)
    xl1 = outs[2] if l1 is not None else None
    return (outs[0], outs[1], xl1) if symmetric else (outs[0], outs[1], xl1, outs[-1])
