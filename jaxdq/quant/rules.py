"""Rules: which layers get which quantization, selected by role tag (regex paths as an escape hatch).

Every linear layer of a jaxdq model carries a role tag (its model's ``layer_roles``):
``self-attn``, ``cross-attn``, ``temporal-attn``, ``ffn``, ``adaLN``, ``time-embedding``,
``embedding``, ``final`` (or ``other``).  A tag may carry a sub-role after a colon:
``cross-attn:kv`` is a cross-attention key/value projection (it reads the text tokens
only).  A rule's role ``"cross-attn"`` matches ``cross-attn`` and ``cross-attn:kv``; the
rule role ``"cross-attn:kv"`` matches only the latter.

Convolutions (the UNets') carry ``conv`` and its sub-roles ``conv:shortcut`` (a resnet's
1x1 shortcut, which reads an up block's skip concatenation), ``conv:resample`` (down /
upsampler convs), ``conv:proj`` (a transformer's 1x1 proj_in/out); a UNet's ``conv_in`` /
``conv_out`` are ``embedding`` / ``final``.  :func:`quantize_params` quantizes linears,
:func:`quantize_conv_params` convs (only a rule naming a conv role selects them in the
recipes, so convs of other roles, the VAE's "other", stay float).

A :class:`Rule` maps roles (and optionally a path regex) to a :class:`LayerQuant` config,
or to None to keep the layer float.  :func:`first_match` is the one matcher: the first
matching rule wins; a layer no rule matches is left as it is.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from jaxdq.quant.layers import (ActQuant, FloatConv, FloatLinear, QConv, QLinear, QWeight, bits_label, get_path,
                                iter_layers, map_layers, static_act_quant, weight_arrays)
from jaxdq.quant.quantizer import QuantSpec

Params = Mapping[str, Any]

ROLES = ("self-attn", "cross-attn", "cross-attn:kv", "temporal-attn", "ffn", "adaLN", "time-embedding",
         "embedding", "final", "other", "conv", "conv:shortcut", "conv:resample", "conv:proj")
#: The rule role that selects every quantizable convolution (``conv`` and its sub-roles).
CONV = "conv"
#: The first and last layers (patch / caption / context embedders and the output projection):
#: float in every recipe, as is customary in diffusion PTQ.
FIRST_LAST = ("embedding", "final")


def role_matches(rule_role: str, layer_role: Optional[str]) -> bool:
    """Whether a rule's role selects a layer's role (a base role selects its sub-roles)."""
    if layer_role is None:
        return False
    return layer_role == rule_role or (":" not in rule_role and layer_role.split(":")[0] == rule_role)


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """How to quantize one linear layer.

    weight: QuantSpec of the weight (granularity "tensor" | "channel" | "group"), or a
      weight quantizer of its own with ``bits`` and ``quantize_weight(kernel, *, pack, x,
      act_bits)`` returning a weight node (:class:`jaxdq.quant.twinlog.TwinLogSpec`; with
      ``needs_samples`` it reads the layer's calibration tokens).
    act: QuantSpec of the input activation, or None to keep activations float (weight-only).
    act_static: activation qparams from calibration statistics (per-tensor min-max) instead
      of from the tensor at every call.
    pack: store 4-bit weight codes two per byte.
    scale_dtype: storage dtype of the weight scales (None: float32), e.g. float16.
    """

    weight: QuantSpec
    act: Optional[QuantSpec] = None
    act_static: bool = False
    pack: bool = False
    scale_dtype: Any = None

    def __post_init__(self):
        if self.act_static and self.act is None:
            raise ValueError("act_static=True needs an activation QuantSpec")
        if self.act_static and self.act.granularity != "tensor":
            raise ValueError("static activation quantization is per-tensor; "
                             f"got granularity {self.act.granularity!r}")
        if self.pack and self.weight.bits > 4:
            raise ValueError(f"pack=True needs weight bits <= 4, got {self.weight.bits}")

    @property
    def bits_label(self) -> str:
        return f"W{self.weight.bits}A{self.act.bits if self.act else 16}"

    def fit(self, c_in: int, c_out: int) -> "LayerQuant":
        """This config fitted to a ``[c_in, c_out]`` kernel: group specs whose group does not
        divide ``c_in`` become per-channel (weights) / per-token (activations); int4 packing
        (pairs along C_out) is dropped for an odd ``c_out``."""
        def fit(spec, fine):
            if spec is None or getattr(spec, "granularity", None) != "group" or c_in % spec.group_size == 0:
                return spec
            # only the granularity changes (bits, symmetry and the range search are kept)
            return dataclasses.replace(spec, granularity=fine, group_size=None)
        return dataclasses.replace(self, weight=fit(self.weight, "channel"), act=fit(self.act, "token"),
                                   pack=self.pack and c_out % 2 == 0)


@dataclasses.dataclass(frozen=True)
class Rule:
    """``config`` (a LayerQuant, any recipe-specific config, or None = keep float) for the
    layers whose role matches one of ``roles`` (None: any role) and whose path matches the
    regex ``pattern`` (None: any path)."""

    config: Any
    roles: Optional[tuple[str, ...]] = None
    pattern: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.roles, str):
            object.__setattr__(self, "roles", (self.roles,))

    def matches(self, path: str, role: Optional[str]) -> bool:
        if self.roles is not None and not any(role_matches(r, role) for r in self.roles):
            return False
        return self.pattern is None or re.search(self.pattern, path) is not None


def keep_float(*roles: str) -> Rule:
    """A rule keeping the layers of ``roles`` float (default: :data:`FIRST_LAST`)."""
    return Rule(None, roles=roles or FIRST_LAST)


def first_match(rules: Sequence[Rule], path: str, role: Optional[str]) -> Optional[Rule]:
    """The first rule matching ``(path, role)``, or None."""
    return next((r for r in rules if r.matches(path, role)), None)


def config_of(rules: Sequence[Rule], roles: Mapping[str, str]) -> Callable[[str], Any]:
    """``path → config`` of the first matching rule (None when none matches or it keeps float)."""
    def cfg(path):
        rule = first_match(rules, path, roles.get(path))
        return None if rule is None else rule.config
    return cfg


def selected(rules: Sequence[Rule], roles: Mapping[str, str], *,
             act: bool = True) -> Callable[[str], bool]:
    """Predicate on paths: the rules quantize the layer (with quantized activations if ``act``)."""
    cfg = config_of(rules, roles)

    def sel(path):
        c = cfg(path)
        return c is not None and (not act or getattr(c, "act", None) is not None)
    return sel


def quantize_linear(layer: FloatLinear, cfg: LayerQuant, act_stats: Optional[Mapping] = None) -> QLinear:
    """Quantize one float linear (round to nearest); its transforms are carried over.

    ``cfg`` is first fitted to the layer's shape (:meth:`LayerQuant.fit`).  ``act_stats``
    (this layer's pooled calibration statistics, keys ``min``/``max``) is needed only for
    static activation quantization, and (key ``samples``) by a weight quantizer with
    ``needs_samples``.
    """
    if not isinstance(layer, FloatLinear):
        raise TypeError(f"quantize_linear takes a float layer, got {type(layer).__name__}")
    cfg = cfg.fit(layer.in_features, layer.out_features)
    if isinstance(cfg.weight, QuantSpec):
        weight = QWeight.from_kernel(layer.kernel, cfg.weight, pack=cfg.pack, scale_dtype=cfg.scale_dtype)
    else:  # a weight quantizer of its own (e.g. twin-log); it sees the transformed tokens if it asks
        x = None
        if getattr(cfg.weight, "needs_samples", False):
            if act_stats is None or "samples" not in act_stats:
                raise ValueError("this weight quantizer needs the layer's stored calibration tokens (samples)")
            x = layer.transform.apply(jnp.asarray(act_stats["samples"], jnp.float32))
        weight = cfg.weight.quantize_weight(layer.kernel, pack=cfg.pack, x=x,
                                            act_bits=cfg.act.bits if cfg.act is not None else 8)
    act = None
    if cfg.act is not None:
        if cfg.act_static:
            if act_stats is None:
                raise ValueError("static activation quantization needs calibration statistics")
            act = static_act_quant(act_stats["min"], act_stats["max"], cfg.act)
        else:
            act = ActQuant(spec=cfg.act)
    bias = None if layer.bias is None else jnp.asarray(layer.bias, jnp.float32)
    t = layer.transform
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)  # noqa: E731
    t = t.replace(smooth=f32(t.smooth))
    return QLinear(weight=weight, act=act, bias=bias, transform=t)


def quantize_params(params: Params, rules: Sequence[Rule], *, roles: Mapping[str, str],
                    stats: Optional[Mapping] = None) -> dict:
    """Quantize every float linear a rule selects (first match wins; unmatched stay).

    Args:
      params: float (or partly quantized) params tree.
      rules: :class:`Rule` list; configs must be :class:`LayerQuant` (or None).
      roles: path → role tag (the model's ``layer_roles``).
      stats: pooled calibration statistics with the params' layer paths (static rules).
    """
    def needs(cfg):
        if cfg.act_static:
            return "static activations"
        return "a weight search on calibration tokens" if getattr(cfg.weight, "needs_samples", False) else None

    return _quantize_selected(params, rules, roles, stats, FloatLinear, "layer", needs, quantize_linear)


def _quantize_selected(params: Params, rules: Sequence[Rule], roles: Mapping[str, str], stats: Optional[Mapping],
                       kind: type, noun: str, needs: Callable[[Any], Optional[str]],
                       quantize: Callable[[Any, Any, Optional[Mapping]], Any]) -> dict:
    """The loop of :func:`quantize_params` / :func:`quantize_conv_params`: every ``kind``
    layer whose first matching rule has a config becomes ``quantize(layer, cfg, its stats)``;
    ``needs(cfg)`` says what the config needs calibration statistics for (None: nothing)."""
    cfg_of = config_of(rules, roles)

    def convert(path, layer):
        cfg = cfg_of(path)
        if cfg is None or not isinstance(layer, kind):
            return layer
        layer_stats = None
        why = needs(cfg)
        if why:
            if stats is None:
                raise ValueError(f"{noun} {path!r} is quantized with {why} but no calibration "
                                 "statistics were given")
            layer_stats = get_path(stats, path)
        try:
            return quantize(layer, cfg, layer_stats)
        except ValueError as e:
            raise ValueError(f"{noun} {path!r}: {e}") from None

    return map_layers(params, convert)


def dequantize_params(params: Params) -> dict:
    """Float params whose linears hold the weights the quantized layers use, transforms
    folded out (``x W_eff + b``); activation quantization is dropped."""
    def back(path, layer):
        if isinstance(layer, QConv):
            return layer.dequantized()
        if isinstance(layer, QLinear):
            layer = layer.dequantized()
        if isinstance(layer, FloatLinear):
            return FloatLinear(kernel=layer.effective_kernel(), bias=layer.bias)
        return layer

    return map_layers(params, back)


def summarize(params: Params) -> list[dict]:
    """One row per linear layer: path, (C_in, C_out), bits label, weight bytes."""
    rows = []
    for path, layer in iter_layers(params):
        shape = layer.kernel_shape if isinstance(layer, QConv) else (
            getattr(layer, "weight", None).shape if hasattr(layer, "weight") else (
                tuple(int(d) for d in layer.kernel.shape) if hasattr(layer, "kernel") else ()))
        nb = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in weight_arrays(layer))
        rows.append({"path": path, "shape": tuple(shape), "bits": bits_label(layer), "weight_bytes": nb})
    return rows


# --------------------------------------------------------------------------- convolutions
def conv_act_range(stats: Mapping, split: bool = False) -> tuple[np.ndarray, np.ndarray, Optional[int]]:
    """``(lo, hi, split_index)``: a conv input's range from its (pooled, or per-step with a
    leading ``[S]`` axis) calibration statistics.  With ``split`` and a recorded skip
    concatenation (``stats["split"]``, :class:`jaxdq.nn.Conv`), one range per half from the
    per-channel ``cmin``/``cmax``: ``lo``/``hi`` get a trailing axis of 2; else the tensor's
    ``min``/``max`` and ``split_index`` None."""
    if split and "split" in stats:
        k = int(np.max(np.asarray(stats["split"])))
        cmin, cmax = np.asarray(stats["cmin"]), np.asarray(stats["cmax"])
        lo = np.stack([cmin[..., :k].min(-1), cmin[..., k:].min(-1)], -1)
        hi = np.stack([cmax[..., :k].max(-1), cmax[..., k:].max(-1)], -1)
        return lo, hi, k
    return np.asarray(stats["min"]), np.asarray(stats["max"]), None


def conv_weight_spec(spec: QuantSpec) -> QuantSpec:
    """A conv's weight spec: per output channel or per tensor of the flattened
    ``[kh·kw·C_in, C_out]`` kernel (a group spec becomes per channel)."""
    if spec.granularity == "group":
        return dataclasses.replace(spec, granularity="channel", group_size=None)
    return spec


def quantize_conv(layer: FloatConv, cfg: LayerQuant, act_stats: Optional[Mapping] = None, *, split: bool = False,
                  t=None) -> QConv:
    """Quantize one float 2-D convolution (round to nearest).

    Weights: ``cfg.weight`` per output channel (or tensor) of the flattened HWIO kernel,
    4-bit codes packed with ``cfg.pack`` (an odd C_out stays unpacked).  Activations:
    ``cfg.act`` None (float), static per tensor from ``act_stats`` (``cfg.act_static``: the
    pooled ``min``/``max``; per timestep when the statistics have a leading ``[S]`` axis and
    ``t [S]`` is given; with ``split``, one range per half of a recorded skip concatenation),
    or dynamic per tensor.
    """
    if not isinstance(layer, FloatConv):
        raise TypeError(f"quantize_conv takes a float conv, got {type(layer).__name__}")
    if not isinstance(cfg.weight, QuantSpec):
        raise ValueError("a conv's weights are quantized uniformly (a QuantSpec)")
    wspec = conv_weight_spec(cfg.weight)
    c_out = layer.out_features
    k = jnp.asarray(layer.kernel, jnp.float32)
    weight = QWeight.from_kernel(k.reshape(-1, c_out), wspec, pack=cfg.pack and c_out % 2 == 0,
                                 scale_dtype=cfg.scale_dtype)
    act = None
    if cfg.act is not None:
        if cfg.act.granularity != "tensor":
            raise ValueError(f"a conv's activations are quantized per tensor, not per {cfg.act.granularity!r}")
        if cfg.act_static:
            if act_stats is None:
                raise ValueError("static activation quantization needs calibration statistics")
            lo, hi, k_split = conv_act_range(act_stats, split)
            steps = lo.ndim - (k_split is not None)
            if steps and t is None:
                raise ValueError("per-step activation statistics need their timesteps t")
            act = static_act_quant(lo, hi, cfg.act, t=t if steps else None, split=k_split)
        else:
            act = ActQuant(spec=cfg.act)
    bias = None if layer.bias is None else jnp.asarray(layer.bias, jnp.float32)
    return QConv(weight=weight, act=act, bias=bias, kernel_shape=layer.kernel_shape)


def quantize_conv_params(params: Params, rules: Sequence[Rule], *, roles: Mapping[str, str],
                         stats: Optional[Mapping] = None, split: bool = False, t=None) -> dict:
    """Quantize every float conv a rule selects (first match wins; unmatched stay float):
    :func:`quantize_conv` with each layer's statistics from ``stats`` (pooled, or per step
    with ``t``); ``split``: shortcut splitting where the model recorded a concatenation."""
    return _quantize_selected(
        params, rules, roles, stats, FloatConv, "conv",
        lambda cfg: "static activations" if cfg.act is not None and cfg.act_static else None,
        lambda layer, cfg, layer_stats: quantize_conv(layer, cfg, layer_stats, split=split, t=t))
