"""DDPM ancestral sampling on a respaced chain (improved-DDPM / DiT ``p_sample_loop``).

With selected timesteps t_0 < … < t_{K-1} (:func:`select_timesteps`), the
respaced chain has ā_i = ᾱ_{t_i}, ā_{-1} = 1, β_i = 1 − ā_i/ā_{i-1}, α_i = 1 − β_i
and posterior variance β̃_i = β_i (1 − ā_{i-1})/(1 − ā_i).  One step, i = K-1 … 0,
model called at t_i:

    x̂0      = x/√ā_i − √(1/ā_i − 1)·ε              (clipped to ±clip_x0 if given)
    μ        = β_i √ā_{i-1}/(1 − ā_i)·x̂0 + (1 − ā_{i-1}) √α_i/(1 − ā_i)·x
    log σ²   = log β̃_i (fixed; β̃_0 replaced by β̃_1 as DiT's "clipped" log variance)
             or frac·log β_i + (1 − frac)·log β̃_i, frac = (v + 1)/2 (learned sigma, 2C outputs)
    x_{i-1}  = μ + σ·z,  z = step_noise(key, K-1-i),  no noise at i = 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.sampling.core import ModelFn, call_model, make_table, predict_x0, run_steps, step_noise, x0_coefficients
from jaxdq.sampling.schedule import DiscreteSchedule, posterior_variance64, select_timesteps


def ddpm_table(schedule: DiscreteSchedule, num_steps: int) -> dict[str, jax.Array]:
    """Per-step coefficients in sampling order (see module docstring)."""
    ts = select_timesteps(schedule.num_train_timesteps, num_steps)[::-1]  # increasing t
    ac = schedule.alphas_cumprod64[ts]
    prev = np.append(1.0, ac[:-1])
    betas = 1.0 - ac / prev
    post = posterior_variance64(ac)
    log_post = np.log(np.append(post[1], post[1:])) if num_steps > 1 else np.log(betas)
    coefs = {**x0_coefficients(ac),
             "coef_x0": betas * np.sqrt(prev) / (1.0 - ac),
             "coef_xt": (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
             "log_var_min": log_post,
             "log_var_max": np.log(betas),
             "noise_mask": (np.arange(num_steps) > 0).astype(np.float64)}
    return make_table(ts[::-1], {k: v[::-1] for k, v in coefs.items()})


def ddpm_sample(model_fn: ModelFn, x_T: jax.Array, key: jax.Array, schedule: DiscreteSchedule, num_steps: int, *,
                clip_x0: float | None = None, return_trajectory: bool = False, progress: bool = False):
    """DDPM ancestral sampling; learned variance when the model outputs 2C channels.

    Args:
      model_fn: ``(x [B, C, ...], t int32 [B]) -> [B, C or 2C, ...]``.
      x_T: ``[B, C, ...]`` float, the initial noise.
      key: PRNG key; step noise is ``step_noise(key, step, ...)``.
      schedule: the training schedule.
      num_steps: K (static).
      clip_x0: clip x̂0 to ±clip_x0, or None.
    Returns:
      x_0 ``[B, C, ...]`` (``x_T.dtype``), and the trajectory dict if requested.
    """
    table = ddpm_table(schedule, num_steps)

    def step(x, row):
        eps, v = call_model(model_fn, x, row["t"])
        x0 = predict_x0(x, eps, row, clip_x0)
        mean = row["coef_x0"] * x0 + row["coef_xt"] * x
        if v is None:
            log_var = row["log_var_min"]
        else:
            frac = (v + 1.0) / 2.0
            log_var = frac * row["log_var_max"] + (1.0 - frac) * row["log_var_min"]
        z = step_noise(key, row["step"], x.shape, x.dtype)
        return (mean + row["noise_mask"] * jnp.exp(0.5 * log_var) * z).astype(x.dtype), x

    x0, traj = run_steps(step, x_T, table, return_trajectory=return_trajectory, progress=progress,
                         desc="sampling ddpm")
    return (x0, traj) if return_trajectory else x0
