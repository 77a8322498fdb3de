"""Sylvester (Walsh–Hadamard) matrices and the fast Walsh–Hadamard transform.

The power-of-two Hadamard math shared by :mod:`jaxdq.quant.hadamard` (the rotation nodes)
and :mod:`jaxdq.quant.hadamard_orders` (full-width orders ``m·2^k``); kept apart so that
the rotation nodes can build on the full-width transform without an import cycle.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["fwht", "hadamard_matrix"]


def hadamard_matrix(n: int) -> np.ndarray:
    """Normalized Sylvester Hadamard matrix ``[n, n]`` float64 (n a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def fwht(x: jax.Array) -> jax.Array:
    """Normalized fast Walsh–Hadamard transform over the last axis, O(n log n).

    Equals ``x @ hadamard_matrix(n)`` for ``x: [..., n]``, n a power of two; same dtype
    (computed in float32 at least).
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two last axis, got {n}")
    dtype = x.dtype
    y = x.astype(jnp.promote_types(dtype, jnp.float32))
    lead = y.shape[:-1]
    h = 1
    while h < n:
        # pairs (i, i+h) inside blocks of 2h: [..., n/2h, 2, h]
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return (y.reshape(*lead, n) / math.sqrt(n)).astype(dtype)
