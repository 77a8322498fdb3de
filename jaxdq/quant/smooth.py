"""SmoothQuant-style channel balancing of a linear layer (static, from calibration).

``λ_j = max|X_j|^α / max_k |W_jk|^(1−α)``; the layer computes
``(X diag(λ)⁻¹)(diag(λ) W)``, equal to ``X W`` in exact arithmetic, with activation
outlier channels moved into the weights.  α → 1 moves all of the range to the
weights, α → 0 none.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

_EPS = 1e-5


def smoothing_factors(act_absmax: jax.Array, kernel: jax.Array, alpha: float) -> jax.Array:
    """Per-input-channel ``λ [C_in]`` float32 from calibration ``max|X_j|`` ``[C_in]`` and
    ``W [C_in, C_out]``.  Channels with no activation or no weight range get λ = 1."""
    a = jnp.maximum(jnp.asarray(act_absmax, jnp.float32), 0.0)
    w = jnp.max(jnp.abs(jnp.asarray(kernel, jnp.float32)), axis=1)
    lam = jnp.power(jnp.maximum(a, _EPS), alpha) / jnp.power(jnp.maximum(w, _EPS), 1.0 - alpha)
    ok = (a > 0) & (w > 0) & jnp.isfinite(lam)
    return jnp.where(ok, jnp.clip(lam, _EPS, 1.0 / _EPS), 1.0)


def smooth_layer(layer: Mapping, lam: jax.Array) -> dict:
    """Fold ``λ`` into a float layer dict: kernel ``diag(λ) W``, input divisor ``smooth = λ``.

    Composes with an existing ``smooth`` (the divisors multiply).  Must run before any
    rotation or low-rank split of the layer (the divisor is applied to the raw input).
    """
    if "hadamard" in layer or "lowrank_a" in layer:
        raise ValueError("smooth a layer before rotating it or splitting off a low-rank branch")
    lam = jnp.asarray(lam, jnp.float32)
    out = dict(layer)
    out["kernel"] = jnp.asarray(layer["kernel"], jnp.float32) * lam[:, None]
    out["smooth"] = lam if layer.get("smooth") is None else layer["smooth"] * lam
    return out


def smooth_params(params: Mapping, stats: Mapping, alpha: float, select) -> dict:
    """Smooth every float linear layer whose path ``select(path)`` accepts.

    ``stats``: pooled calibration statistics (``jaxdq.calibrate.pool_stats``) with the
    params' layer paths; each layer's ``absmax [C_in]`` sets its λ.
    """
    from jaxdq.quant.rules import get_path, is_float_linear, map_linears

    def fn(path, layer):
        if not is_float_linear(layer) or not select(path):
            return layer
        lam = smoothing_factors(get_path(stats, path)["absmax"], layer["kernel"], alpha)
        return smooth_layer(layer, lam)

    return map_linears(params, fn)
