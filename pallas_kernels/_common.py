"""Helpers shared by the ops of :mod:`pallas_kernels` (no kernels here).

* :func:`sylvester_pm1`: the ±1 Sylvester Hadamard matrix (the normalized one is
  ``sylvester_pm1(n) / sqrt(n)``, what ``jaxdq.quant.hadamard.hadamard_matrix`` returns).
* :func:`pow2_divisor`: the largest power of two dividing ``k``, capped (default K chunk).
* :func:`triton_compiler_params`: Pallas-Triton ``CompilerParams`` (None if this jax has none).
* :func:`unpack_int4_reference`, :func:`weight_colsum`: the int4 packing both GEMMs read
  and the zero-point correction's ``colsum(W)``.
* :func:`tiled_gemm_call`: the Triton GEMMs' launch (one program per ``[bm, bn]`` output tile).
* :func:`round_half_even`, :func:`symmetric_scale`, :func:`symmetric_int_codes`: the code math
  the quantize kernels run in registers.

This package imports nothing from ``jaxdq`` (tests/test_import_graph.py checks it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

try:  # jax >= 0.7
    from jax.experimental.pallas import triton as plt
    _CompilerParams = plt.CompilerParams
except Exception:  # pragma: no cover
    plt = None
    _CompilerParams = None


def sylvester_pm1(n: int) -> np.ndarray:
    """±1 Sylvester Hadamard matrix ``[n, n]`` float64 (n a power of two), unnormalized:
    ``H H^T = n I``; ``sylvester_pm1(n) / sqrt(n)`` is orthonormal."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def pow2_divisor(k: int, cap: int) -> int:
    """The largest power of two dividing ``k``, at most ``cap``."""
    b = k & -k
    return min(b, cap)


def triton_compiler_params(num_warps: int, num_stages: int):
    """``plt.CompilerParams(num_warps=, num_stages=)``, or None where Pallas-Triton is absent."""
    if _CompilerParams is None:
        return None
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def unpack_int4_reference(packed: jax.Array) -> jax.Array:
    """uint8 ``[K, N/2]`` (element 2i low nibble, 2i+1 high) → signed int8 ``[K, N]`` in [-8, 7]."""
    p = packed.astype(jnp.int32)
    nib = jnp.stack([p & 0xF, (p >> 4) & 0xF], axis=-1)
    nib = jnp.where(nib > 7, nib - 16, nib)
    return nib.reshape(packed.shape[:-1] + (2 * packed.shape[-1],)).astype(jnp.int8)


def weight_colsum(wq: jax.Array, *, packed: bool = False, kmajor: bool = False) -> jax.Array:
    """f32 ``[N]``: Σ_k of the weight codes, the zero-point correction's ``colsum(W)``.

    ``wq``: int8 (or ``jnp.int4``) ``[K, N]``, ``[N, K]`` when ``kmajor``; ``packed``: uint8
    with pairs along the last axis (:func:`unpack_int4_reference`).  Exact: |Σ| ≤ 128·K < 2^24.
    """
    w = unpack_int4_reference(wq) if packed else wq
    return jnp.sum(w.astype(jnp.int32), axis=1 if kmajor else 0).astype(jnp.float32)


# --------------------------------------------------------------------------- in-kernel code math
SCALE_FLOOR = 1e-8  # scale floor (as jaxdq.quant.quantizer)


def round_half_even(v):
    """``jnp.round`` (half to even) from floor (Pallas-Triton has no lowering for lax.round)."""
    f = jnp.floor(v)
    d = v - f
    odd = (f - 2.0 * jnp.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return jnp.where(up, f + 1.0, f)


def symmetric_scale(amax, qmax: float):
    """Per-row (or per-group) symmetric scale ``max(absmax / qmax, SCALE_FLOOR)``, float32."""
    return jnp.maximum(amax / qmax, SCALE_FLOOR)


def symmetric_int_codes(v, qmax: int):
    """``v = x / scale`` → int8 codes ``clip(round_half_even(v), −qmax − 1, qmax)``."""
    return jnp.clip(round_half_even(v), -qmax - 1, qmax).astype(jnp.int8)


def tiled_gemm_call(kern, args, in_specs, *, m: int, n: int, bm: int, bn: int, out_dtype, config, name: str):
    """``pallas_call`` of a GEMM kernel over the ``(m / bm, n / bn)`` output tiles: ``[m, n]``
    ``out_dtype`` out, one ``[bm, bn]`` block per program; ``config`` gives ``interpret``,
    ``num_warps``, ``num_stages``."""
    from jax.experimental import pallas as pl

    return pl.pallas_call(
        kern, grid=(m // bm, n // bn), in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), interpret=config.interpret,
        compiler_params=None if config.interpret else triton_compiler_params(config.num_warps, config.num_stages),
        name=name)(*args)

