"""SmoothQuant-style channel balancing of a linear layer (static, from calibration).

``λ_j = max|X_j|^α / max_k |W_jk|^(1−α)``; the layer computes
``(X diag(λ)⁻¹)(diag(λ) W)``, equal to ``X W`` in exact arithmetic, with activation
outlier channels moved into the weights.  α → 1 moves all of the range to the
weights, α → 0 none.  The layer transform is :func:`jaxdq.quant.transforms.smooth_layer`.
"""
from __future__ import annotations

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
