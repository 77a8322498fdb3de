"""Quantization recipes: a few lines each, over the transforms in jaxdq.quant.

Every recipe keeps the layers matched by ``keep_float`` (by default the model's
first and last layers, as is customary in diffusion PTQ) in floating point.
Recipes that need calibration take the result of :func:`jaxdq.pipeline.calibrate`
(``{"t", "cond", "uncond"}``, per-timestep statistics) and pool what they need.

Families (``quantize_method("<family>-w<b>a<b>", ...)``):

=============  ==============================================================
``naive``      per-tensor weights, static per-tensor min-max activations
               (one range over all timesteps and both CFG halves)
``qdiffusion`` per-channel weights, static per-tensor activations with one
               range per calibration timestep (Q-Diffusion-style timestep-aware
               calibration, without its BRECQ weight reconstruction)
``smoothquant`` SmoothQuant (α=0.5) + per-channel weights + static per-tensor
               activations
``quarot``     online Hadamard rotation + per-channel weights + dynamic
               per-token activations (QuaRot with round-to-nearest weights)
``dynamic``    per-channel weights + dynamic per-token activations (ViDiT-Q's
               fine-grained grouping alone)
``vidit-q``    ViDiT-Q: fine-grained grouping, dynamic per-token activations,
               static-dynamic channel balancing (smoothing α then Hadamard)
``vidit-q-mp`` ViDiT-Q + metric-decoupled timestep-segment mixed precision
               (weights 4/8 bit per segment, see :mod:`jaxdq.quant.mixed_precision`);
               layers whose bits change between segments store both variants
``vidit-q-mp-static`` the same allocation made once for all timesteps
               (sensitivities summed over segments): one variant per layer,
               so the budget is also the memory
=============  ==============================================================
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Optional

import jax
import jax.numpy as jnp

from jaxdq.quant.hadamard import rotate_params
from jaxdq.quant.quantizer import QuantSpec, compute_qparams
from jaxdq.quant.rules import LayerQuant, Rule, get_path, is_quantized_linear, map_linears, quantize_params
from jaxdq.quant.smooth import smooth_params

# Patch embedding and final projection of the DiT family.
DEFAULT_KEEP_FLOAT = (r"(^|/)x_embedder(/|$)", r"(^|/)final_layer/linear$")
SMOOTH_ALPHA = 0.5


def _keep(keep_float: Sequence[str]) -> list[Rule]:
    return [Rule(p, None) for p in keep_float]


def _selector(keep_float: Sequence[str]):
    return lambda path: not any(re.search(p, path) for p in keep_float)


def _pooled(calib: Optional[Mapping], method: str) -> dict:
    """Pooled statistics from a calibration result (already-pooled stats pass through)."""
    from jaxdq.calibrate import pool_stats

    if calib is None:
        raise ValueError(f"method {method!r} needs calibration statistics (jaxdq.pipeline.calibrate)")
    return pool_stats(calib) if "cond" in calib else dict(calib)


def dynamic_cfg(weight_bits: int, act_bits: int, impl: str = "fake") -> LayerQuant:
    """Per-output-channel symmetric weights (4-bit packed), dynamic per-token symmetric activations."""
    return LayerQuant(weight=QuantSpec(bits=weight_bits, granularity="channel"),
                      act=QuantSpec(bits=act_bits, granularity="token"), pack=weight_bits <= 4, impl=impl)


def w8a8_dynamic(params: Mapping, *, weight_bits: int = 8, act_bits: int = 8,
                 keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT, impl: str = "fake") -> dict:
    """ViDiT-Q's fine-grained grouping: per-output-channel symmetric weights, dynamic
    per-token symmetric activations (range recomputed at every call, so every
    timestep and CFG branch gets its own)."""
    return quantize_params(params, _keep(keep_float) + [Rule(".*", dynamic_cfg(weight_bits, act_bits, impl))])


def naive_static(params: Mapping, calib: Mapping, *, weight_bits: int = 8, act_bits: int = 8,
                 keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT) -> dict:
    """The naive contrast: per-tensor symmetric min-max weights and per-tensor static
    asymmetric min-max activations, one range over all timesteps and both CFG
    halves of the calibration run."""
    cfg = LayerQuant(weight=QuantSpec(bits=weight_bits, granularity="tensor"),
                     act=QuantSpec(bits=act_bits, symmetric=False, granularity="tensor"),
                     act_static=True, pack=weight_bits <= 4)
    return quantize_params(params, _keep(keep_float) + [Rule(".*", cfg)], stats=_pooled(calib, "naive"))


def qdiffusion(params: Mapping, calib: Mapping, *, weight_bits: int = 8, act_bits: int = 8,
               keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT) -> dict:
    """Per-channel weights; static per-tensor asymmetric activations with one (s, z) per
    calibration timestep (both CFG halves pooled), resolved at sampling time by
    :func:`jaxdq.quant.timestep.at_timestep`."""
    if calib is None or "t" not in calib:
        raise ValueError("method 'qdiffusion' needs per-timestep calibration (jaxdq.pipeline.calibrate)")
    from jaxdq.calibrate import pool_stats

    aspec = QuantSpec(bits=act_bits, symmetric=False, granularity="tensor")
    cfg = LayerQuant(weight=QuantSpec(bits=weight_bits, granularity="channel"), act=aspec,
                     act_static=True, pack=weight_bits <= 4)
    q = quantize_params(params, _keep(keep_float) + [Rule(".*", cfg)], stats=pool_stats(calib))
    steps = len(calib["t"])
    per_step = [pool_stats(calib, steps=[k]) for k in range(steps)]

    def per_t(path, layer):
        if not is_quantized_linear(layer):
            return layer
        lo = jnp.asarray([jnp.minimum(get_path(s, path)["min"], 0.0) for s in per_step])
        hi = jnp.asarray([jnp.maximum(get_path(s, path)["max"], 0.0) for s in per_step])
        scale, zero = jax.vmap(lambda a, b: compute_qparams(jnp.stack([a, b]), aspec, kind="activation"))(lo, hi)
        node = dataclasses.replace(layer["qlinear"], act_scale=scale, act_zero=zero,
                                   act_t=jnp.asarray(calib["t"], jnp.int32))
        return {"qlinear": node}

    return map_linears(q, per_t)


def smoothquant(params: Mapping, calib: Mapping, *, weight_bits: int = 8, act_bits: int = 8,
                alpha: float = SMOOTH_ALPHA, keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT) -> dict:
    """SmoothQuant: smoothing with α, per-channel weights, static per-tensor symmetric
    activations whose range is that of the smoothed input, ``max_j absmax_j / λ_j``."""
    stats = _pooled(calib, "smoothquant")
    sm = smooth_params(params, stats, alpha, _selector(keep_float))

    def smoothed_stats(path, layer):
        s = get_path(stats, path)
        if "smooth" not in layer:
            return s
        m = jnp.max(jnp.asarray(s["absmax"]) / layer["smooth"])
        return dict(s, min=-m, max=m)

    from jaxdq.quant.rules import iter_linears

    sstats: dict = {}
    for path, layer in iter_linears(sm):
        node = sstats
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = smoothed_stats(path, layer)
    cfg = LayerQuant(weight=QuantSpec(bits=weight_bits, granularity="channel"),
                     act=QuantSpec(bits=act_bits, granularity="tensor"), act_static=True, pack=weight_bits <= 4)
    return quantize_params(sm, _keep(keep_float) + [Rule(".*", cfg)], stats=sstats)


def quarot(params: Mapping, *, weight_bits: int = 8, act_bits: int = 8,
           keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT) -> dict:
    """QuaRot-style: online (block) Hadamard rotation of every quantized layer's input,
    per-channel round-to-nearest weights, dynamic per-token activations."""
    rot = rotate_params(params, _selector(keep_float))
    return quantize_params(rot, _keep(keep_float) + [Rule(".*", dynamic_cfg(weight_bits, act_bits))])


def vidit_q_balance(params: Mapping, calib: Mapping, *, alpha: float = SMOOTH_ALPHA,
                    keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT) -> dict:
    """ViDiT-Q's static-dynamic channel balancing as a float-equivalent transform:
    static smoothing (α, from calibration) then online Hadamard rotation."""
    stats = _pooled(calib, "vidit-q")
    sel = _selector(keep_float)
    return rotate_params(smooth_params(params, stats, alpha, sel), sel)


def vidit_q(params: Mapping, calib: Mapping, *, weight_bits: int = 8, act_bits: int = 8,
            alpha: float = SMOOTH_ALPHA, keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
            impl: str = "fake") -> dict:
    """ViDiT-Q: channel balancing, per-channel weights, dynamic per-token activations."""
    bal = vidit_q_balance(params, calib, alpha=alpha, keep_float=keep_float)
    return quantize_params(bal, _keep(keep_float) + [Rule(".*", dynamic_cfg(weight_bits, act_bits, impl))])


def weight_only(params: Mapping, *, bits: int = 8, group_size: Optional[int] = None,
                keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT) -> dict:
    """W{bits}A16: per-channel (or per-group) symmetric weights, float activations;
    4-bit codes are packed two per byte."""
    spec = (QuantSpec(bits=bits, granularity="group", group_size=group_size) if group_size
            else QuantSpec(bits=bits, granularity="channel"))
    cfg = LayerQuant(weight=spec, act=None, pack=bits <= 4)
    return quantize_params(params, _keep(keep_float) + [Rule(".*", cfg)])


FAMILIES = {
    "naive": "per-tensor weights, static per-tensor min-max activations",
    "qdiffusion": "per-channel weights, static per-tensor activations per timestep",
    "smoothquant": "SmoothQuant α=0.5, per-channel weights, static per-tensor activations",
    "quarot": "Hadamard rotation, per-channel weights, dynamic per-token activations",
    "dynamic": "per-channel weights, dynamic per-token activations",
    "vidit-q": "ViDiT-Q: smoothing + Hadamard, per-channel weights, dynamic per-token activations",
    "vidit-q-mp": "ViDiT-Q + metric-decoupled timestep-segment mixed precision (W4/W8, A8)",
    "vidit-q-mp-static": "ViDiT-Q + metric-decoupled mixed precision, one allocation for all timesteps (W4/W8, A8)",
}
MIXED = ("vidit-q-mp", "vidit-q-mp-static")
CALIBRATED = {"naive", "qdiffusion", "smoothquant", "vidit-q", "vidit-q-mp", "vidit-q-mp-static", "svdquant"}

# Legacy short names.
METHODS = {
    "w8a8": "W8A8: per-channel weights, dynamic per-token activations (ViDiT-Q baseline)",
    "w4a8": "W4A8: per-channel 4-bit packed weights, dynamic per-token 8-bit activations",
    "naive": "W8A8 naive: per-tensor weights, static per-tensor min-max activations",
    "w8a16": "weight-only 8-bit, per-channel",
    "w4a16": "weight-only 4-bit, per-group 64, packed",
}
METHODS.update({f"{f}-w{w}a8": f"W{w}A8 {d}" for f, d in FAMILIES.items() if f not in MIXED for w in (8, 4)})
METHODS.update({f: "W4/8 A8 " + FAMILIES[f] for f in MIXED})

METHODS["svdquant"] = ("SVDQuant W4A4: smoothing (α searched) + rank-32 fp16 low-rank + INT4 group-64 weights, "
                       "dynamic 4-bit group-64 activations")
METHODS["svdquant-w4a8"] = "SVDQuant W4A8 (per-token 8-bit activations)"
METHODS["svdquant-w8a8"] = "SVDQuant W8A8 (rank 16, per-channel weights, per-token activations)"
_SVDQ = {"svdquant": (4, 4), "svdquant-w4a4": (4, 4), "svdquant-w4a8": (4, 8), "svdquant-w8a8": (8, 8)}

_ALIASES = {"w8a8": "dynamic-w8a8", "w4a8": "dynamic-w4a8", "naive": "naive-w8a8"}


def parse_method(method: str) -> tuple[str, int, int]:
    """``"vidit-q-w4a8"`` → ``("vidit-q", 4, 8)``; legacy names resolve through aliases."""
    name = _ALIASES.get(method, method)
    if name in MIXED:
        return name, 4, 8
    m = re.fullmatch(r"(.+)-w(\d+)a(\d+)", name)
    if not m or m.group(1) not in FAMILIES or m.group(1) in MIXED:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return m.group(1), int(m.group(2)), int(m.group(3))


def method_bits(method: str) -> str:
    """WxAy label of a method's quantized layers."""
    if method in ("w8a16", "w4a16"):
        return method.upper()
    if method in _SVDQ:
        return "W%dA%d" % _SVDQ[method]
    fam, w, a = parse_method(method)
    return "W4/8A8" if fam in MIXED else f"W{w}A{a}"


def needs_calibration(method: str) -> bool:
    if method in ("w8a16", "w4a16", "float"):
        return False
    if method in _SVDQ:
        return True
    return parse_method(method)[0] in CALIBRATED


def quantize_method(method: str, params: Mapping, calib: Optional[Mapping] = None, **kwargs) -> dict:
    """Apply a recipe by name (see :data:`METHODS`); ``kwargs`` go to the recipe."""
    if method == "w8a16":
        return weight_only(params, bits=8, **kwargs)
    if method == "w4a16":
        return weight_only(params, bits=4, group_size=64, **kwargs)
    if method in _SVDQ:
        from jaxdq.quant.svdquant import svdquant

        wb, ab = _SVDQ[method]
        return svdquant(params, _pooled(calib, method), weight_bits=wb, act_bits=ab,
                        **{"rank": 16 if wb == 8 else 32, **kwargs})
    fam, wb, ab = parse_method(method)
    if fam == "dynamic":
        return w8a8_dynamic(params, weight_bits=wb, act_bits=ab, **kwargs)
    if fam == "quarot":
        return quarot(params, weight_bits=wb, act_bits=ab, **kwargs)
    if calib is None:
        raise ValueError(f"method {method!r} needs calibration statistics")
    if fam == "naive":
        return naive_static(params, calib, weight_bits=wb, act_bits=ab, **kwargs)
    if fam == "qdiffusion":
        return qdiffusion(params, calib, weight_bits=wb, act_bits=ab, **kwargs)
    if fam == "smoothquant":
        return smoothquant(params, calib, weight_bits=wb, act_bits=ab, **kwargs)
    if fam == "vidit-q":
        return vidit_q(params, calib, weight_bits=wb, act_bits=ab, **kwargs)
    raise ValueError(f"method {method!r} needs the model (use jaxdq.pipeline.quantize_model)")
