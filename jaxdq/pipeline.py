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
from jaxdq.quant.timestep import timestep_aware
from jaxdq.sampling import cfg_model_fn, linear_schedule, sample


@dataclasses.dataclass
class LoadedModel:
    config: Any
    params: dict
    metadata: dict

    @property
    def arch(self) -> str:
        """Model family (:data:`jaxdq.models.registry.ARCH_NAMES`); checkpoints before it was recorded are DiTs."""
        return self.metadata.get("arch", "dit")

    @property
    def module(self):
        if self.arch == "dit":
            return DiT(self.config)
        from jaxdq.models.registry import get_arch

        return get_arch(self.arch).module(self.config)

    def require_dit(self, what: str) -> None:
        if self.arch != "dit":
            raise ValueError(f"{what} runs class-conditional DiT models; this is a {self.arch!r} model "
                             "(use the family samplers in jaxdq.sampling.families from Python)")


def convert_model(path: str, arch: str = "dit", *, config: Optional[str] = None,
                  num_heads: Optional[int] = None) -> LoadedModel:
    """Convert a PyTorch checkpoint of model family ``arch`` (see :mod:`jaxdq.models.registry`)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if arch == "dit" and config is None:
        return load_model(path, num_heads=num_heads)
    from jaxdq.models.registry import convert_checkpoint

    kwargs = {"num_heads": num_heads} if num_heads and arch in ("dit", "pixart", "latte") else {}
    cfg, params = convert_checkpoint(arch, path, config, **kwargs)
    return LoadedModel(cfg, params, {"arch": arch, "method": "float", "bits": "W32A32",
                                     "source": os.path.abspath(path)})


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
        arch = meta.get("arch", "dit")
        if arch == "dit":
            return LoadedModel(DiTConfig(**meta["model"]), params, meta)
        from jaxdq.models.registry import get_arch

        return LoadedModel(get_arch(arch).config_from_dict(meta["model"]), params, meta)
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
        apply = timestep_aware(lambda p, x, t, yy: module.apply({"params": p}, x, t, yy), params)
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
              samples: bool = False, keep_inputs: bool = False, progress: bool = False) -> dict:
    """Per-timestep activation statistics of every Linear along the float model's own
    CFG trajectories, the conditional and null-class halves observed separately.

    Returns:
      ``{"t": [S] int32 timesteps, "cond": tree, "uncond": tree}``; every leaf of a
      branch has a leading ``[S]`` step axis (see :mod:`jaxdq.calibrate`).  With
      ``keep_inputs`` also ``"inputs": {"x": [S, N, C, H, W], "y": [N]}``, the
      trajectory the statistics came from (mixed precision measures on it).
    """
    from jaxdq.calibrate import collect_step_stats

    model.require_dit("calibrate")
    x_T, y = noise_and_labels(model.config, classes, per_class, seed)
    run = make_sampler(model.config, solver=solver, num_steps=num_steps, cfg_scale=cfg_scale,
                       return_trajectory=True, progress=progress)
    _, traj = run(model.params, x_T, y, jax.random.PRNGKey(seed + 1))
    steps, n = traj["x"].shape[0], y.shape[0]
    t = jnp.broadcast_to(traj["t"][:, None], (steps, n))
    out = {"t": np.asarray(traj["t"])}
    if keep_inputs:
        out["inputs"] = {"x": np.asarray(traj["x"]), "y": np.asarray(y)}
    for branch, labels in (("cond", y), ("uncond", jnp.full_like(y, model.config.num_classes))):
        inputs = {"x": traj["x"], "t": t, "y": jnp.broadcast_to(labels[None], (steps, n))}
        out[branch] = collect_step_stats(model.module.apply, model.params, inputs, samples=samples,
                                         progress=progress, label=f"calibrating ({branch})")
    return out


def quantize_model(model: LoadedModel, method: str, calib_per_class: int = 4, progress: bool = True,
                   calib: Optional[dict] = None, **kwargs) -> LoadedModel:
    """Apply a named recipe (``"float"`` = unchanged), calibrating first when it needs it
    (or using ``calib``, a :func:`calibrate` result, when given)."""
    from jaxdq.quant.recipes import method_bits, needs_calibration, quantize_method

    if method == "float":
        return model
    if model.metadata.get("method", "float") != "float":
        raise ValueError(f"model is already quantized ({model.metadata['method']}); give a float model")
    if calib is None and needs_calibration(method):
        calib = calibrate(model, classes=list(range(model.config.num_classes))[:10], per_class=calib_per_class,
                          samples=method.startswith("svdquant"), keep_inputs=method.startswith("vidit-q-mp"),
                          progress=progress)
    if model.arch != "dit":
        from jaxdq.models.registry import get_arch

        kwargs.setdefault("keep_float", get_arch(model.arch).keep_float)
    meta = dict(model.metadata, method=method, bits=method_bits(method))
    if method.startswith("vidit-q-mp"):
        kwargs.setdefault("per_segment", method == "vidit-q-mp")
        params, report = mixed_precision_params(model, calib, progress=progress, **kwargs)
        meta["mixed_precision"] = report
    else:
        params = quantize_method(method, model.params, calib, **kwargs)
    return LoadedModel(model.config, params, meta)


def mixed_precision_params(model: LoadedModel, calib: dict, *, budget_bits: float = 6.0, num_segments: int = 4,
                           low: int = 4, high: int = 8, act_bits: int = 8, steps_per_segment: int = 3,
                           max_samples: int = 16, per_segment: bool = True,
                           progress: bool = False) -> tuple[dict, dict]:
    """ViDiT-Q W{low}/{high}A{act_bits} with metric-decoupled timestep-segment mixed precision.

    Channel balancing as in :func:`jaxdq.quant.recipes.vidit_q`; then, per segment of
    the calibration trajectory (``calib["inputs"]``, from ``calibrate(keep_inputs=True)``),
    layer sensitivities and a greedy allocation under ``budget_bits`` average weight
    bits (:mod:`jaxdq.quant.mixed_precision`).  Layers whose bits differ between
    segments become :class:`jaxdq.quant.timestep.Segmented` nodes.
    Returns (params, report: per-segment promoted layers and bit accounting).
    """
    import re

    from jaxdq.models.dit import layer_roles
    from jaxdq.quant import mixed_precision as mp
    from jaxdq.quant.quantizer import QuantSpec, fake_quant
    from jaxdq.quant.recipes import DEFAULT_KEEP_FLOAT, dynamic_cfg, vidit_q_balance
    from jaxdq.quant.rules import get_path, is_float_linear, iter_linears, map_linears, quantize_linear
    from jaxdq.quant.timestep import Segmented, segment_bounds

    if calib is None or "inputs" not in calib:
        raise ValueError("mixed precision needs calibrate(..., keep_inputs=True)")
    bal = vidit_q_balance(model.params, calib)
    roles = layer_roles(model.config)
    paths = [p for p, l in iter_linears(bal) if is_float_linear(l)
             and not any(re.search(k, p) for k in DEFAULT_KEEP_FLOAT)]
    sizes = {p: int(np.prod(get_path(bal, p)["kernel"].shape)) for p in paths}
    metrics = {p: mp.metric_of(roles.get(p)) for p in paths}

    def deq(kernel, bits):
        return fake_quant(kernel, QuantSpec(bits=bits, granularity="channel"), kind="weight")

    low_k = {p: deq(get_path(bal, p)["kernel"], low) for p in paths}
    base = map_linears(bal, lambda p, l: dict(l, kernel=deq(l["kernel"], high)) if p in sizes else l)

    def swap(path):
        def make(tree):
            return map_linears(tree, lambda p, l: dict(l, kernel=low_k[p]) if p == path else l)
        return make

    module, null = model.module, model.config.num_classes
    x_all, y_all = jnp.asarray(calib["inputs"]["x"]), jnp.asarray(calib["inputs"]["y"])
    n = min(max_samples, y_all.shape[0])
    idx = np.linspace(0, y_all.shape[0] - 1, n).round().astype(int)
    ts = np.asarray(calib["t"])
    S = len(ts)
    bounds = segment_bounds(ts, num_segments)

    def outputs(params, x, t):
        """Cond and uncond ε ``[K, n, C, H, W]`` at K steps (params passed in, never closed over:
        closed-over arrays would be embedded in the program as constants)."""
        y, c = y_all[idx], model.config.in_channels

        def one(xk, tk):
            tt = jnp.full((n,), tk, jnp.int32)
            return (module.apply({"params": params}, xk, tt, y)[:, :c],
                    module.apply({"params": params}, xk, tt, jnp.full_like(y, null))[:, :c])

        return jax.vmap(one)(x, t)

    float_apply = jax.jit(outputs)

    @jax.jit
    def eval_fn(params, x, t, ref_c, ref_u):
        return mp.output_metrics(*outputs(params, x, t), ref_c, ref_u)

    promoted, seg_sens = [], []
    report = {"budget_bits": budget_bits, "low": low, "high": high, "segments": [], "per_segment": per_segment}
    for k in range(num_segments):
        lo_i, hi_i = round(k * S / num_segments), round((k + 1) * S / num_segments)
        steps = np.linspace(lo_i, hi_i - 1, min(steps_per_segment, hi_i - lo_i)).round().astype(int)
        x = x_all[steps][:, idx]
        t = jnp.asarray(ts[steps], jnp.int32)
        ref_c, ref_u = float_apply(model.params, x, t)
        ev = lambda params: eval_fn(params, x, t, ref_c, ref_u)
        sens = mp.layer_sensitivities(ev, base, {p: swap(p) for p in paths}, progress=progress)
        seg_sens.append(sens)
        chosen, acct = mp.allocate(sizes, metrics, sens, budget_bits, low, high)
        promoted.append(chosen)
        report["segments"].append({"steps": [int(lo_i), int(hi_i)], "promoted": sorted(chosen),
                                   "avg_bits": acct["used"] / sum(sizes.values()),
                                   "sensitivity": {p: sens[p] for p in paths}})
    if not per_segment:
        total = {p: {k: sum(s[p][k] for s in seg_sens) for k in seg_sens[0][p]} for p in paths}
        chosen, acct = mp.allocate(sizes, metrics, total, budget_bits, low, high)
        promoted = [chosen] * num_segments
        report["static"] = {"promoted": sorted(chosen), "avg_bits": acct["used"] / sum(sizes.values())}

    cfg_lo, cfg_hi = dynamic_cfg(low, act_bits), dynamic_cfg(high, act_bits)

    def build(path, layer):
        if path not in sizes:
            return layer
        index = tuple(int(path in ch) for ch in promoted)
        if all(index):
            return {"qlinear": quantize_linear(layer, cfg_hi)}
        if not any(index):
            return {"qlinear": quantize_linear(layer, cfg_lo)}
        return Segmented(variants=({"qlinear": quantize_linear(layer, cfg_lo)},
                                   {"qlinear": quantize_linear(layer, cfg_hi)}), index=index, bounds=bounds)

    return map_linears(bal, build), report


def weight_bytes(params: Mapping) -> int:
    from jaxdq.quant.qlinear import nbytes

    return nbytes(params)
