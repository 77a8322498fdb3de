"""Orbax export / reload of (quantized) params trees with their metadata.

A checkpoint directory holds two orbax items:
  ``params``  — every array of the params tree as plain nested dicts: a typed node
                (:data:`NODE_TYPES`) becomes the dict of its array fields;
  ``meta``    — JSON: method, bits, model family and config, jaxdq and format versions,
                and ``nodes``: for every typed node, its class and static fields.
The schema is derived from the dataclasses (their pytree fields are arrays or nodes,
their static fields JSON), so a new layer type needs only an entry in
:data:`NODE_TYPES`.  How a layer executes is not in it: that is the backend's policy.

Reloading rebuilds the nodes, so a model samples from the checkpoint alone, without the
float weights.  Checkpoints of format 1 (jaxdq 0.1.0, ``{"qlinear": QLinear}`` nodes) are
converted on load (:func:`_from_format_1`).

Integrity: :func:`save` lists every file it wrote with its size and BLAKE2 digest in
``jaxdq_files.json``; :func:`load` checks them before orbax reads anything, so a missing,
truncated or altered file is one error naming it (``CheckpointFormatError``), never a
decoder traceback.  Older checkpoints without the list get structural checks and a read of
every array, one at a time, before orbax's (:func:`_check_arrays_readable`): orbax reads
the arrays concurrently, and when one read fails the others' completions land on its
closed event loop — ``RuntimeError: Event loop is closed`` tracebacks on stderr, printed by
tensorstore's threads after the error itself.  So orbax is only ever given a checkpoint
whose every array has been read once already.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import jaxdq
from jaxdq.quant.duquant import DuQuantRotation
from jaxdq.quant.hadamard import BlockHadamard, FullHadamard
from jaxdq.quant.layers import (ActQuant, FloatConv, FloatLinear, InputTransform, QConv, QLinear, QWeight, Segmented,
                                get_path, set_path)
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.progressive import ProgressiveWeight
from jaxdq.quant.twinlog import TwinLogWeight

FORMAT_VERSION = 2
FILE_LIST = "jaxdq_files.json"
NODE_TYPES = {c.__name__: c for c in (FloatLinear, QLinear, FloatConv, QConv, QWeight, ActQuant, InputTransform,
                                      BlockHadamard, FullHadamard, Segmented, TwinLogWeight, DuQuantRotation,
                                      ProgressiveWeight)}


class CheckpointFormatError(ValueError):
    """A checkpoint this jaxdq cannot read (unknown format or node type)."""


# Temporary directories of a save in progress or interrupted: orbax's, and jaxdq.outputs'.
UNFINISHED_MARKERS = (".orbax-checkpoint-tmp", ".jaxdq-tmp-")
_ORBAX_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")


def looks_like_checkpoint(path: str) -> bool:
    """Whether the directory ``path`` is (or was meant to be) an orbax / jaxdq checkpoint
    rather than a PyTorch one: it has ``meta/`` or orbax's marker files, or is a temporary
    directory of an unfinished save."""
    if any(m in os.path.basename(os.path.normpath(path)) for m in UNFINISHED_MARKERS):
        return True
    return (os.path.isdir(os.path.join(path, "meta")) or os.path.isfile(os.path.join(path, FILE_LIST))
            or any(os.path.isfile(os.path.join(path, n)) for n in _ORBAX_FILES))


# --------------------------------------------------------------------------- static values
def _static_to_json(v: Any) -> Any:
    if isinstance(v, QuantSpec):
        return {"QuantSpec": dataclasses.asdict(v)}
    if isinstance(v, tuple):
        return {"tuple": [_static_to_json(x) for x in v]}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic)):
        return {"dtype": np.dtype(v).name}
    raise TypeError(f"cannot store static field value {v!r} in a checkpoint")


def _static_from_json(v: Any) -> Any:
    if isinstance(v, dict):
        if "QuantSpec" in v:
            return QuantSpec(**v["QuantSpec"])
        if "tuple" in v:
            return tuple(_static_from_json(x) for x in v["tuple"])
        if "dtype" in v:
            return np.dtype(v["dtype"])
    if isinstance(v, list):
        return tuple(_static_from_json(x) for x in v)
    return v


def _is_static(f: dataclasses.Field) -> bool:
    return f.metadata.get("pytree_node", True) is False


# --------------------------------------------------------------------------- encode
def _encode(value: Any, path: str, nodes: dict) -> Any:
    """Array tree of ``value`` (a node, dict, array or None); nodes recorded in ``nodes``."""
    if type(value).__name__ in NODE_TYPES and dataclasses.is_dataclass(value):
        info = {"type": type(value).__name__, "static": {}, "fields": {}}
        arrays = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if _is_static(f):
                info["static"][f.name] = _static_to_json(v)
            elif v is None:
                info["fields"][f.name] = None
            elif isinstance(v, tuple):
                info["fields"][f.name] = {"tuple": len(v)}
                arrays[f.name] = {str(i): _encode(x, f"{path}/{f.name}/{i}", nodes) for i, x in enumerate(v)}
            elif type(v).__name__ in NODE_TYPES:
                info["fields"][f.name] = "node"
                arrays[f.name] = _encode(v, f"{path}/{f.name}", nodes)
            else:
                info["fields"][f.name] = "array"
                arrays[f.name] = np.asarray(v)
        nodes[path] = info
        return arrays
    if isinstance(value, Mapping):
        return {k: _encode(v, f"{path}/{k}" if path else str(k), nodes) for k, v in value.items()}
    return np.asarray(value)


def _decode(arrays: Mapping, path: str, nodes: Mapping) -> Any:
    info = nodes[path]
    cls = NODE_TYPES.get(info["type"])
    if cls is None:
        raise CheckpointFormatError(f"unknown layer type {info['type']!r} at {path!r} (written by a newer jaxdq?)")
    kwargs = {k: _static_from_json(v) for k, v in info["static"].items()}
    for name, kind in info["fields"].items():
        if kind is None:
            kwargs[name] = None
        elif kind == "array":
            kwargs[name] = jnp.asarray(get_path(arrays, f"{path}/{name}"))
        elif kind == "node":
            kwargs[name] = _decode(arrays, f"{path}/{name}", nodes)
        else:
            kwargs[name] = tuple(_decode(arrays, f"{path}/{name}/{i}", nodes) for i in range(kind["tuple"]))
    return cls(**kwargs)


def _empty_pruned(tree: Any) -> Any:
    """Drop empty dicts (nodes without arrays, e.g. a BlockHadamard), which orbax does not store."""
    if isinstance(tree, Mapping):
        out = {k: _empty_pruned(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if not (isinstance(v, Mapping) and not v)}
    return tree


def encode(params: Mapping) -> tuple[dict, dict]:
    """``(array tree, nodes)`` of a params tree (see module docstring)."""
    nodes: dict = {}
    arrays = _encode(params, "", nodes)
    return _empty_pruned(arrays), nodes


def decode(arrays: Mapping, nodes: Mapping) -> dict:
    """Inverse of :func:`encode`."""
    out = _to_jnp(arrays)
    tops = [p for p in nodes if not any(p.startswith(q + "/") for q in nodes if q != p)]
    for path in tops:
        set_path(out, path, _decode(arrays, path, nodes))
    return out


def _to_jnp(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_jnp(v) for k, v in tree.items()}
    return jnp.asarray(tree)


# --------------------------------------------------------------------------- save / load
def save(path: str | os.PathLike, params: Mapping, *, metadata: Mapping[str, Any] | None = None,
         force: bool = False) -> str:
    """Write ``params`` (float or quantized) and ``metadata`` to the directory ``path``.

    ``metadata`` should name at least ``method``, ``bits``, ``arch`` and ``model`` (the
    model config dict); the jaxdq and format versions and the node schema are added.
    Returns the absolute checkpoint path.
    """
    path = os.path.abspath(os.fspath(path))
    arrays, nodes = encode(params)
    meta = dict(metadata or {})
    meta.update(jaxdq_version=jaxdq.__version__, format_version=FORMAT_VERSION, nodes=nodes)
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    ckptr.save(path, ocp.args.Composite(params=ocp.args.StandardSave(arrays),
                                        meta=ocp.args.JsonSave(meta)), force=force)
    if hasattr(ckptr, "wait_until_finished"):
        ckptr.wait_until_finished()
    with open(os.path.join(path, FILE_LIST), "w") as f:
        json.dump(_file_list(path), f, indent=0)
    return path


def _digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_list(root: str) -> dict:
    """``{relative path: [size, digest]}`` of every file under ``root`` but the list itself."""
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            full = os.path.join(d, name)
            rel = os.path.relpath(full, root)
            if rel != FILE_LIST:
                out[rel] = [os.path.getsize(full), _digest(full)]
    return out


def _json_object(path: str, error: str) -> dict:
    """The JSON object in ``path``, or :class:`CheckpointFormatError` ``error``."""
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        raise CheckpointFormatError(error) from None
    if not isinstance(value, dict):
        raise CheckpointFormatError(error)
    return value


def verify(path: str) -> dict:
    """The checkpoint's metadata, after checking its files (module docstring); one-line
    :class:`CheckpointFormatError` naming the first problem."""
    name = os.path.basename(os.path.normpath(path))
    if any(m in name for m in UNFINISHED_MARKERS):
        raise CheckpointFormatError(f"{path}: an unfinished checkpoint (the temporary directory of a save that "
                                    "was interrupted or is still running); it cannot be loaded, write it again")
    meta_file = os.path.join(path, "meta", "metadata")
    if not os.path.isfile(meta_file):
        if not os.listdir(path):
            raise CheckpointFormatError(f"{path}: an empty directory, not a jaxdq checkpoint")
        raise CheckpointFormatError(f"{path}: not a jaxdq checkpoint (no meta/metadata)")
    listing = os.path.join(path, FILE_LIST)
    if os.path.exists(listing):
        files = _json_object(listing, f"{listing}: corrupt file list")
        for rel, entry in files.items():
            full = os.path.join(path, rel)
            if not isinstance(entry, list) or len(entry) != 2:
                raise CheckpointFormatError(f"{listing}: corrupt file list (entry {rel!r})")
            if not os.path.isfile(full):
                raise CheckpointFormatError(f"{path}: damaged checkpoint: {rel} is missing")
            size = os.path.getsize(full)
            if size != entry[0]:
                raise CheckpointFormatError(f"{path}: damaged checkpoint: {rel} has {size} bytes, "
                                            f"{entry[0]} were written (truncated or altered)")
            if _digest(full) != entry[1]:
                raise CheckpointFormatError(f"{path}: damaged checkpoint: {rel} is corrupt (its contents changed "
                                            "since it was written)")
    else:
        for rel in ("params/_METADATA", "params/manifest.ocdbt"):
            if not os.path.isfile(os.path.join(path, rel)):
                raise CheckpointFormatError(f"{path}: damaged checkpoint: {rel} is missing")
        for rel in ("_CHECKPOINT_METADATA", "params/_METADATA"):  # orbax's JSON files
            full = os.path.join(path, rel)
            if os.path.exists(full):
                _json_object(full, f"{path}: damaged checkpoint: {rel} is corrupt (not JSON)")
    meta = _json_object(meta_file, f"{meta_file}: corrupt checkpoint metadata (not a JSON object)")
    if not os.path.exists(listing):
        _check_arrays_readable(path)
    return meta


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _check_arrays_readable(path: str) -> None:
    """Read every array of ``path/params`` once, one at a time, with tensorstore's blocking
    calls (no event loop), so that a missing, truncated or corrupt data file is one error
    naming the array before orbax's concurrent read (module docstring).  For checkpoints
    without the file list only: the list's digests already cover every byte."""
    import tensorstore as ts

    params = os.path.join(path, "params")
    kvstore = {"driver": "ocdbt", "base": "file://" + os.path.abspath(params) + "/"}
    try:
        keys = ts.KvStore.open(kvstore).result().list().result()
    except Exception as e:  # noqa: BLE001  (tensorstore raises ValueError / RuntimeError / ...)
        raise CheckpointFormatError(f"{path}: damaged checkpoint: the array index under params/ cannot be read "
                                    f"({_first_line(e)})") from None
    arrays = {}
    for key in keys:
        name, _, leaf = key.decode("utf-8", "replace").rpartition("/")
        if leaf in (".zarray", "zarr.json"):
            arrays[name] = "zarr" if leaf == ".zarray" else "zarr3"
    if not arrays:
        raise CheckpointFormatError(f"{path}: damaged checkpoint: params/ holds no arrays")
    for name, driver in sorted(arrays.items()):
        try:
            ts.open({"driver": driver, "kvstore": dict(kvstore, path=name + "/")}, open=True).result().read().result()
        except Exception as e:  # noqa: BLE001
            raise CheckpointFormatError(f"{path}: damaged checkpoint: array {name!r} under params/ cannot be read, "
                                        f"a data file is missing, truncated or corrupt ({_first_line(e)})") from None


def load(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a checkpoint written by :func:`save` (or by jaxdq 0.1.0) → ``(params, metadata)``."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory (no jaxdq checkpoint there)")
    if not os.path.isdir(path):
        raise CheckpointFormatError(f"{path}: a file, not a jaxdq checkpoint directory "
                                    "(a PyTorch checkpoint is made into one with jaxdq convert)")
    meta = verify(path)
    version = meta.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise CheckpointFormatError(f"{path}: checkpoint format {version!r} is not one this jaxdq "
                                    f"{jaxdq.__version__} reads (formats 1 and {FORMAT_VERSION})")
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        arrays = ckptr.restore(path, ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    except Exception as e:  # noqa: BLE001  (orbax / tensorstore raise many types for damaged data)
        raise CheckpointFormatError(f"{path}: damaged checkpoint: orbax cannot read the arrays under params/ "
                                    f"({type(e).__name__}: {_first_line(e)})") from None
    try:
        if version == 1:
            return _from_format_1(arrays, meta)
        return decode(arrays, meta["nodes"]), meta
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointFormatError):
            raise
        raise CheckpointFormatError(f"{path}: damaged checkpoint: its metadata does not match its arrays "
                                    f"({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- format 1 (0.1.0)
def _qlinear_v1(a: Mapping, cfg: Mapping) -> QLinear:
    """A 0.1.0 ``QLinear`` (flat fields) as today's typed layer; its ``impl`` is dropped
    (how a layer runs is the backend's policy now)."""
    arr = lambda k: None if k not in a else jnp.asarray(a[k])  # noqa: E731
    spec = lambda d: None if d is None else QuantSpec(**d)  # noqa: E731
    weight = QWeight(codes=arr("qweight"), scale=arr("w_scale"), zero=arr("w_zero"), spec=spec(cfg["w_spec"]),
                     packed=cfg["packed"], layout=cfg.get("w_layout", "kn"))
    act = None
    if cfg["act_spec"] is not None:
        act = ActQuant(spec=spec(cfg["act_spec"]), scale=arr("act_scale"), zero=arr("act_zero"), t=arr("act_t"))
    rot = BlockHadamard(cfg["had_block"]) if cfg.get("had_block") else None
    transform = InputTransform(smooth=arr("smooth"), rotation=rot, lowrank_a=arr("lowrank_a"),
                               lowrank_b=arr("lowrank_b"))
    return QLinear(weight=weight, act=act, bias=arr("bias"), transform=transform)


def _layer_v1(arrays: Mapping, layers: Mapping, path: str) -> Any:
    """The layer stored at module path ``path`` in a format-1 checkpoint."""
    info = layers.get(path)
    if info is not None and "segmented" in info:
        seg = info["segmented"]
        variants = tuple(_layer_v1(arrays, layers, f"{path}/v{i}") if f"{path}/v{i}/qlinear" in layers
                         else _float_v1(get_path(arrays, f"{path}/v{i}")) for i in range(seg["variants"]))
        return Segmented(variants=variants, index=tuple(seg["index"]), bounds=tuple(seg["bounds"]))
    return _qlinear_v1(get_path(arrays, path + "/qlinear"), layers[path + "/qlinear"])


def _float_v1(d: Mapping) -> dict:
    return {k: jnp.asarray(v) for k, v in d.items()}


def _from_format_1(arrays: Mapping, meta: dict) -> tuple[dict, dict]:
    layers = meta.get("layers", {})
    out = _to_jnp(arrays)
    module_paths = {p[: -len("/qlinear")] for p in layers if p.endswith("/qlinear")}
    module_paths |= {p for p, v in layers.items() if "segmented" in v}
    # a Segmented node's variants are recorded too ("a/b/v0/qlinear"): only top-level module paths
    tops = [p for p in module_paths if not any(p.startswith(q + "/") for q in module_paths if q != p)]
    for path in tops:
        set_path(out, path, _layer_v1(arrays, layers, path))
    meta = {k: v for k, v in meta.items() if k != "layers"}
    return out, meta
