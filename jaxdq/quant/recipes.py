"""Quantization recipes: a few lines of rules each, over the transforms in jaxdq.quant.

Every recipe keeps the layers matched by ``keep_float`` (by default the model's
first and last layers, as is customary in diffusion PTQ) in floating point.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import LayerQuant, Rule, quantize_params

# Patch embedding and final projection of the DiT family.
DEFAULT_KEEP_FLOAT = (r"(^|/)x_embedder(/|$)", r"(^|/)final_layer/linear$")


def _keep(keep_float: Sequence[str]) -> list[Rule]:
    return [Rule(p, None) for p in keep_float]


def w8a8_dynamic(params: Mapping, *, weight_bits: int = 8, act_bits: int = 8,
                 keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT, impl: str = "fake") -> dict:
    """ViDiT-Q's baseline quantizer: per-output-channel symmetric weights, dynamic
    per-token symmetric activations (range recomputed at every call, so every
    timestep and CFG branch gets its own)."""
    cfg = LayerQuant(weight=QuantSpec(bits=weight_bits, granularity="channel"),
                     act=QuantSpec(bits=act_bits, granularity="token"), impl=impl)
    return quantize_params(params, _keep(keep_float) + [Rule(".*", cfg)])


def naive_static(params: Mapping, stats: Mapping, *, weight_bits: int = 8, act_bits: int = 8,
                 keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT) -> dict:
    """The naive contrast: per-tensor symmetric min-max weights and per-tensor static
    asymmetric min-max activations, one range over all timesteps and both CFG
    halves of the calibration run."""
    cfg = LayerQuant(weight=QuantSpec(bits=weight_bits, granularity="tensor"),
                     act=QuantSpec(bits=act_bits, symmetric=False, granularity="tensor"),
                     act_static=True)
    return quantize_params(params, _keep(keep_float) + [Rule(".*", cfg)], stats=stats)


def weight_only(params: Mapping, *, bits: int = 8, group_size: Optional[int] = None,
                keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT) -> dict:
    """W{bits}A16: per-channel (or per-group) symmetric weights, float activations;
    4-bit codes are packed two per byte."""
    spec = (QuantSpec(bits=bits, granularity="group", group_size=group_size) if group_size
            else QuantSpec(bits=bits, granularity="channel"))
    cfg = LayerQuant(weight=spec, act=None, pack=bits <= 4)
    return quantize_params(params, _keep(keep_float) + [Rule(".*", cfg)])


METHODS = {
    "w8a8": "W8A8: per-channel weights, dynamic per-token activations (ViDiT-Q baseline)",
    "w4a8": "W4A8: per-channel 4-bit packed weights, dynamic per-token 8-bit activations",
    "naive": "W8A8 naive: per-tensor weights, static per-tensor min-max activations",
    "w8a16": "weight-only 8-bit, per-channel",
    "w4a16": "weight-only 4-bit, per-group 64, packed",
}


# WxAy label of each recipe's quantized layers (first/last layers stay float).
METHOD_BITS = {"w8a8": "W8A8", "w4a8": "W4A8", "naive": "W8A8", "w8a16": "W8A16", "w4a16": "W4A16"}


def quantize_method(method: str, params: Mapping, stats: Optional[Mapping] = None) -> dict:
    """Apply a recipe by name (see :data:`METHODS`)."""
    if method == "w8a8":
        return w8a8_dynamic(params)
    if method == "w4a8":
        cfg = LayerQuant(weight=QuantSpec(bits=4, granularity="channel"),
                         act=QuantSpec(bits=8, granularity="token"), pack=True)
        return quantize_params(params, _keep(DEFAULT_KEEP_FLOAT) + [Rule(".*", cfg)])
    if method == "naive":
        if stats is None:
            raise ValueError("method 'naive' needs calibration statistics")
        return naive_static(params, stats)
    if method == "w8a16":
        return weight_only(params, bits=8)
    if method == "w4a16":
        return weight_only(params, bits=4, group_size=64)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
