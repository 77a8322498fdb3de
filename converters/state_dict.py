"""Read a PyTorch checkpoint into ``{name: float32 numpy array}`` without running pickled code.

Sources: ``.safetensors``; ``.pt`` / ``.pth`` / ``.bin`` (``torch.load(weights_only=True)``;
torch is imported only here); a diffusers model folder (``config.json`` +
``diffusion_pytorch_model[.safetensors|.bin]``, sharded or not), or a diffusers
pipeline folder with a ``transformer/`` model folder inside.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

# Training checkpoints nest the weights; DiT's own loader (``find_model``) prefers the EMA.
NESTED_KEYS = ("ema", "model", "state_dict")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (format, unsafe pickle, no weights)."""


class StateDict(dict):
    """``{name: float32 numpy array}``; ``config`` is the diffusers ``config.json`` (dict)
    when loaded from a diffusers folder, else None; ``source`` the path read."""

    def __init__(self, arrays: Mapping[str, np.ndarray], config: Optional[dict] = None,
                 source: Optional[str] = None):
        super().__init__(arrays)
        self.config = config
        self.source = source


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Load a checkpoint file or diffusers folder as float32 numpy arrays (see module docstring)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_diffusers_folder(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.endswith(".safetensors"):
        return StateDict(_read_safetensors(path), source=path)
    if path.endswith(TORCH_SUFFIXES):
        return StateDict(_read_torch(path), source=path)
    raise CheckpointError(f"unsupported checkpoint {path!r}: expected .safetensors, "
                          f"{'/'.join(TORCH_SUFFIXES)} or a diffusers model folder")


def _load_diffusers_folder(path: str) -> StateDict:
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "transformer")):
        return _load_diffusers_folder(os.path.join(path, "transformer"))
    config_path = os.path.join(path, "config.json")
    config = None
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
    for name in DIFFUSERS_WEIGHTS:
        weights = os.path.join(path, name)
        index = weights + ".index.json"
        if os.path.exists(weights):
            files = [weights]
        elif os.path.exists(index):
            with open(index) as f:
                files = [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
        else:
            continue
        arrays: dict[str, np.ndarray] = {}
        for w in files:
            arrays.update(_read_safetensors(w) if w.endswith(".safetensors") else _read_torch(w))
        return StateDict(arrays, config=config, source=path)
    raise CheckpointError(f"{path} is a folder without {' or '.join(DIFFUSERS_WEIGHTS)} (sharded or not)")


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """safetensors → float32 arrays.  Read by hand (the format is a JSON header and raw
    little-endian buffers) because ``safetensors.numpy`` rejects bfloat16."""
    import ml_dtypes  # a jax dependency

    dtypes = dict(_SAFETENSORS_DTYPES, BF16=ml_dtypes.bfloat16)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=np.dtype(dtypes[info["dtype"]]).newbyteorder("<"))
        out[name] = arr.reshape(info["shape"]).astype(np.float32)
    return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch (pip install torch); "
                          ".safetensors files and diffusers folders with safetensors do not") from e
    import argparse
    import pickle

    # DiT training checkpoints store their argparse.Namespace, a plain data holder.
    safe = [argparse.Namespace]
    try:
        with torch.serialization.safe_globals(safe):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it pickles objects other than tensors and plain containers, "
            f"and unpickling them could run arbitrary code (torch.load weights_only=True said: "
            f"{str(e).splitlines()[0]})") from e
    sd = _pick_state_dict(obj, path)
    return {k: v.detach().to(torch.float32).numpy() for k, v in sd.items()}


def _pick_state_dict(obj: Any, path: str) -> Mapping:
    """The raw state dict, or the EMA / model / state_dict entry of a training checkpoint."""
    import torch

    def is_state_dict(d):
        return isinstance(d, Mapping) and d and all(isinstance(v, torch.Tensor) for v in d.values())

    if is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for k in NESTED_KEYS:
            if is_state_dict(obj.get(k)):
                return obj[k]
        raise CheckpointError(f"{path}: no state dict found; top-level keys {sorted(map(str, obj))[:20]}, "
                              f"expected tensors or one of {NESTED_KEYS} holding them")
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
