"""SVD low-rank split of a linear layer's kernel (SVDQuant's 16-bit branch).

``Ŵ = L1 L2 + R`` with ``L1 = U_r Σ_r`` ``[C_in, r]``, ``L2 = V_rᵀ`` ``[r, C_out]``
(the top-r singular triplets of ``Ŵ``) and the residual ``R = Ŵ − L1 L2``
``[C_in, C_out]``, which is what gets quantized.  The layer then computes
``x Ŵ = (x L1) L2 + x R``: equal in exact arithmetic, with the dominant
(outlier-carrying) directions of ``Ŵ`` kept out of the low-bit residual.

Optional refinement (SVDQuant §4.2 / LoRC-style): for ``iters`` rounds recompute
the low-rank part as the rank-r SVD of ``Ŵ − Q(R)`` (``Q`` = quantize-dequantize
of the residual) and keep, over all rounds including the plain split, the one
with least ``‖Ŵ − (L1 L2 + Q(R))‖_F``.  So refinement never increases that error.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from jaxdq.quant.quantizer import QuantSpec, fake_quant


class Split(NamedTuple):
    """``L1 [C_in, r]``, ``L2 [r, C_out]``, ``R [C_in, C_out]`` (float32 jax arrays)."""

    L1: jnp.ndarray
    L2: jnp.ndarray
    R: jnp.ndarray


def _blas_limit(w: np.ndarray):
    """Single-threaded BLAS for small SVDs: on a loaded CPU, multi-threaded LAPACK on a
    few-hundred-wide matrix is 10-20x slower than one thread (threadpoolctl optional)."""
    if min(w.shape) > 512:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _rank_r(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(U_r Σ_r, V_rᵀ)`` of ``w``."""
    with _blas_limit(w):
        u, s, vt = np.linalg.svd(w, full_matrices=False)
    return u[:, :rank] * s[:rank], vt[:rank]


def _round(a: np.ndarray, dtype) -> np.ndarray:
    """``a`` rounded to ``dtype`` (storage precision of the factors), back in float64."""
    if dtype is None:
        return a
    return np.asarray(jnp.asarray(a, jnp.float32).astype(dtype).astype(jnp.float32), np.float64)


def _fake(r, quant_spec):
    """Quantize-dequantize the residual: a QuantSpec, or a weight quantizer with its own
    ``fake_quant(w)`` (e.g. :class:`jaxdq.quant.progressive.ProgressiveSpec`)."""
    if isinstance(quant_spec, QuantSpec):
        return fake_quant(r, quant_spec, kind="weight")
    return quant_spec.fake_quant(r)


def weight_error(kernel, split: Split, quant_spec: Optional[QuantSpec]) -> float:
    """``‖Ŵ − (L1 L2 + Q(R))‖_F`` in float64 (``Q`` = identity when ``quant_spec`` is None)."""
    r = split.R if quant_spec is None else _fake(split.R, quant_spec)
    approx = np.asarray(split.L1, np.float64) @ np.asarray(split.L2, np.float64) + np.asarray(r, np.float64)
    return float(np.linalg.norm(np.asarray(kernel, np.float64) - approx))


def svd_split(kernel, rank: int, *, quant_spec: Optional[QuantSpec] = None, iters: int = 0,
              factor_dtype=None) -> Split:
    """Split ``kernel`` ``[C_in, C_out]`` into a rank-``rank`` part and a residual.

    Args:
      kernel: ``[C_in, C_out]`` float weight (after smoothing, for SVDQuant).
      rank: r in ``0 .. min(C_in, C_out)``; 0 gives empty factors and ``R = kernel``.
      quant_spec: weight quantizer of the residual, used only by the refinement.
      iters: refinement rounds (needs ``quant_spec`` when > 0).
      factor_dtype: storage dtype of the factors (e.g. ``jnp.float16``); the factors
        are rounded to it *before* ``R`` is formed, so ``L1 L2 + R = Ŵ`` still holds
        for the stored factors and their rounding error lands in the quantized residual.
    Returns:
      :class:`Split` of float32 arrays; the SVD and ``R`` are computed in float64.
    """
    w = np.asarray(kernel, np.float64)
    if w.ndim != 2:
        raise ValueError(f"kernel must be 2-D [C_in, C_out], got shape {w.shape}")
    if not 0 <= rank <= min(w.shape):
        raise ValueError(f"rank must be in 0..{min(w.shape)} for a kernel of shape {w.shape}, got {rank}")
    if iters < 0 or (iters > 0 and quant_spec is None):
        raise ValueError("iters > 0 needs a quant_spec (the refinement quantizes the residual)")

    def make(l1, l2) -> Split:
        l1, l2 = _round(l1, factor_dtype), _round(l2, factor_dtype)
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        return Split(f32(l1), f32(l2), f32(w - l1 @ l2))

    best = make(*_rank_r(w, rank))
    if rank == 0 or iters == 0:
        return best
    best_err = weight_error(w, best, quant_spec)
    cur = best
    for _ in range(iters):
        q_r = np.asarray(_fake(cur.R, quant_spec), np.float64)
        cur = make(*_rank_r(w - q_r, rank))
        err = weight_error(w, cur, quant_spec)
        if err < best_err:
            best, best_err = cur, err
    return best
