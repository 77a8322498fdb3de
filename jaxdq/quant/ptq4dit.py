"""PTQ4DiT-style channel balancing (Wu et al., NeurIPS 2024): salience balancing between a
layer's activation and weight channels, with the activation salience calibrated over timesteps.

* Channel-wise Salience Balancing (CSB): the salience of input channel ``j`` is
  ``s(X_j) = max|X_j|`` for the activation and ``s(W_j) = max_k |W_jk|`` for the weight; the
  balanced salience ``sqrt(s(X_j) s(W_j))`` is given to both, i.e. ``X ← X diag(λ)⁻¹``,
  ``W ← diag(λ) W`` with ``λ_j = sqrt(s(X_j) / s(W_j))`` (SmoothQuant's factor at α = ½;
  extremes of the activation and of the weight rarely share a channel, so both shrink).
* Spearman's ρ-guided Salience Calibration (SSC): the activation salience changes with the
  timestep; the salience used is ``Σ_t η_t s(X_j^{(t)})`` with ``η_t = softmax(−ρ_t)`` over
  the calibration timesteps, ``ρ_t`` the Spearman rank correlation over channels between
  ``s(X^{(t)})`` and ``s(W)``: timesteps whose activation and weight extremes are the most
  complementary (lowest ρ) weigh the most.

Written from the paper's description; the balancing is a float-equivalent transform
(:func:`jaxdq.quant.transforms.smooth_layer`), quantization follows it (the recipe
``ptq4dit-csb-wXa8``: round-to-nearest per-channel weights, static per-tensor activations).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from jaxdq.quant.layers import FloatLinear, get_path
from jaxdq.quant.transforms import smooth_layer, transform_params

__all__ = ["csb_factors", "per_step_absmax", "ptq4dit_balance", "spearman", "ssc_weights"]

_EPS = 1e-5


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties given their average rank (as Spearman's ρ needs)."""
    from scipy.stats import rankdata

    return rankdata(a, axis=-1)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each row of ``a [..., C]`` with ``b [C]`` → ``[...]``
    (0 for a constant row)."""
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean()
    den = np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum())
    return np.where(den > 0, (ra * rb).sum(-1) / np.maximum(den, 1e-300), 0.0)


def ssc_weights(act_absmax_t: np.ndarray, w_salience: np.ndarray) -> np.ndarray:
    """``η [S]``: softmax of ``−ρ_t`` over the timesteps (``act_absmax_t [S, C]``)."""
    rho = spearman(act_absmax_t, w_salience)
    e = np.exp(-(rho - rho.min()))
    return e / e.sum()


def csb_factors(act_absmax_t: np.ndarray, kernel) -> np.ndarray:
    """``λ [C_in]`` float32 of CSB with SSC from the per-step activation maxima
    ``act_absmax_t [S, C_in]`` and the kernel ``[C_in, C_out]``: ``sqrt(s_ρ(X_j) / s(W_j))``;
    channels without an activation or weight range keep λ = 1."""
    a_t = np.maximum(np.asarray(act_absmax_t, np.float64), 0.0)
    sw = np.max(np.abs(np.asarray(kernel, np.float64)), axis=1)
    sx = ssc_weights(a_t, sw) @ a_t
    lam = np.sqrt(np.maximum(sx, _EPS) / np.maximum(sw, _EPS))
    ok = (sx > 0) & (sw > 0) & np.isfinite(lam)
    return np.where(ok, np.clip(lam, _EPS, 1 / _EPS), 1.0).astype(np.float32)


def per_step_absmax(calib: Mapping, path: str) -> np.ndarray:
    """``[S, C_in]``: a layer's per-step input maxima over both CFG branches."""
    arrs = [np.asarray(get_path(calib[b], path)["absmax"]) for b in ("cond", "uncond") if b in calib]
    return np.max(np.stack(arrs), axis=0)


def ptq4dit_balance(params: Mapping, calib: Mapping, select: Callable[[str], bool]) -> dict:
    """CSB + SSC on the selected float layers (per-step statistics of a calibration result)."""
    def fn(path, layer: FloatLinear):
        return smooth_layer(layer, csb_factors(per_step_absmax(calib, path), layer.effective_kernel()))

    return transform_params(params, fn, select)
