"""Quantization recipes as records in one registry.

A :class:`Recipe` is a name, a bits label, a description, the calibration statistics it
needs (:class:`Needs`) and a build function ``build(params, ctx) -> (params, report)``
composed of the pure transforms in :mod:`jaxdq.quant` (a few lines each).  Every recipe
selects layers by role tag, so it applies to every model family; the first and last layers
(roles ``embedding`` and ``final``) stay float in all of them, as is customary in
diffusion PTQ.  ``get_recipe(name)`` resolves names and aliases; :data:`RECIPES` lists them.

=====================  ==========================================================
``naive-wXa8``         per-tensor weights, static per-tensor min-max activations
                       (one range over all timesteps and both CFG halves)
``qdiffusion-wXa8``    per-channel weights, static per-tensor activations with one
                       range per calibration timestep (Q-Diffusion-style timestep
                       calibration, without its BRECQ weight reconstruction)
``smoothquant-wXa8``   SmoothQuant (α=0.5) + per-channel weights + static per-tensor
                       activations
``quarot-wXa8``        online Hadamard rotation + per-channel weights + dynamic
                       per-token activations (QuaRot with round-to-nearest weights)
``dynamic-wXa8``       per-channel weights + dynamic per-token activations (ViDiT-Q's
                       fine-grained grouping alone)
``vidit-q-wXa8``       ViDiT-Q: grouping, dynamic activations, static-dynamic channel
                       balancing (smoothing α then Hadamard)
``vidit-q-mp``         ViDiT-Q + metric-decoupled timestep-segment mixed precision
                       (W4/W8 per segment); layers whose bits change store both
``vidit-q-mp-static``  the same allocation made once for all timesteps
``svdquant``           SVDQuant W4A4 (α searched, rank-32 fp16 branch, INT4 g64);
                       ``svdquant-w4a8``, ``svdquant-w8a8`` variants
``w8a16``, ``w4a16``   weight-only, per channel / per group of 64 (packed)
=====================  ==========================================================
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Optional

from jaxdq.quant import mixed_precision as mp
from jaxdq.quant.layers import get_path, iter_layers, map_layers, set_path, static_act_quant
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import LayerQuant, Rule, keep_float, quantize_params, selected
from jaxdq.quant.svdquant import svdquant
from jaxdq.quant.transforms import rotate_params, smooth_params, smoothed_range

SMOOTH_ALPHA = 0.5


@dataclasses.dataclass(frozen=True)
class Needs:
    """Calibration a recipe needs: pooled per-layer ``stats``; ``per_step`` statistics
    (one set per calibration timestep); stored input token ``samples``; the calibration
    ``trajectory`` itself (mixed precision evaluates the model on it)."""

    stats: bool = False
    per_step: bool = False
    samples: bool = False
    trajectory: bool = False

    @property
    def any(self) -> bool:
        return self.stats or self.per_step or self.samples or self.trajectory

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(*(a or b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclasses.dataclass
class Context:
    """What a recipe's build function gets besides the params.

    roles: path → role tag of the model's linears.
    calib: a calibration result (:func:`jaxdq.calibrate.calibrate`): ``{"t", "cond",
      "uncond"?, "inputs"?}`` (per-step statistics per CFG branch), or None.
    eps: one float network call ``eps(params, x, t, **cond)`` returning the ε (or velocity)
      prediction in x's layout (mixed precision evaluates sensitivities with it).
    options: the recipe's keyword options (e.g. ``budget_bits`` of mixed precision).
    """

    roles: Mapping[str, str]
    calib: Optional[Mapping] = None
    eps: Optional[Callable] = None
    options: Mapping = dataclasses.field(default_factory=dict)
    progress: bool = False

    def pooled(self, name: str, steps=None) -> dict:
        """Statistics pooled over both CFG branches and all (or the given) calibration steps."""
        from jaxdq.calibrate import pool_stats

        if self.calib is None:
            raise ValueError(f"recipe {name!r} needs calibration statistics (jaxdq.calibrate.calibrate)")
        return pool_stats(self.calib, steps=steps)


Build = Callable[[Mapping, Context], tuple[dict, dict]]


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    bits: str
    description: str
    build: Build
    needs: Needs = Needs()


RECIPES: dict[str, Recipe] = {}
ALIASES = {"w8a8": "dynamic-w8a8", "w4a8": "dynamic-w4a8", "naive": "naive-w8a8"}


def register(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES or recipe.name in ALIASES:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (or an alias of it); ValueError listing every name."""
    recipe = RECIPES.get(ALIASES.get(name, name))
    if recipe is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(method_names())}")
    return recipe


def method_names() -> list[str]:
    return list(RECIPES) + list(ALIASES)


# --------------------------------------------------------------------------- configs
def dynamic_cfg(weight_bits: int, act_bits: int) -> LayerQuant:
    """Per-output-channel symmetric weights (4-bit packed), dynamic per-token symmetric activations."""
    return LayerQuant(weight=QuantSpec(bits=weight_bits, granularity="channel"),
                      act=QuantSpec(bits=act_bits, granularity="token"), pack=weight_bits <= 4)


def _static_cfg(w_gran: str, weight_bits: int, act_bits: int, symmetric: bool) -> LayerQuant:
    return LayerQuant(weight=QuantSpec(bits=weight_bits, granularity=w_gran),
                      act=QuantSpec(bits=act_bits, symmetric=symmetric, granularity="tensor"),
                      act_static=True, pack=weight_bits <= 4)


def _rules(cfg: Any) -> list[Rule]:
    """First and last layers float, every other linear ``cfg``."""
    return [keep_float(), Rule(cfg)]


# --------------------------------------------------------------------------- builds
def _dynamic(w: int, a: int) -> Build:
    def build(params, ctx):
        return quantize_params(params, _rules(dynamic_cfg(w, a)), roles=ctx.roles), {}
    return build


def _quarot(w: int, a: int) -> Build:
    def build(params, ctx):
        rules = _rules(dynamic_cfg(w, a))
        rot = rotate_params(params, selected(rules, ctx.roles))
        return quantize_params(rot, rules, roles=ctx.roles), {}
    return build


def _naive(w: int, a: int) -> Build:
    def build(params, ctx):
        rules = _rules(_static_cfg("tensor", w, a, symmetric=False))
        return quantize_params(params, rules, roles=ctx.roles, stats=ctx.pooled("naive")), {}
    return build


def _qdiffusion(w: int, a: int) -> Build:
    """Per-channel weights; one static (s, z) per calibration timestep (both CFG halves
    pooled), resolved at sampling time by :func:`jaxdq.quant.timestep.at_timestep`."""
    def build(params, ctx):
        cfg = _static_cfg("channel", w, a, symmetric=False)
        rules = _rules(cfg)
        q = quantize_params(params, rules, roles=ctx.roles, stats=ctx.pooled("qdiffusion"))
        steps = len(ctx.calib["t"])
        per_step = [ctx.pooled("qdiffusion", steps=[k]) for k in range(steps)]

        def per_t(path, layer):
            if not getattr(layer, "act", None) or not layer.act.static:
                return layer
            lo = [get_path(s, path)["min"] for s in per_step]
            hi = [get_path(s, path)["max"] for s in per_step]
            return layer.replace(act=static_act_quant(lo, hi, cfg.act, t=ctx.calib["t"]))

        return map_layers(q, per_t), {}
    return build


def _smoothquant(w: int, a: int, alpha: float = SMOOTH_ALPHA) -> Build:
    """Smoothing α, per-channel weights, static per-tensor symmetric activations whose range
    is that of the smoothed input, ``max_j absmax_j / λ_j``."""
    def build(params, ctx):
        stats = ctx.pooled("smoothquant")
        rules = _rules(_static_cfg("channel", w, a, symmetric=True))
        sm = smooth_params(params, stats, alpha, selected(rules, ctx.roles))
        sstats: dict = {}
        for path, layer in iter_layers(sm):
            set_path(sstats, path, smoothed_range(get_path(stats, path), layer))
        return quantize_params(sm, rules, roles=ctx.roles, stats=sstats), {}
    return build


def vidit_q_balance(params: Mapping, stats: Mapping, select: Callable[[str], bool],
                    alpha: float = SMOOTH_ALPHA) -> dict:
    """ViDiT-Q's static-dynamic channel balancing as a float-equivalent transform:
    static smoothing (α, from calibration) then online Hadamard rotation."""
    return rotate_params(smooth_params(params, stats, alpha, select), select)


def _vidit_q(w: int, a: int, alpha: float = SMOOTH_ALPHA) -> Build:
    def build(params, ctx):
        rules = _rules(dynamic_cfg(w, a))
        bal = vidit_q_balance(params, ctx.pooled("vidit-q"), selected(rules, ctx.roles), alpha)
        return quantize_params(bal, rules, roles=ctx.roles), {}
    return build


def _vidit_q_mp(per_segment: bool) -> Build:
    def build(params, ctx):
        if ctx.eps is None:
            raise ValueError("mixed precision needs the model's network call (jaxdq.quantize.quantize_model)")
        sel = selected(_rules(dynamic_cfg(8, 8)), ctx.roles)
        bal = vidit_q_balance(params, ctx.pooled("vidit-q-mp"), sel)
        opts = dict(ctx.options)
        act_bits = opts.pop("act_bits", 8)
        return mp.mixed_precision(bal, ctx.calib, roles=ctx.roles, select=sel, eps=ctx.eps,
                                  layer_config=lambda b: dynamic_cfg(b, act_bits),
                                  per_segment=per_segment, progress=ctx.progress, **opts)
    return build


def _svdquant(w: int, a: int) -> Build:
    def build(params, ctx):
        report: dict = {}
        q = svdquant(params, ctx.pooled("svdquant"), roles=ctx.roles, weight_bits=w, act_bits=a,
                     rank=16 if w == 8 else 32, report=report, **ctx.options)
        return q, {"layers": report}
    return build


def _weight_only(bits: int, group_size: Optional[int]) -> Build:
    spec = (QuantSpec(bits=bits, granularity="group", group_size=group_size) if group_size
            else QuantSpec(bits=bits, granularity="channel"))

    def build(params, ctx):
        return quantize_params(params, _rules(LayerQuant(weight=spec, pack=bits <= 4)), roles=ctx.roles), {}
    return build


STATS = Needs(stats=True)
_FAMILIES = {
    "naive": ("per-tensor weights, static per-tensor min-max activations", _naive, STATS),
    "qdiffusion": ("per-channel weights, static per-tensor activations per timestep", _qdiffusion,
                   Needs(stats=True, per_step=True)),
    "smoothquant": ("SmoothQuant α=0.5, per-channel weights, static per-tensor activations", _smoothquant, STATS),
    "quarot": ("Hadamard rotation, per-channel weights, dynamic per-token activations", _quarot, Needs()),
    "dynamic": ("per-channel weights, dynamic per-token activations", _dynamic, Needs()),
    "vidit-q": ("ViDiT-Q: smoothing + Hadamard, per-channel weights, dynamic per-token activations", _vidit_q,
                STATS),
}
for _fam, (_desc, _make, _needs) in _FAMILIES.items():
    for _w in (8, 4):
        register(Recipe(f"{_fam}-w{_w}a8", f"W{_w}A8", f"W{_w}A8 {_desc}", _make(_w, 8), _needs))

_MP = Needs(stats=True, trajectory=True)
register(Recipe("vidit-q-mp", "W4/8A8", "W4/8 A8 ViDiT-Q + metric-decoupled timestep-segment mixed precision",
                _vidit_q_mp(True), _MP))
register(Recipe("vidit-q-mp-static", "W4/8A8",
                "W4/8 A8 ViDiT-Q + metric-decoupled mixed precision, one allocation for all timesteps",
                _vidit_q_mp(False), _MP))
_SVDQ = Needs(stats=True, samples=True)
register(Recipe("svdquant", "W4A4", "SVDQuant W4A4: smoothing (α searched) + rank-32 fp16 low-rank + INT4 "
                "group-64 weights, dynamic 4-bit group-64 activations", _svdquant(4, 4), _SVDQ))
register(Recipe("svdquant-w4a8", "W4A8", "SVDQuant W4A8 (per-token 8-bit activations)", _svdquant(4, 8), _SVDQ))
register(Recipe("svdquant-w8a8", "W8A8", "SVDQuant W8A8 (rank 16, per-channel weights, per-token activations)",
                _svdquant(8, 8), _SVDQ))
register(Recipe("w8a16", "W8A16", "weight-only 8-bit, per-channel", _weight_only(8, None)))
register(Recipe("w4a16", "W4A16", "weight-only 4-bit, per-group 64, packed", _weight_only(4, 64)))


def needs_of(names) -> Needs:
    """The union of the calibration needs of several recipes ("float" needs none)."""
    out = Needs()
    for n in names:
        if n != "float":
            out = out | get_recipe(n).needs
    return out
