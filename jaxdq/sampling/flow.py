"""Rectified-flow (flow-matching) Euler sampling, as diffusers' ``FlowMatchEulerDiscreteScheduler``.

The model predicts the velocity ``v = dx/dσ`` of the path ``x_σ = (1 − σ)·x0 + σ·ε``
(for a perfect model ``v = ε − x0``).  With noise levels ``σ_0 > … > σ_K = 0``, one
step, model called at σ_i:

    x_{i+1} = x_i + (σ_{i+1} − σ_i)·v(x_i, σ_i)

:func:`flux_sigmas` is the schedule the FLUX pipelines use: ``linspace(1, 1/K, K)``,
resolution-dependently shifted (``use_dynamic_shifting``, FLUX.1-dev) or not
(FLUX.1-schnell), then a final 0.  :func:`flux_velocity_fn` turns a FLUX network
into ``velocity_fn(x, σ)``: guidance-distilled FLUX.1-dev takes the guidance scale as
an input (one call per step); true classifier-free guidance with a negative prompt
doubles the batch.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.sampling.progress import scan_progress

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]

# diffusers FluxPipeline / FLUX.1-dev scheduler_config.json
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096


def flux_shift_mu(image_seq_len: int, base_seq_len: int = BASE_SEQ_LEN, max_seq_len: int = MAX_SEQ_LEN,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """μ linear in the packed image length: ``base_shift`` at ``base_seq_len`` tokens,
    ``max_shift`` at ``max_seq_len`` (diffusers ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def time_shift(mu: float, sigmas: np.ndarray, power: float = 1.0) -> np.ndarray:
    """``e^μ / (e^μ + (1/σ − 1)^power)`` (diffusers ``_time_shift_exponential``)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0) ** power)


def flux_sigmas(num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                shift: bool = True, base_seq_len: int = BASE_SEQ_LEN,
                max_seq_len: int = MAX_SEQ_LEN) -> np.ndarray:
    """The FLUX pipelines' noise levels, ``[K + 1]`` float64, decreasing from ≤ 1 to 0.

    ``σ = linspace(1, 1/K, K)``; with ``shift`` (FLUX.1-dev's ``use_dynamic_shifting``)
    ``σ ← time_shift(flux_shift_mu(image_seq_len, …), σ)``; then a final 0 is appended.
    diffusers rounds σ to float32 before shifting; so does this (the result agrees
    with ``scheduler.sigmas`` to float32 precision).

    Args:
      num_steps: K.
      image_seq_len: packed latent tokens, ``(H/2)·(W/2)`` of the latent (4096 at 1024²).
      shift: False for FLUX.1-schnell (no dynamic shifting, shift 1).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32).astype(np.float64)
    if shift:
        sigmas = time_shift(flux_shift_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift), sigmas)
    return np.append(sigmas, 0.0)


def flow_euler_sample(velocity_fn: VelocityFn, x_T: jax.Array, *, sigmas: Any, progress: bool = False,
                      return_trajectory: bool = False):
    """Euler integration of ``dx/dσ = v(x, σ)`` from σ_0 to σ_K, as one ``lax.scan``.

    Args:
      velocity_fn: ``(x [B, ...], sigma float32 [B]) -> v [B, ...]``.
      x_T: ``[B, ...]`` float, the sample at σ_0 (pure noise when σ_0 = 1).
      sigmas: ``[K + 1]`` noise levels (NumPy or jax, may be traced), e.g. :func:`flux_sigmas`.
      progress: draw a progress bar on stderr (:func:`scan_progress`).
      return_trajectory: also return ``{"x": [K, B, ...] the x each step started from,
        "sigma": [K] float32}``.
    Returns:
      x at σ_K (``x_T.dtype``), and the trajectory dict if requested.  Each step is
      computed in float32 and cast back to ``x_T.dtype`` (as diffusers' ``step``).
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be [K + 1] with K >= 1, got shape {sigmas.shape}")
    total = int(sigmas.shape[0]) - 1
    table = {"step": jnp.arange(total, dtype=jnp.int32), "sigma": sigmas[:-1], "sigma_next": sigmas[1:]}
    b = x_T.shape[0]

    def body(x, row):
        v = velocity_fn(x, jnp.full((b,), row["sigma"], jnp.float32))
        if v.shape != x.shape:
            raise ValueError(f"velocity_fn returned shape {v.shape}, expected x's shape {x.shape}")
        x_next = (x.astype(jnp.float32) + (row["sigma_next"] - row["sigma"]) * v.astype(jnp.float32)).astype(x.dtype)
        if progress:
            scan_progress(row["step"] + 1, total, "sampling flow-euler", after=x_next)
        return x_next, (x if return_trajectory else None)

    x0, xs = jax.lax.scan(body, x_T, table)
    return (x0, {"x": xs, "sigma": table["sigma"]}) if return_trajectory else x0


def flux_velocity_fn(apply_fn: Callable[..., jax.Array], txt: jax.Array, pooled: jax.Array,
                     img_ids: jax.Array, txt_ids: jax.Array, *, guidance: Optional[float | jax.Array] = None,
                     neg_txt: Optional[jax.Array] = None, neg_pooled: Optional[jax.Array] = None,
                     true_cfg_scale: float | jax.Array = 1.0) -> VelocityFn:
    """``velocity_fn(x, σ)`` for :func:`flow_euler_sample` from a FLUX network.

    Args:
      apply_fn: ``(img [N, L, C], txt [N, T, J], pooled [N, P], timestep [N], img_ids [L, 3],
        txt_ids [T, 3], guidance [N] or None) -> [N, L, C]``, e.g.
        ``lambda *a: Flux(cfg).apply({"params": params}, *a)``.
      txt, pooled: ``[B, T, J]``, ``[B, P]`` prompt embeddings.
      guidance: FLUX.1-dev's distilled guidance scale (e.g. 3.5), broadcast to ``[B]``;
        None for models without a guidance embedder (schnell).
      neg_txt, neg_pooled: negative-prompt embeddings for true CFG (same shapes).
      true_cfg_scale: with a negative prompt and a scale ≠ 1 (Python), the velocity is
        ``v_neg + scale·(v_pos − v_neg)`` from one call on the doubled batch
        (diffusers ``FluxPipeline(true_cfg_scale=...)``).
    """
    use_cfg = neg_txt is not None and not (isinstance(true_cfg_scale, (int, float)) and true_cfg_scale == 1)
    if use_cfg and neg_pooled is None:
        raise ValueError("true CFG needs both neg_txt and neg_pooled")

    def guidance_for(n):
        return None if guidance is None else jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (n,))

    if not use_cfg:
        return lambda x, sigma: apply_fn(x, txt, pooled, sigma, img_ids, txt_ids, guidance_for(x.shape[0]))

    def velocity(x, sigma):
        b = x.shape[0]
        cat = lambda a, c: jnp.concatenate([a, c.astype(a.dtype)])  # noqa: E731
        out = apply_fn(cat(x, x), cat(txt, neg_txt), cat(pooled, neg_pooled), cat(sigma, sigma),
                       img_ids, txt_ids, guidance_for(2 * b))
        pos, neg = out[:b], out[b:]
        return (neg + true_cfg_scale * (pos - neg)).astype(out.dtype)

    return velocity
