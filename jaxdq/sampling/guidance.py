"""Classifier-free guidance (Ho & Salimans 2022) as a ``model_fn`` wrapper."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdq.sampling.core import ModelFn


def cfg_model_fn(apply_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], y: jax.Array, null_label: int,
                 scale: float | jax.Array) -> ModelFn:
    """Guided ``model_fn(x, t)`` from a class-conditional ``apply_fn(x, t, y) -> out``.

    One network call on the doubled batch ``[x; x]`` with labels ``[y; null_label]``,
    then ``ε = ε_u + scale·(ε_c − ε_u)`` on all C ε-channels (DiT's reference code
    guides only the first 3 channels; that quirk is not copied).  For 2C outputs
    (learned sigma) the variance channels are the conditional half's.  A Python
    ``scale == 1`` returns the conditional output exactly, with a single
    un-doubled call.

    Args:
      apply_fn: ``(x [N, C, ...], t int32 [N], y int32 [N]) -> [N, C or 2C, ...]``.
      y: int ``[B]`` class labels.
      null_label: the "no class" label (DiT: ``num_classes``).
      scale: guidance scale (Python float, or a traced scalar).
    Returns:
      ``model_fn(x [B, C, ...], t int32 [B]) -> [B, C or 2C, ...]``.
    """
    if isinstance(scale, (int, float)) and scale == 1:
        return lambda x, t: apply_fn(x, t, y)

    def model_fn(x, t):
        b, c = x.shape[0], x.shape[1]
        labels = jnp.concatenate([y, jnp.full_like(y, null_label)])
        out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), labels)
        cond, uncond = out[:b], out[b:]
        eps = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
        return jnp.concatenate([eps.astype(out.dtype), cond[:, c:]], axis=1)

    return model_fn
