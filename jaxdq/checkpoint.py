"""Orbax export / reload of (quantized) params trees with their metadata.

A checkpoint directory holds two orbax items:
  ``params``  — the arrays, with every QLinear flattened to a dict of its array
                fields (plus a marker), so orbax sees plain nested dicts;
  ``meta``    — JSON: method, bits, jaxdq version, model config, and for every
                quantized layer its static configuration (QuantSpecs, packing).
Reloading rebuilds the QLinear nodes, so a model samples from the checkpoint
alone, without the float weights.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import jaxdq
from jaxdq.quant.qlinear import QLinear
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.timestep import Segmented

_ARRAY_FIELDS = ("qweight", "w_scale", "w_zero", "bias", "act_scale", "act_zero",
                 "smooth", "lowrank_a", "lowrank_b", "act_t")
FORMAT_VERSION = 1


def _spec_to_json(spec: QuantSpec | None):
    return None if spec is None else dataclasses.asdict(spec)


def _spec_from_json(d) -> QuantSpec | None:
    return None if d is None else QuantSpec(**d)


def _flatten(tree: Mapping, layers: dict, prefix: str = "") -> dict:
    """Nested dict of numpy arrays; QLinear nodes recorded in ``layers`` by path."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Segmented):
            layers[path] = {"segmented": {"index": list(v.index), "bounds": list(v.bounds),
                                          "variants": len(v.variants)}}
            out[k] = {f"v{i}": _flatten(var, layers, f"{path}/v{i}") for i, var in enumerate(v.variants)}
        elif isinstance(v, QLinear):
            layers[path] = {"w_spec": _spec_to_json(v.w_spec), "act_spec": _spec_to_json(v.act_spec),
                            "packed": v.packed, "impl": v.impl, "had_block": v.had_block,
                            "w_layout": v.w_layout}
            out[k] = {f: np.asarray(getattr(v, f)) for f in _ARRAY_FIELDS if getattr(v, f) is not None}
        elif isinstance(v, Mapping):
            out[k] = _flatten(v, layers, path)
        else:
            out[k] = np.asarray(v)
    return out


def _unflatten(tree: Mapping, layers: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if path in layers and "segmented" in layers[path]:
            seg = layers[path]["segmented"]
            out[k] = Segmented(variants=tuple(_unflatten(v[f"v{i}"], layers, f"{path}/v{i}")
                                              for i in range(seg["variants"])),
                               index=tuple(seg["index"]), bounds=tuple(seg["bounds"]))
        elif path in layers:
            cfg = layers[path]
            out[k] = QLinear(**{f: jax.numpy.asarray(a) for f, a in v.items()},
                             w_spec=_spec_from_json(cfg["w_spec"]),
                             act_spec=_spec_from_json(cfg["act_spec"]),
                             packed=cfg["packed"], impl=cfg["impl"],
                             had_block=cfg.get("had_block", 0),
                             w_layout=cfg.get("w_layout", "kn"))
        elif isinstance(v, Mapping):
            out[k] = _unflatten(v, layers, path)
        else:
            out[k] = jax.numpy.asarray(v)
    return out


def save(path: str | os.PathLike, params: Mapping, *, metadata: Mapping[str, Any] | None = None,
         force: bool = False) -> str:
    """Write ``params`` (float or quantized) and ``metadata`` to the directory ``path``.

    ``metadata`` should name at least ``method``, ``bits`` and ``model`` (the model
    config dict); the jaxdq version and format version are added.
    Returns the absolute checkpoint path.
    """
    path = os.path.abspath(os.fspath(path))
    layers: dict = {}
    arrays = _flatten(params, layers)
    meta = dict(metadata or {})
    meta.update(jaxdq_version=jaxdq.__version__, format_version=FORMAT_VERSION, layers=layers)
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    ckptr.save(path, ocp.args.Composite(params=ocp.args.StandardSave(arrays),
                                        meta=ocp.args.JsonSave(meta)), force=force)
    ckptr.wait_until_finished() if hasattr(ckptr, "wait_until_finished") else None
    return path


def load(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a checkpoint written by :func:`save` → ``(params, metadata)``."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no jaxdq checkpoint at {path}")
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    meta = ckptr.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format_version')!r}")
    arrays = ckptr.restore(path, ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    return _unflatten(arrays, meta["layers"]), meta
