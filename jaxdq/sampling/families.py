"""Jitted end-to-end samplers of the text-conditioned families, with their training schedules.

=========  =====================================  ==========================================
family     schedule                               default solver / guidance
=========  =====================================  ==========================================
PixArt     linear β 1e-4 … 0.02, 1000 steps       DPM-Solver++(2M) 20 steps, CFG 4.5
SD / LDM   scaled-linear β 0.00085 … 0.012        DDIM 50 steps (or DPM++), CFG 7.5
Latte      linear β 1e-4 … 0.02                   DDIM 50 steps, CFG 7.5
FLUX.1     flow matching, resolution-shifted σ    Euler 28 steps, distilled guidance 3.5
=========  =====================================  ==========================================

Every sampler returns ``f(params, x_T, cond..., key) -> x_0`` under ``jax.jit``; params may be
float or quantized (time-dependent quantized layers are resolved per step, as in
:func:`jaxdq.pipeline.make_sampler`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp

from jaxdq.quant.timestep import timestep_aware
from jaxdq.sampling.api import sample
from jaxdq.sampling.schedule import linear_schedule, scaled_linear_schedule


def text_cfg_model_fn(apply_fn: Callable[..., jax.Array], cond: tuple, uncond: tuple, scale: float | jax.Array,
                      out_channels: Optional[int] = None) -> Callable:
    """Classifier-free guidance over text conditioning, in one call on the doubled batch.

    Args:
      apply_fn: ``(x [2B, C, ...], t [2B], *conditioning) -> [2B, C or 2C, ...]``.
      cond, uncond: tuples of conditioning arrays with leading batch ``B`` (e.g. T5 states
        ``[B, L, D]`` and masks ``[B, L]``); ``uncond`` is the empty prompt's.
      scale: guidance scale; ``ε = ε_u + scale (ε_c − ε_u)`` on the first ``C`` channels.
      out_channels: C, the ε channels (the rest, e.g. learned variance, come from the cond half).
    """

    def model_fn(x, t):
        b, c = x.shape[0], out_channels or x.shape[1]
        args = [jnp.concatenate([a, u.astype(a.dtype)]) for a, u in zip(cond, uncond)]
        out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), *args)
        oc, ou = out[:b], out[b:]
        eps = ou[:, :c] + scale * (oc[:, :c] - ou[:, :c])
        return jnp.concatenate([eps.astype(out.dtype), oc[:, c:]], axis=1)

    return model_fn


def _text_transformer_sampler(module, solver: str, num_steps: int, cfg_scale: float, progress: bool):
    """Shared by PixArt and Latte: ``f(params, x_T, states, mask, null_states, null_mask, key)``
    over the linear β schedule, ε on the first ``x_T.shape[1]`` output channels."""
    schedule = linear_schedule()

    @jax.jit
    def run(params, x_T, states, mask, null_states, null_mask, key):
        apply = timestep_aware(lambda p, x, t, s, m: module.apply({"params": p}, x, t, s, m), params)
        fn = text_cfg_model_fn(apply, (states, mask), (null_states, null_mask), cfg_scale, x_T.shape[1])
        return sample(fn, x_T, key, schedule=schedule, solver=solver, num_steps=num_steps, progress=progress)

    return run


def pixart_sampler(config, *, solver: str = "dpm++2m", num_steps: int = 20, cfg_scale: float = 4.5,
                   progress: bool = False):
    """``f(params, x_T [B,4,H,W], states [B,L,D], mask [B,L], null_states, null_mask, key) -> x_0``."""
    from jaxdq.models.pixart import PixArt

    return _text_transformer_sampler(PixArt(config), solver, num_steps, cfg_scale, progress)


def sd_sampler(config, *, solver: str = "ddim", num_steps: int = 50, cfg_scale: float = 7.5,
               progress: bool = False):
    """Stable Diffusion / LDM UNet: ``f(params, x_T [B,4,h,w], states [B,77,768], null_states, key) -> z_0``
    (decode with :func:`jaxdq.models.vae.vae_decode` after dividing by the VAE scaling factor)."""
    from jaxdq.models.unet import UNet

    module, schedule = UNet(config), scaled_linear_schedule()

    @jax.jit
    def run(params, x_T, states, null_states, key):
        apply = timestep_aware(lambda p, x, t, s: module.apply({"params": p}, x, t, s), params)
        fn = text_cfg_model_fn(apply, (states,), (null_states,), cfg_scale)
        return sample(fn, x_T, key, schedule=schedule, solver=solver, num_steps=num_steps, progress=progress)

    return run


def ddpm_unet_sampler(config, *, solver: str = "ddim", num_steps: int = 50, progress: bool = False):
    """Unconditional DDPM UNet (linear β): ``f(params, x_T [B,3,H,W], key) -> x_0``."""
    from jaxdq.models.unet import UNet

    module, schedule = UNet(config), linear_schedule()

    @jax.jit
    def run(params, x_T, key):
        apply = timestep_aware(lambda p, x, t: module.apply({"params": p}, x, t), params)
        return sample(apply, x_T, key, schedule=schedule, solver=solver, num_steps=num_steps, progress=progress)

    return run


def latte_sampler(config, *, solver: str = "ddim", num_steps: int = 50, cfg_scale: float = 7.5,
                  progress: bool = False):
    """``f(params, x_T [B,4,F,H,W], states, mask, null_states, null_mask, key) -> x_0``."""
    from jaxdq.models.latte import Latte

    return _text_transformer_sampler(Latte(config), solver, num_steps, cfg_scale, progress)


def flux_sampler(config, *, height: int, width: int, num_steps: int = 28, guidance: Optional[float] = 3.5,
                 progress: bool = False):
    """FLUX.1: ``f(params, x_T [B,C,h,w] latents, txt [B,T,J], pooled [B,P]) -> latents``
    (flow-matching Euler over :func:`jaxdq.sampling.flow.flux_sigmas`; ``guidance`` is the
    distilled guidance input of FLUX.1-dev, None for schnell)."""
    from jaxdq.models.flux import Flux, image_ids, pack_latents, text_ids, unpack_latents
    from jaxdq.sampling.flow import flow_euler_sample, flux_sigmas, flux_velocity_fn

    module = Flux(config)
    seq = (height // 2) * (width // 2)
    sigmas = jnp.asarray(flux_sigmas(num_steps, seq), jnp.float32)
    img_ids = jnp.asarray(image_ids(height, width))

    @jax.jit
    def run(params, x_T, txt, pooled):
        # timestep_aware wants (params, x, t, ...); Flux takes (img, txt, pooled, timestep, img_ids, txt_ids, g)
        apply = timestep_aware(lambda p, img, ts, tx, po, ii, ti, g: module.apply(
            {"params": p}, img, tx, po, ts, ii, ti, g), params)
        net = lambda img, tx, po, ts, ii, ti, g: apply(img, ts, tx, po, ii, ti, g)  # noqa: E731
        v = flux_velocity_fn(net, txt, pooled, img_ids, jnp.asarray(text_ids(txt.shape[1])), guidance=guidance)
        out = flow_euler_sample(v, pack_latents(x_T), sigmas=sigmas, progress=progress)
        return unpack_latents(out, height, width)

    return run
