"""Model sources, sampling and calibration glue shared by the CLI, examples and benches.

A *model source* is one of:
  ``"default"``            the shipped digits DiT;
  a jaxdq checkpoint dir   written by :func:`jaxdq.checkpoint.save` (float or quantized);
  a PyTorch checkpoint     ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` or a diffusers
                           folder, converted on the fly (DiT layouts).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdq import checkpoint
from jaxdq.models.dit import DiT, DiTConfig
from jaxdq.sampling import cfg_model_fn, linear_schedule, sample


@dataclasses.dataclass
class LoadedModel:
    config: DiTConfig
    params: dict
    metadata: dict

    @property
    def module(self) -> DiT:
        return DiT(self.config)


class ModelSourceError(ValueError):
    """A model argument that names nothing jaxdq can load."""


def load_model(source: str = "default", *, num_heads: Optional[int] = None) -> LoadedModel:
    """Resolve a model source (see module docstring) to config + params."""
    if source == "default":
        from jaxdq.models.default import load_default

        cfg, params = load_default()
        return LoadedModel(cfg, params, {"method": "float", "bits": "W32A32", "source": "default"})
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "meta")):
        params, meta = checkpoint.load(source)
        return LoadedModel(DiTConfig(**meta["model"]), params, meta)
    if os.path.exists(source):
        from converters import convert_dit, load_state_dict

        cfg, params = convert_dit(load_state_dict(source), num_heads=num_heads)
        return LoadedModel(cfg, params, {"method": "float", "bits": "W32A32", "source": os.path.abspath(source)})
    raise ModelSourceError(f"unknown model {source!r}: give 'default', a jaxdq checkpoint directory, "
                           "or a PyTorch DiT checkpoint (.safetensors/.pt/.pth/.bin or a diffusers folder)")


def save_model(path: str, model: LoadedModel, **metadata: Any) -> str:
    meta = {k: v for k, v in model.metadata.items() if k not in ("layers", "jaxdq_version", "format_version")}
    meta.update(metadata, model=dataclasses.asdict(model.config))
    return checkpoint.save(path, model.params, metadata=meta, force=True)


def make_sampler(config: DiTConfig, *, solver: str = "ddim", num_steps: int = 50,
                 cfg_scale: float = 4.0, return_trajectory: bool = False, progress: bool = False):
    """``jit``-ed ``f(params, x_T [N,C,H,W], y [N], key) -> x_0`` (and trajectory)."""
    module = DiT(config)
    schedule = linear_schedule()

    @jax.jit
    def run(params, x_T, y, key):
        apply = lambda x, t, yy: module.apply({"params": params}, x, t, yy)
        model_fn = cfg_model_fn(apply, y, config.num_classes, cfg_scale)
        return sample(model_fn, x_T, key, schedule=schedule, solver=solver, num_steps=num_steps,
                      return_trajectory=return_trajectory, progress=progress)

    return run


def noise_and_labels(config: DiTConfig, classes: list[int], per_class: int, seed: int):
    """Fixed initial noise ``[N, C, H, W]`` and labels ``[N]`` (class-major order)."""
    y = jnp.repeat(jnp.asarray(classes, jnp.int32), per_class)
    shape = (y.shape[0], config.in_channels, config.input_size, config.input_size)
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32), y


def calibrate(model: LoadedModel, *, classes: list[int], per_class: int = 4, seed: int = 1234,
              solver: str = "ddim", num_steps: int = 50, cfg_scale: float = 4.0,
              progress: bool = False) -> dict:
    """Activation statistics of every Linear along the float model's own CFG trajectories.

    Both CFG halves (conditional and null-class) are observed, as the model is
    called on them at sampling time.
    """
    from jaxdq.calibrate import collect_act_stats

    x_T, y = noise_and_labels(model.config, classes, per_class, seed)
    run = make_sampler(model.config, solver=solver, num_steps=num_steps, cfg_scale=cfg_scale,
                       return_trajectory=True, progress=progress)
    _, traj = run(model.params, x_T, y, jax.random.PRNGKey(seed + 1))
    steps = traj["x"].shape[0]
    null = jnp.full_like(y, model.config.num_classes)
    inputs = {
        "x": jnp.concatenate([traj["x"], traj["x"]], axis=1),
        "t": jnp.broadcast_to(traj["t"][:, None], (steps, 2 * y.shape[0])),
        "y": jnp.broadcast_to(jnp.concatenate([y, null])[None], (steps, 2 * y.shape[0])),
    }
    return collect_act_stats(model.module.apply, model.params, inputs, progress=progress)


def quantize_model(model: LoadedModel, method: str, calib_per_class: int = 4, progress: bool = True) -> LoadedModel:
    """Apply a named recipe (``"float"`` = unchanged), calibrating first when it is static."""
    from jaxdq.quant.recipes import METHOD_BITS, quantize_method

    if method == "float":
        return model
    if model.metadata.get("method", "float") != "float":
        raise ValueError(f"model is already quantized ({model.metadata['method']}); give a float model")
    stats = None
    if method == "naive":
        stats = calibrate(model, classes=list(range(model.config.num_classes))[:10],
                          per_class=calib_per_class, progress=progress)
    params = quantize_method(method, model.params, stats)
    return LoadedModel(model.config, params, dict(model.metadata, method=method, bits=METHOD_BITS[method]))


def weight_bytes(params: Mapping) -> int:
    from jaxdq.quant.qlinear import nbytes

    return nbytes(params)
