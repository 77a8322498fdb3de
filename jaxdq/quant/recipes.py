"""Quantization recipes as records in one registry.

A :class:`Recipe` is a name, a bits label, a description, the calibration statistics it
needs (:class:`Needs`) and a build function ``build(params, ctx) -> (params, report)``
composed of the pure transforms in :mod:`jaxdq.quant` (a few lines each).  Every recipe
selects layers by role tag, so it applies to every model family; the first and last layers
(roles ``embedding`` and ``final``) stay float in all of them, as is customary in
diffusion PTQ.  ``get_recipe(name)`` resolves names and aliases; :data:`RECIPES` lists them.

=====================  ==========================================================
``rtn-wXaY``           round-to-nearest per-channel weights, static per-tensor min-max
                       activations, one range over all timesteps and both CFG halves
                       (the papers' "naive"; alias ``naive`` = ``rtn-w8a8``); UNet convs too
``qdiffusion-wXaY``    Q-Diffusion: BRECQ + AdaRound reconstruction, shortcut splitting,
                       timestep-uniform calibration, one activation range over all steps
``brecq-wXaY``         BRECQ + AdaRound alone (TFMQ-DM's ablation baseline)
``tfmq-dm-wXaY``       TFMQ-DM: Q-Diffusion's base with the temporal information block
                       reconstructed by TIAR (then frozen) and its activations by FSC;
                       ablations ``tfmq-dm-tiar-wXaY``, ``tfmq-dm-fsc-wXaY``
                       (X, Y: W4A8, W8A8, W4A32 = float activations; options in the name,
                       ``tfmq-dm-w4a8@iters=500@per_step=2``, see :func:`get_recipe`)
``per-step-static-wXa8``  per-channel weights, static per-tensor activations with one
                       range per calibration timestep on every layer (TDQ / FSC-style
                       ranges everywhere, no reconstruction; was ``qdiffusion-wXa8``)
``naive-pertensor-wXa8``  per-tensor weights, static per-tensor min-max activations
                       (was ``naive-wXa8``; the collapse row)
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
                       ``svdquant-w8a8`` variant
``svdquant-w4a8``      SVDQuant's Hopper W4A8: the same smoothing and rank-32 branch,
                       QServe progressive-group 4-bit weights (INT8 per channel, then
                       UINT4 g64 with integer scales/zeros), dynamic per-token 8-bit
                       activations; ``svdquant-w4a8-g64``: float-scale INT4 g64 weights
``dynamic-w4a8-pg``    progressive-group 4-bit weights + dynamic per-token 8-bit
                       activations (no smoothing or low rank)
``w8a16``, ``w4a16``   weight-only, per channel / per group of 64 (packed)
=====================  ==========================================================
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Optional

from jaxdq.quant import mixed_precision as mp
from jaxdq.quant.hadamard import rotation_for
from jaxdq.quant.layers import get_path, iter_layers, map_layers, set_path, static_act_quant
from jaxdq.quant.progressive import ProgressiveSpec
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import CONV, LayerQuant, Rule, keep_float, quantize_conv_params, quantize_params, selected
from jaxdq.quant.svdquant import svdquant
from jaxdq.quant.transforms import rotate_params, smooth_params, smoothed_range

SMOOTH_ALPHA = 0.5
#: ViDiT-Q's smoothing α and its activation statistic, as its released PixArt-α configs
#: (``t2i/configs/quant/alpha/w8a8.yaml``, ``w4a8.yaml``: ``alpha: 0.3``,
#: ``channel_wise_scale_type: momentum_act_max``, ``momentum: 0.95``); not searched here.
VIDIT_Q_ALPHA = 0.3


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
    model: the float :class:`~jaxdq.models.sources.LoadedModel` being quantized (mixed
      precision samples it), or None.
    """

    roles: Mapping[str, str]
    calib: Optional[Mapping] = None
    eps: Optional[Callable] = None
    options: Mapping = dataclasses.field(default_factory=dict)
    progress: bool = False
    model: Any = None

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
ALIASES = {"w8a8": "dynamic-w8a8", "w4a8": "dynamic-w4a8", "naive": "rtn-w8a8"}


def register(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES or recipe.name in ALIASES:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (or an alias of it); ValueError listing every name.

    ``NAME@key=value@key=value`` is recipe ``NAME`` with those keyword options (ints,
    floats, ``true``/``false`` or strings), merged under the ones ``quantize_model`` is
    given, and named so in the model's metadata: the way ``jaxdq compare --methods`` and
    ``jaxdq quantize --method`` set them (e.g. ``tfmq-dm-w4a8@iters=20000@batch=32``)."""
    base, _, rest = name.partition("@")
    recipe = RECIPES.get(ALIASES.get(base, base))
    if recipe is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(method_names())}")
    if rest:
        recipe = _with_options(recipe, name, _parse_options(name, rest))
    return recipe


def _parse_options(name: str, text: str) -> dict:
    out = {}
    for item in text.split("@"):
        key, eq, value = item.partition("=")
        if not key or not eq or not key.replace("_", "").isalnum():
            raise ValueError(f"method {name!r}: options are @key=value, got {item!r}")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        for conv in (int, float):
            try:
                out[key] = conv(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def _with_options(recipe: Recipe, name: str, options: Mapping) -> Recipe:
    def build(params, ctx):
        return recipe.build(params, dataclasses.replace(ctx, options={**options, **dict(ctx.options)}))

    return dataclasses.replace(recipe, name=name, build=build)


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


def _quarot(w: int, a: int, rotation: str = "full") -> Build:
    """Online Hadamard rotation (``rotation``: "full" width, or "block"-diagonal), per-channel
    weights, dynamic per-token activations."""
    def build(params, ctx):
        rules = _rules(dynamic_cfg(w, a))
        rot = rotate_params(params, selected(rules, ctx.roles), lambda k: rotation_for(k, rotation))
        return quantize_params(rot, rules, roles=ctx.roles), {}
    return build


def _conv_rules(cfg: Any) -> list[Rule]:
    """First and last layers float, every conv of role "conv" (and its sub-roles) ``cfg``."""
    return [keep_float(), Rule(cfg, roles=(CONV,))]


def _naive_pertensor(w: int, a: int) -> Build:
    def build(params, ctx):
        cfg = _static_cfg("tensor", w, a, symmetric=False)
        stats = ctx.pooled("naive-pertensor")
        q = quantize_params(params, _rules(cfg), roles=ctx.roles, stats=stats)
        return quantize_conv_params(q, _conv_rules(cfg), roles=ctx.roles, stats=stats), {}
    return build


def _per_step_static(w: int, a: int) -> Build:
    """Per-channel weights; one static (s, z) per calibration timestep (both CFG halves
    pooled) on every quantized linear and conv, resolved at sampling time by
    :func:`jaxdq.quant.timestep.at_timestep`."""
    def build(params, ctx):
        cfg = _static_cfg("channel", w, a, symmetric=False)
        rules = _rules(cfg)
        pooled = ctx.pooled("per-step-static")
        q = quantize_params(params, rules, roles=ctx.roles, stats=pooled)
        q = quantize_conv_params(q, _conv_rules(cfg), roles=ctx.roles, stats=pooled)
        steps = len(ctx.calib["t"])
        per_step = [ctx.pooled("per-step-static", steps=[k]) for k in range(steps)]

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
            if hasattr(layer, "transform"):  # linears only: UNet convs stay float in SmoothQuant
                set_path(sstats, path, smoothed_range(get_path(stats, path), layer))
        return quantize_params(sm, rules, roles=ctx.roles, stats=sstats), {}
    return build


def momentum_stats(stats: Mapping) -> dict:
    """Pooled statistics whose ``absmax`` is the momentum-averaged maximum ``absmax_ema``
    (what ViDiT-Q's smoothing reads); ValueError for statistics made without it."""
    def view(node):
        if isinstance(node, Mapping) and "absmax" in node:
            if "absmax_ema" not in node:
                raise ValueError("these calibration statistics have no momentum-averaged maximum (absmax_ema): "
                                 "they predate it; calibrate again (jaxdq calibrate)")
            return dict(node, absmax=node["absmax_ema"])
        return {k: view(v) for k, v in node.items()} if isinstance(node, Mapping) else node
    return view(stats)


def vidit_q_balance(params: Mapping, stats: Mapping, select: Callable[[str], bool],
                    alpha: float = VIDIT_Q_ALPHA, rotation: Optional[str] = "full", momentum: bool = True) -> dict:
    """ViDiT-Q's static-dynamic channel balancing as a float-equivalent transform: static
    smoothing (α, from the calibration's momentum-averaged maximum when ``momentum``) then the
    online Hadamard rotation (``rotation``: "full" width, "block"-diagonal, or None: none)."""
    sm = smooth_params(params, momentum_stats(stats) if momentum else stats, alpha, select)
    if rotation is None:
        return sm
    return rotate_params(sm, select, lambda k: rotation_for(k, rotation))


def _vidit_q(w: int, a: int, alpha: float = VIDIT_Q_ALPHA, rotation: Optional[str] = "full") -> Build:
    def build(params, ctx):
        rules = _rules(dynamic_cfg(w, a))
        bal = vidit_q_balance(params, ctx.pooled("vidit-q"), selected(rules, ctx.roles), alpha, rotation)
        return quantize_params(bal, rules, roles=ctx.roles), {}
    return build


def _vidit_q_mp(per_segment: bool) -> Build:
    def build(params, ctx):
        if ctx.model is None:
            raise ValueError("mixed precision samples the model: quantize it with jaxdq.quantize.quantize_model")
        sel = selected(_rules(dynamic_cfg(8, 8)), ctx.roles)
        bal = vidit_q_balance(params, ctx.pooled("vidit-q-mp"), sel)
        opts = dict(ctx.options)
        act_bits = opts.pop("act_bits", 8)
        return mp.mixed_precision(bal, ctx.calib, roles=ctx.roles, select=sel, model=ctx.model,
                                  layer_config=lambda b: dynamic_cfg(b, act_bits),
                                  per_segment=per_segment, progress=ctx.progress, **opts)
    return build


def _svdquant(w: int, a: int, progressive: bool = False) -> Build:
    def build(params, ctx):
        report: dict = {}
        opts = dict(ctx.options)
        if progressive:
            opts.setdefault("progressive", True)
        q = svdquant(params, ctx.pooled("svdquant"), roles=ctx.roles, weight_bits=w, act_bits=a,
                     rank=16 if w == 8 else 32, report=report, **opts)
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
    "naive-pertensor": ("per-tensor weights, static per-tensor min-max activations", _naive_pertensor, STATS),
    "per-step-static": ("per-channel weights, static per-tensor activations per timestep on every layer (no "
                        "reconstruction)", _per_step_static, Needs(stats=True, per_step=True)),
    "smoothquant": ("SmoothQuant α=0.5, per-channel weights, static per-tensor activations", _smoothquant, STATS),
    "quarot": ("full-width Hadamard rotation, per-channel weights, dynamic per-token activations", _quarot, Needs()),
    "dynamic": ("per-channel weights, dynamic per-token activations", _dynamic, Needs()),
    "vidit-q": ("ViDiT-Q: smoothing α=0.3 (momentum max) + full-width Hadamard, per-channel weights, dynamic "
                "per-token activations", _vidit_q, STATS),
}
for _fam, (_desc, _make, _needs) in _FAMILIES.items():
    for _w in (8, 4):
        register(Recipe(f"{_fam}-w{_w}a8", f"W{_w}A8", f"W{_w}A8 {_desc}", _make(_w, 8), _needs))


def _dynamic_pg(group_size: int = 64) -> Build:
    def build(params, ctx):
        cfg = LayerQuant(weight=ProgressiveSpec(group_size=group_size), act=QuantSpec(bits=8, granularity="token"),
                         pack=True)
        return quantize_params(params, _rules(cfg), roles=ctx.roles), {}
    return build


register(Recipe("dynamic-w4a8-pg", "W4A8", "W4A8 progressive-group weights (INT8 per channel, then UINT4 group-64 "
                "integer scales/zeros), dynamic per-token 8-bit activations", _dynamic_pg()))

_MP = Needs(stats=True)
register(Recipe("vidit-q-mp", "W4/8A8", "W4/8 A8 ViDiT-Q + metric-decoupled timestep-segment mixed precision",
                _vidit_q_mp(True), _MP))
register(Recipe("vidit-q-mp-static", "W4/8A8",
                "W4/8 A8 ViDiT-Q + metric-decoupled mixed precision, one allocation for all timesteps",
                _vidit_q_mp(False), _MP))
_SVDQ = Needs(stats=True, samples=True)
register(Recipe("svdquant", "W4A4", "SVDQuant W4A4: smoothing (α searched) + rank-32 fp16 low-rank + INT4 "
                "group-64 weights, dynamic 4-bit group-64 activations", _svdquant(4, 4), _SVDQ))
register(Recipe("svdquant-w4a8", "W4A8", "SVDQuant W4A8 for the Hopper GEMM: smoothing (α searched) + rank-32 fp16 "
                "low-rank + progressive-group 4-bit weights (INT8 per channel, UINT4 group-64 integer scales/zeros; "
                "no per-group float rescale), dynamic per-token 8-bit activations", _svdquant(4, 8, True), _SVDQ))
register(Recipe("svdquant-w4a8-g64", "W4A8", "SVDQuant W4A8 with float-scale INT4 group-64 weights (the format "
                "before svdquant-w4a8 took progressive groups), per-token 8-bit activations", _svdquant(4, 8), _SVDQ))
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


# =========================================================================== LRQ-DiT (issue 16)
# LRQ-DiT (arXiv 2508.03485): twin-log weights (TLQ, jaxdq.quant.twinlog) + the adaptive
# rotation scheme (ARS, jaxdq.quant.duquant.ars_params: Hadamard where J < τ, DuQuant's
# R̂1·P·R̂2 where J ≥ τ) + dynamic per-token activations; first and last layers float.
#
#   lrq-dit-wXaY            TLQ + ARS                      (W3A8, W4A6, W4A4)
#   lrq-dit-tlq-only-wXaY   TLQ, no rotation               (ablation)
#   lrq-dit-ars-only-wXaY   uniform per-channel + ARS      (ablation; vs quarot-wXaY = uniform + Hadamard only)
#   lrq-dit-hadamard-only-wXaY  TLQ + Hadamard on every layer (ARS at τ = ∞; ablation: Hadamard-only vs ARS)
#   quarot-/vidit-q-/dynamic-wXaY, svdquant-w3a8/-w4a6     the baselines at the study's bits
#                                                          (``svdquant`` is W4A4; quarot = Hadamard only)
#
# Options (quantize_model(..., **options)): tau (ARS threshold, default 1.0); rotation
# ("full": ARS's Hadamard branch is the full-width Hadamard, as quarot-*; "block");
# tlq_objective="output" (TLQ's α/β search refined on the layer output error over stored
# calibration tokens: needs a calibration with samples).  The ARS report (each layer's J,
# path, rotation) is the model's metadata["report"]["ars"]; jaxdq.quant.duquant.print_report.
from jaxdq.quant import duquant as _duquant  # noqa: E402
from jaxdq.quant.twinlog import TwinLogSpec  # noqa: E402

LRQ_BITS = ((3, 8), (4, 6), (4, 4))


def lrq_cfg(weight_bits: int, act_bits: int, objective: str = "weight") -> LayerQuant:
    """Twin-log weights per output channel (packed), dynamic per-token symmetric activations."""
    return LayerQuant(weight=TwinLogSpec(bits=weight_bits, objective=objective),
                      act=QuantSpec(bits=act_bits, granularity="token"), pack=weight_bits <= 4)


def _lrq(w: int, a: int, *, tlq: bool = True, ars: bool = True, hadamard_only: bool = False) -> Build:
    def build(params, ctx):
        opts = dict(ctx.options)
        tau = float(opts.pop("tau", float("inf") if hadamard_only else _duquant.DEFAULT_TAU))
        objective = opts.pop("tlq_objective", "weight")
        kind = opts.pop("rotation", "full")
        if opts:
            raise ValueError(f"unknown LRQ-DiT options: {', '.join(sorted(opts))} (tau, tlq_objective, rotation)")
        rules = _rules(lrq_cfg(w, a, objective) if tlq else dynamic_cfg(w, a))
        stats = ctx.pooled("lrq-dit") if ars or (tlq and objective == "output") else None
        report: dict = {}
        if ars:
            params, rows = _duquant.ars_params(params, stats, selected(rules, ctx.roles), tau=tau,
                                               hadamard_kind=kind)
            report = {"ars": rows, "ars_tau": tau if tau < float("inf") else "inf"}   # JSON-safe
        return quantize_params(params, rules, roles=ctx.roles, stats=stats), report
    return build


def _register_missing(recipe: Recipe) -> None:
    """Register a baseline at an extra bit width unless its family already has that name."""
    if recipe.name not in RECIPES:
        register(recipe)


for _w, _a in LRQ_BITS:
    _b = f"W{_w}A{_a}"
    _s = f"w{_w}a{_a}"
    register(Recipe(f"lrq-dit-{_s}", _b, f"{_b} LRQ-DiT: twin-log weights (α/β + log-step search) + adaptive "
                    "rotation (Hadamard / DuQuant by J), dynamic per-token activations", _lrq(_w, _a), STATS))
    register(Recipe(f"lrq-dit-tlq-only-{_s}", _b, f"{_b} LRQ-DiT ablation: twin-log weights, dynamic per-token "
                    "activations, no rotation", _lrq(_w, _a, ars=False), Needs()))
    register(Recipe(f"lrq-dit-ars-only-{_s}", _b, f"{_b} LRQ-DiT ablation: uniform per-channel weights + "
                    "adaptive rotation, dynamic per-token activations", _lrq(_w, _a, tlq=False), STATS))
    register(Recipe(f"lrq-dit-hadamard-only-{_s}", _b, f"{_b} LRQ-DiT ablation: twin-log weights + the full-width "
                    "Hadamard on every layer (ARS with τ = ∞), dynamic per-token activations",
                    _lrq(_w, _a, hadamard_only=True), STATS))
    for _fam in ("quarot", "vidit-q", "dynamic"):
        _desc, _make, _needs = _FAMILIES[_fam]
        _register_missing(Recipe(f"{_fam}-{_s}", _b, f"{_b} {_desc}", _make(_w, _a), _needs))
    if (_w, _a) != (4, 4):  # ``svdquant`` is W4A4
        _register_missing(Recipe(f"svdquant-{_s}", _b, f"SVDQuant {_b} (rank 32, group-64 weights)",
                                 _svdquant(_w, _a), _SVDQ))


# =========================================================================== ViDiT-Q (issue 17)
# The ViDiT-Q ablation (compare's default rows) and the PTQ4DiT-style baseline:
#
#   dynamic-wXa8                 per-channel W + dynamic per-token A (ViDiT-Q's grouping alone)
#   vidit-q-smooth-only-wXa8     + static smoothing (α = 0.3, momentum max), no rotation
#   quarot-wXa8                  + full-width Hadamard rotation, no smoothing
#   vidit-q-wXa8                 + both (ViDiT-Q's static-dynamic channel balancing)
#   quarot-block-wXa8, vidit-q-block-wXa8   the block-diagonal rotation instead (largest 2^k block)
#   ptq4dit-csb-wXa8             PTQ4DiT's CSB + SSC balancing, RTN per-channel W, static per-tensor A
#                                (one range over timesteps; no reconstruction)
from jaxdq.quant.ptq4dit import ptq4dit_balance  # noqa: E402


def _vidit_q_smooth_only(w: int, a: int) -> Build:
    return _vidit_q(w, a, rotation=None)


def _ptq4dit_csb(w: int, a: int) -> Build:
    """CSB with SSC (per-step salience) then per-channel weights and static per-tensor symmetric
    activations whose range is the balanced input's, ``max_j absmax_j / λ_j``."""
    def build(params, ctx):
        if ctx.calib is None:
            raise ValueError("ptq4dit-csb needs calibration statistics (jaxdq.calibrate.calibrate)")
        stats = ctx.pooled("ptq4dit-csb")
        rules = _rules(_static_cfg("channel", w, a, symmetric=True))
        bal = ptq4dit_balance(params, ctx.calib, selected(rules, ctx.roles))
        sstats: dict = {}
        for path, layer in iter_layers(bal):
            if hasattr(layer, "transform"):  # linears only (UNet convs stay float here)
                set_path(sstats, path, smoothed_range(get_path(stats, path), layer))
        return quantize_params(bal, rules, roles=ctx.roles, stats=sstats), {}
    return build


for _w in (8, 4):
    _b = f"W{_w}A8"
    register(Recipe(f"vidit-q-smooth-only-w{_w}a8", _b, f"{_b} ViDiT-Q ablation: smoothing α=0.3 (momentum max), "
                    "no rotation, per-channel weights, dynamic per-token activations", _vidit_q_smooth_only(_w, 8),
                    STATS))
    register(Recipe(f"quarot-block-w{_w}a8", _b, f"{_b} block-diagonal Hadamard rotation (largest power-of-two "
                    "block), per-channel weights, dynamic per-token activations", _quarot(_w, 8, "block"), Needs()))
    register(Recipe(f"vidit-q-block-w{_w}a8", _b, f"{_b} ViDiT-Q with the block-diagonal Hadamard rotation",
                    _vidit_q(_w, 8, rotation="block"), STATS))
    register(Recipe(f"ptq4dit-csb-w{_w}a8", _b, f"{_b} PTQ4DiT-style channel salience balancing (CSB + SSC), "
                    "round-to-nearest per-channel weights, static per-tensor activations", _ptq4dit_csb(_w, 8),
                    Needs(stats=True, per_step=True)))


# =========================================================================== FP8 W8A8 (issue 19)
# float8 e4m3 codes (QuantSpec(fmt="e4m3")): weights per output channel, activations per token
# (dynamic), scale = absmax / 448, round to nearest even into float8_e4m3fn.  The integer path
# is XLA's float8 × float8 dot with an f32 accumulator (cuBLASLt's fp8 GEMM on Hopper); under
# policy("kernels") the norm-fused quantize (jaxdq.norm_linear) writes the e4m3 codes directly.
#
#   fp8-w8a8            per-channel e4m3 W + dynamic per-token e4m3 A
#   vidit-q-fp8-w8a8    + ViDiT-Q's static-dynamic channel balancing (smoothing, Hadamard)
def fp8_cfg() -> LayerQuant:
    """FP8 W8A8: e4m3 weights per output channel, dynamic e4m3 activations per token."""
    return LayerQuant(weight=QuantSpec(bits=8, granularity="channel", fmt="e4m3"),
                      act=QuantSpec(bits=8, granularity="token", fmt="e4m3"))


def _fp8(balance: bool) -> Build:
    def build(params, ctx):
        rules = _rules(fp8_cfg())
        if balance:
            params = vidit_q_balance(params, ctx.pooled("vidit-q-fp8-w8a8"), selected(rules, ctx.roles))
        return quantize_params(params, rules, roles=ctx.roles), {}
    return build


register(Recipe("fp8-w8a8", "W8A8", "FP8 W8A8 (e4m3): per-channel weights, dynamic per-token activations", _fp8(False)))
register(Recipe("vidit-q-fp8-w8a8", "W8A8", "FP8 W8A8 (e4m3) with ViDiT-Q's channel balancing (smoothing + Hadamard)",
                _fp8(True), STATS))


# =========================================================================== TFMQ-DM (issue 15)
# TFMQ-DM (CVPR 2024) and the UNet PTQ baselines it is measured against, named for what
# they are (these names apply to every family; the UNets' convs are quantized too, their
# first and last layers float):
#
#   rtn-wXaY              round-to-nearest per-channel weights, static per-tensor min-max
#                         activations over all steps (the papers' "naive")
#   brecq-wXaY            + BRECQ block reconstruction with AdaRound (TFMQ-DM's ablation baseline)
#   qdiffusion-wXaY       + Q-Diffusion's shortcut splitting (an up block's [h, skip] halves
#                         get their own ranges) on the timestep-uniform calibration set
#   tfmq-dm-wXaY          qdiffusion + the temporal information block by TIAR (reconstructed
#                         alone on Σ_i ‖emb_{t,i} − ê_{t,i}‖², then frozen) + FSC (per-t ranges)
#   tfmq-dm-tiar-wXaY     ablation: TIAR only;   tfmq-dm-fsc-wXaY: FSC only (W4A8, W8A8)
#
# Bits: W4A8, W8A8, W4A32 (A32 = float activations).  Activations asymmetric (unsigned with a
# zero point, as Q-Diffusion's quantizer); ``act_symmetric=true`` for symmetric ones (the
# integer path of the linears needs them).  Options (quantize_model(..., **options) or in the
# name, ``tfmq-dm-w4a8@iters=500``): iters, batch, lr, reg_weight, warmup, fisher, inputs,
# chunk, seed (jaxdq.quant.reconstruct.ReconConfig), per_step (calibration samples per
# timestep and CFG branch, default 4), act_symmetric.  The report (metadata["report"]) has
# each phase's wall time and each block's error before / after.
import time as _time  # noqa: E402

from jaxdq.calibrate.blocks import calibration_set as _calibration_set  # noqa: E402
from jaxdq.quant import reconstruct as _recon  # noqa: E402
from jaxdq.quant import tfmq as _tfmq  # noqa: E402

UNET_BITS = ((4, 8), (8, 8), (4, 32))
_RECON_FIELDS = {f.name for f in dataclasses.fields(_recon.ReconConfig)}
_PTQ_OPTIONS = _RECON_FIELDS | {"per_step", "act_symmetric"}
_RECON_NEEDS = Needs(stats=True, trajectory=True)


def ptq_cfg(weight_bits: int, act_bits: int, act_symmetric: bool = False) -> LayerQuant:
    """Per-output-channel symmetric weights (4-bit packed); static per-tensor min-max
    activations (asymmetric unless ``act_symmetric``), or float ones for ``act_bits`` ≥ 16."""
    act = None if act_bits >= 16 else QuantSpec(bits=act_bits, symmetric=act_symmetric, granularity="tensor")
    return LayerQuant(weight=QuantSpec(bits=weight_bits, granularity="channel"), act=act,
                      act_static=act is not None, pack=weight_bits <= 4)


def rtn_params(params: Mapping, ctx: Context, cfg: LayerQuant, *, split: bool = False,
               name: str = "rtn") -> dict:
    """Round-to-nearest: every linear and every conv of role "conv" with ``cfg`` (first and
    last layers float), activation ranges pooled over all steps and both CFG branches;
    ``split``: an up block's concatenated shortcut input gets a range per half."""
    stats = ctx.pooled(name) if cfg.act is not None else None
    q = quantize_params(params, _rules(cfg), roles=ctx.roles, stats=stats)
    return quantize_conv_params(q, _conv_rules(cfg), roles=ctx.roles, stats=stats, split=split)


def _ptq(w: int, a: int, *, recon: bool = False, split: bool = False, tiar: bool = False,
         fsc: bool = False) -> Build:
    def build(params, ctx):
        opts = dict(ctx.options)
        unknown = set(opts) - _PTQ_OPTIONS
        if unknown:
            raise ValueError(f"unknown options {', '.join(sorted(unknown))}; these recipes take "
                             f"{', '.join(sorted(_PTQ_OPTIONS))}")
        cfg = ptq_cfg(w, a, bool(opts.pop("act_symmetric", False)))
        per_step = int(opts.pop("per_step", 4))
        rcfg = _recon.ReconConfig(**{k: tuple(v) if k == "beta" else v for k, v in opts.items()})
        seconds: dict = {}
        report: dict = {"seconds": seconds}
        t0 = _time.time()
        q = rtn_params(params, ctx, cfg, split=split)
        seconds["round_to_nearest"] = round(_time.time() - t0, 2)
        fsc_now = fsc and cfg.act is not None
        if not (recon or tiar or fsc_now):
            return q, report
        if ctx.eps is None:
            raise ValueError("reconstruction runs the network: quantize with jaxdq.quantize.quantize_model")
        t0 = _time.time()
        data = _calibration_set(ctx.calib, per_step, rcfg.seed)
        seconds["calibration_set"] = round(_time.time() - t0, 2)
        report["calibration_calls"] = data.size
        tib = set(_tfmq.tib_paths(ctx.roles))
        if tiar:
            t0, rep = _time.time(), {}
            q = _recon.with_weights(q, _tfmq.reconstruct_temporal(ctx.eps, params, q, data, ctx.roles, rcfg,
                                                                  progress=ctx.progress, report=rep))
            seconds["tiar"] = round(_time.time() - t0, 2)
            report["tiar"] = rep
        if recon:
            t0, rep = _time.time(), {}
            select = (lambda p: p not in tib) if tiar else None  # TIAR's block stays frozen
            q = _recon.with_weights(q, _recon.reconstruct_blocks(ctx.eps, params, q, data, rcfg, select=select,
                                                                 progress=ctx.progress, report=rep))
            seconds["block_reconstruction"] = round(_time.time() - t0, 2)
            report["blocks"] = rep
        if fsc_now:
            t0 = _time.time()
            ts = _tfmq.temporal_set(data)
            paths = [p for p in sorted(tib) if getattr(_layer_at(q, p), "act", None) is not None]
            q = _tfmq.apply_fsc(q, _tfmq.fsc_ranges(ctx.eps, params, ts, paths), ts.timesteps, cfg.act)
            seconds["fsc"] = round(_time.time() - t0, 2)
        seconds["total"] = round(sum(v for k, v in seconds.items()), 2)
        return q, report
    return build


def _layer_at(params: Mapping, path: str):
    from jaxdq.quant.layers import as_layer

    return as_layer(get_path(params, path))


_PTQ_FAMILIES = {
    "rtn": ("round-to-nearest per-channel weights, static per-tensor activations (one range over all steps); "
            "UNet convs included", dict()),
    "brecq": ("BRECQ block reconstruction + AdaRound, one activation range over all steps", dict(recon=True)),
    "qdiffusion": ("Q-Diffusion: BRECQ + AdaRound, shortcut splitting, timestep-uniform calibration, one "
                   "activation range over all steps", dict(recon=True, split=True)),
    "tfmq-dm": ("TFMQ-DM: Q-Diffusion's base + TIAR (temporal information block reconstructed alone, then "
                "frozen) + FSC (per-timestep ranges of its activations)", dict(recon=True, split=True, tiar=True,
                                                                                fsc=True)),
    "tfmq-dm-tiar": ("TFMQ-DM ablation: Q-Diffusion's base + TIAR only", dict(recon=True, split=True, tiar=True)),
    "tfmq-dm-fsc": ("TFMQ-DM ablation: Q-Diffusion's base + FSC only", dict(recon=True, split=True, fsc=True)),
}
for _w, _a in UNET_BITS:
    _b, _s = f"W{_w}A{_a}", f"w{_w}a{_a}"
    for _fam, (_desc, _kw) in _PTQ_FAMILIES.items():
        if _fam == "tfmq-dm-fsc" and _a >= 16:
            continue  # FSC sets activation ranges: nothing to do with float activations
        _needs = _RECON_NEEDS if _kw else (STATS if _a < 16 else Needs())
        register(Recipe(f"{_fam}-{_s}", _b, f"{_b} {_desc}", _ptq(_w, _a, **_kw), _needs))
