"""DDIM (Song et al. 2021) on the selected timesteps (DiT ``ddim_sample_loop``).

With ā = ᾱ_{t_i} and ā' = ᾱ_{t_{i-1}} (ā' = 1 after the last step, t_0 = 0), one
step, model called at t_i:

    x̂0      = x/√ā − √(1/ā − 1)·ε           (if clip_x0: clip, then ε ← (x/√ā − x̂0)/√(1/ā − 1))
    σ        = η·√((1 − ā')/(1 − ā))·√(1 − ā/ā')
    x_{i-1}  = √ā'·x̂0 + √(1 − ā' − σ²)·ε + σ·z,   z = step_noise(key, step)

so the last step returns x̂0 at t = 0.  Learned-sigma channels are ignored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.sampling.core import ModelFn, call_model, make_table, predict_x0, run_steps, step_noise, x0_coefficients
from jaxdq.sampling.schedule import DiscreteSchedule, select_timesteps


def _is_static_number(value) -> bool:
    return isinstance(value, (int, float, np.number))


def ddim_table(schedule: DiscreteSchedule, num_steps: int, eta: float | jax.Array = 0.0) -> dict[str, jax.Array]:
    """Per-step coefficients in sampling order; ``eta`` may be traced (then σ is computed in float32)."""
    ts = select_timesteps(schedule.num_train_timesteps, num_steps)
    ac = schedule.alphas_cumprod64[ts]
    nxt = np.append(ac[1:], 1.0)
    sigma_unit = np.sqrt((1.0 - nxt) / (1.0 - ac)) * np.sqrt(1.0 - ac / nxt)
    xp = np if _is_static_number(eta) else jnp
    sigma = eta * sigma_unit
    dir_coef = xp.sqrt(xp.maximum(1.0 - nxt - sigma ** 2, 0.0))
    return make_table(ts, {**x0_coefficients(ac), "sqrt_ac_next": np.sqrt(nxt), "dir_coef": dir_coef,
                           "sigma": sigma})


def ddim_sample(model_fn: ModelFn, x_T: jax.Array, key: jax.Array, schedule: DiscreteSchedule, num_steps: int, *,
                eta: float | jax.Array = 0.0, clip_x0: float | None = None, return_trajectory: bool = False,
                progress: bool = False):
    """DDIM sampling (``eta = 0``: deterministic; ``eta = 1``: DDPM with β̃ variance).

    Args:
      model_fn: ``(x [B, C, ...], t int32 [B]) -> [B, C or 2C, ...]``.
      x_T: ``[B, C, ...]`` float, the initial noise.
      key: PRNG key; used only when ``eta`` is not a Python 0.
      schedule: the training schedule.
      num_steps: K (static).
      eta: stochasticity η ≥ 0 (Python float, or a traced scalar).
      clip_x0: clip x̂0 to ±clip_x0, or None.
    Returns:
      x_0 ``[B, C, ...]`` (``x_T.dtype``), and the trajectory dict if requested.
    """
    table = ddim_table(schedule, num_steps, eta)
    noisy = not (_is_static_number(eta) and eta == 0)

    def step(x, row):
        eps, _ = call_model(model_fn, x, row["t"])
        x0 = predict_x0(x, eps, row, clip_x0)
        if clip_x0 is not None:
            eps = (row["sqrt_recip_ac"] * x - x0) / row["sqrt_recipm1_ac"]
        x_next = row["sqrt_ac_next"] * x0 + row["dir_coef"] * eps
        if noisy:
            x_next = x_next + row["sigma"] * step_noise(key, row["step"], x.shape, x.dtype)
        return x_next.astype(x.dtype), x

    x0, traj = run_steps(step, x_T, table, return_trajectory=return_trajectory, progress=progress,
                         desc="sampling ddim")
    return (x0, traj) if return_trajectory else x0
