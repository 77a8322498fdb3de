"""Diffusion samplers (DDPM, DDIM, DPM-Solver++(2M)) run as one jit-able ``lax.scan``.

``sample(model_fn, x_T, key, schedule=linear_schedule(), solver="ddim", num_steps=50)``
is the entry point; ``cfg_model_fn`` wraps a class-conditional network with
classifier-free guidance.
Flow matching (FLUX): ``flow_euler_sample`` with ``flux_sigmas``; ``flux_velocity_fn`` wraps a FLUX
net (distilled guidance or true CFG).  Text-conditioned families: :mod:`jaxdq.sampling.families`.  See :mod:`jaxdq.sampling.core` for the model convention.
"""
from jaxdq.sampling.api import SOLVERS, sample
from jaxdq.sampling.core import step_noise
from jaxdq.sampling.ddim import ddim_sample
from jaxdq.sampling.ddpm import ddpm_sample
from jaxdq.sampling.flow import flow_euler_sample, flux_shift_mu, flux_sigmas, flux_velocity_fn
from jaxdq.sampling.dpm_solver import dpmpp_2m_sample
from jaxdq.sampling.guidance import cfg_model_fn
from jaxdq.sampling.progress import ProgressBar, scan_progress
from jaxdq.sampling.schedule import (DiscreteSchedule, linear_schedule, scaled_linear_schedule,
                                     select_timesteps)

__all__ = ["DiscreteSchedule", "ProgressBar", "SOLVERS", "cfg_model_fn", "ddim_sample", "ddpm_sample",
           "dpmpp_2m_sample", "flow_euler_sample", "flux_shift_mu", "flux_sigmas", "flux_velocity_fn", "linear_schedule", "sample", "scaled_linear_schedule", "scan_progress",
           "select_timesteps", "step_noise"]
