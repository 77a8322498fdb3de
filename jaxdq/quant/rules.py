"""Path rules: turn a float params tree into a quantized one.

A linear layer in a params tree is a dict holding a 2-D ``"kernel"``; its path is
the ``/``-joined keys leading to it (``"blocks_3/attn/qkv"``).  A :class:`Rule`
maps a regex on that path (and optionally a role tag) to a :class:`LayerQuant`
config; the first matching rule wins, ``None`` as config keeps the layer float,
and layers no rule matches stay float.  So "cross-attention stays 8-bit, the rest
4-bit" is two rules.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from jaxdq.quant.hadamard import rotate_kernel
from jaxdq.quant.qlinear import QLinear
from jaxdq.quant.quantizer import QuantSpec, compute_qparams, pack_int4, quantize

Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """How to quantize one linear layer.

    weight: QuantSpec of the weight (granularity "tensor" | "channel" | "group").
    act: QuantSpec of the input activation, or None to keep activations float
      (weight-only quantization).
    act_static: take activation qparams from calibration statistics (per-tensor
      min-max) instead of computing them from the tensor at every call.
    pack: store 4-bit weight codes two per byte.
    impl: "fake" (float reference) or "int" (integer accumulator), see QLinear.
    """

    weight: QuantSpec
    act: Optional[QuantSpec] = None
    act_static: bool = False
    pack: bool = False
    impl: str = "fake"

    def __post_init__(self):
        if self.act_static and self.act is None:
            raise ValueError("act_static=True needs an activation QuantSpec")
        if self.act_static and self.act.granularity != "tensor":
            raise ValueError("static activation quantization is per-tensor; "
                             f"got granularity {self.act.granularity!r}")
        if self.pack and self.weight.bits > 4:
            raise ValueError(f"pack=True needs weight bits <= 4, got {self.weight.bits}")
        if self.impl not in ("fake", "int"):
            raise ValueError(f"impl must be 'fake' or 'int', got {self.impl!r}")

    @property
    def bits_label(self) -> str:
        return f"W{self.weight.bits}A{self.act.bits if self.act else 16}"


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern``: regex searched in the layer path; ``roles``: if given, the layer's
    role tag must be one of them; ``config``: LayerQuant, or None to keep float."""

    pattern: str
    config: Optional[LayerQuant]
    roles: Optional[tuple[str, ...]] = None

    def matches(self, path: str, role: Optional[str]) -> bool:
        if self.roles is not None and role not in self.roles:
            return False
        return re.search(self.pattern, path) is not None


def is_float_linear(node: Any) -> bool:
    return (isinstance(node, Mapping) and "kernel" in node
            and getattr(node["kernel"], "ndim", 0) == 2)


def is_quantized_linear(node: Any) -> bool:
    return isinstance(node, Mapping) and isinstance(node.get("qlinear"), QLinear)


def iter_linears(params: Params, prefix: str = "") -> Iterator[tuple[str, Mapping]]:
    """Yield ``(path, layer_dict)`` for every float or quantized linear layer."""
    for key, node in params.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if is_float_linear(node) or is_quantized_linear(node):
            yield path, node
        elif isinstance(node, Mapping):
            yield from iter_linears(node, path)


def map_linears(params: Params, fn: Callable[[str, Mapping], Any], prefix: str = "") -> dict:
    """Copy of ``params`` with every linear layer dict replaced by ``fn(path, layer)``."""
    out = {}
    for key, node in params.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if is_float_linear(node) or is_quantized_linear(node):
            out[key] = fn(path, node)
        elif isinstance(node, Mapping):
            out[key] = map_linears(node, fn, path)
        else:
            out[key] = node
    return out


def get_path(tree: Mapping, path: str) -> Any:
    """``tree["a"]["b"]`` for path ``"a/b"``; KeyError naming the path if absent."""
    node = tree
    for k in path.split("/"):
        if not isinstance(node, Mapping) or k not in node:
            raise KeyError(f"no entry {path!r} (missing at {k!r})")
        node = node[k]
    return node


def static_act_qparams(stats: Mapping, spec: QuantSpec) -> tuple[jnp.ndarray, Optional[jnp.ndarray]]:
    """Per-tensor activation (scale, zero) from calibration min/max statistics."""
    lo, hi = jnp.minimum(stats["min"], 0.0), jnp.maximum(stats["max"], 0.0)
    probe = jnp.stack([lo, hi])
    return compute_qparams(probe, spec, kind="activation")


def quantize_linear(layer: Mapping, cfg: LayerQuant,
                    act_stats: Optional[Mapping] = None) -> QLinear:
    """Quantize one float linear layer dict ``{"kernel": [C_in, C_out], "bias"?}``.

    The dict's float-equivalent transforms (``smooth``, ``hadamard``, ``lowrank_a``/
    ``lowrank_b``) are carried into the QLinear; only ``kernel`` is quantized.
    ``act_stats`` (this layer's calibration statistics, see ``jaxdq.nn``) is needed
    only for static activation quantization.
    """
    w = jnp.asarray(layer["kernel"], jnp.float32)
    scale, zero = compute_qparams(w, cfg.weight, kind="weight")
    codes = quantize(w, scale, zero, cfg.weight, kind="weight")
    if cfg.pack:
        codes = pack_int4(codes)
    act_scale = act_zero = None
    if cfg.act_static:
        if act_stats is None:
            raise ValueError("static activation quantization needs calibration statistics")
        act_scale, act_zero = static_act_qparams(act_stats, cfg.act)
    bias = layer.get("bias")
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
    had = layer.get("hadamard")
    return QLinear(qweight=codes, w_scale=scale, w_zero=zero, bias=f32(bias),
                   act_scale=act_scale, act_zero=act_zero, smooth=f32(layer.get("smooth")),
                   lowrank_a=f32(layer.get("lowrank_a")), lowrank_b=f32(layer.get("lowrank_b")),
                   w_spec=cfg.weight, act_spec=cfg.act, packed=cfg.pack, impl=cfg.impl,
                   had_block=0 if had is None else had.block)


def quantize_params(params: Params, rules: Sequence[Rule], *,
                    stats: Optional[Mapping] = None,
                    roles: Optional[Mapping[str, str]] = None) -> dict:
    """Quantize every linear layer of ``params`` that a rule selects.

    Args:
      params: float (or partly quantized) params tree.
      rules: first matching rule wins; unmatched layers stay as they are.
      stats: calibration statistics tree with the same module paths
        (``act_stats`` collection of :class:`jaxdq.nn.Linear`); needed for static rules.
      roles: path → role tag, for rules that select on roles.
    Returns:
      A new params tree; selected layers become ``{"qlinear": QLinear}``.
    """
    roles = roles or {}

    def convert(path, layer):
        if not is_float_linear(layer):
            return layer
        for rule in rules:
            if rule.matches(path, roles.get(path)):
                if rule.config is None:
                    return layer
                layer_stats = None
                if rule.config.act_static:
                    if stats is None:
                        raise ValueError(f"rule {rule.pattern!r} is static but no calibration stats were given")
                    layer_stats = get_path(stats, path)
                return {"qlinear": quantize_linear(layer, rule.config, layer_stats)}
        return layer

    return map_linears(params, convert)


def dequantize_params(params: Params) -> dict:
    """Float params tree whose linears hold the weights the quantized layers use
    (smoothing folded back out); activation quantization is dropped."""

    def back(path, layer):
        if not is_quantized_linear(layer):
            return layer
        q: QLinear = layer["qlinear"]
        w = q.dequantized_weight()
        if q.lowrank_a is not None:
            w = w + q.lowrank_a @ q.lowrank_b
        if q.had_block:
            w = rotate_kernel(w, q.had_block)
        if q.smooth is not None:
            w = w / q.smooth[:, None]
        out = {"kernel": w}
        if q.bias is not None:
            out["bias"] = q.bias
        return out

    return map_linears(params, back)


def summarize(params: Params) -> list[dict]:
    """One row per linear layer: path, shape, bits label, weight bytes."""
    rows = []
    for path, layer in iter_linears(params):
        if is_quantized_linear(layer):
            q = layer["qlinear"]
            label = f"W{q.w_spec.bits}A{q.act_spec.bits if q.act_spec else 16}"
            shape = (q.in_features, q.out_features)
            nb = sum(int(np.prod(a.shape)) * a.dtype.itemsize
                     for a in (q.qweight, q.w_scale, q.w_zero, q.lowrank_a, q.lowrank_b, q.smooth) if a is not None)
        else:
            label = "float"
            shape = tuple(layer["kernel"].shape)
            nb = int(np.prod(shape)) * layer["kernel"].dtype.itemsize
        rows.append({"path": path, "shape": shape, "bits": label, "weight_bytes": nb})
    return rows


def use_kernels(params: Params, *, layout: str = "nk") -> Params:
    """Every quantized linear (also inside timestep :class:`~jaxdq.quant.timestep.Segmented`
    nodes) set to ``impl="kernel"`` with its codes stored in ``layout``.

    ``impl="kernel"`` runs :func:`pallas_kernels.ops.qlinear_apply`: the Pallas GPU
    kernels on a CUDA backend, the layer's own reference elsewhere.  "nk" stores the
    codes K-major (``[C_out, C_in]``), as the Hopper wgmma kernels read them, so no
    weight transpose happens per call.  Same outputs as before, up to the kernels'
    bf16 rounding.
    """
    import jax

    def conv(node):
        if isinstance(node, QLinear):
            return node.to_layout(layout).replace(impl="kernel")
        return node

    return jax.tree_util.tree_map(conv, params, is_leaf=lambda n: isinstance(n, QLinear))
