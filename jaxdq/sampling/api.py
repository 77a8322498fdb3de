"""``sample``: one entry point over the solvers."""
from __future__ import annotations

import jax
import numpy as np

from jaxdq.sampling.core import ModelFn
from jaxdq.sampling.ddim import ddim_sample
from jaxdq.sampling.ddpm import ddpm_sample
from jaxdq.sampling.dpm_solver import dpmpp_2m_sample
from jaxdq.sampling.schedule import DiscreteSchedule

SOLVERS = {"ddim": ddim_sample, "ddpm": ddpm_sample, "dpm++2m": dpmpp_2m_sample}


def sample(model_fn: ModelFn, x_T: jax.Array, key: jax.Array, *, schedule: DiscreteSchedule, solver: str = "ddim",
           num_steps: int = 50, eta: float | jax.Array = 0.0, clip_x0: float | None = None,
           return_trajectory: bool = False, progress: bool = False):
    """Run a diffusion sampler from ``x_T`` as one ``lax.scan`` (jit-able; ``solver``,
    ``num_steps``, ``clip_x0``, ``return_trajectory`` and ``progress`` are static).

    Args:
      model_fn: ``(x_t [B, C, ...] float32, t int32 [B]) -> [B, C, ...]`` (ε) or
        ``[B, 2C, ...]`` (ε, learned-sigma v).
      x_T: ``[B, C, ...]`` float32, the initial noise.
      key: PRNG key for the per-step noise (``ddpm``, ``ddim`` with eta > 0):
        step k draws ``jax.random.normal(jax.random.fold_in(key, k), x_T.shape)``.
      schedule: the training noise schedule.
      solver: ``"ddim"``, ``"ddpm"`` or ``"dpm++2m"``.
      num_steps: K, the number of model calls (timesteps from
        :func:`jaxdq.sampling.select_timesteps`).
      eta: DDIM stochasticity; must be 0 for other solvers.
      clip_x0: clip the predicted x0 to ±clip_x0 at every step, or None.
      return_trajectory: also return ``{"x": [K, B, C, ...] the model input at
        every step (``x[0]`` is x_T), "t": [K] int32 its timesteps}``.
      progress: draw a progress bar on stderr as steps complete.
    Returns:
      x_0 ``[B, C, ...]`` in ``x_T.dtype``, or ``(x_0, trajectory)``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    kwargs = dict(clip_x0=clip_x0, return_trajectory=return_trajectory, progress=progress)
    if solver == "ddim":
        kwargs["eta"] = eta
    elif not (isinstance(eta, (int, float, np.number)) and eta == 0):
        raise ValueError(f"eta applies to the ddim solver only, got eta={eta!r} for {solver!r}")
    return SOLVERS[solver](model_fn, x_T, key, schedule, num_steps, **kwargs)
