"""Read a PyTorch checkpoint into ``{name: float32 numpy array}`` without running pickled code.

Sources: ``.safetensors``; ``.pt`` / ``.pth`` / ``.bin`` (``torch.load(weights_only=True)``;
torch is imported only here); a diffusers model folder (``config.json`` +
``diffusion_pytorch_model[.safetensors|.bin]``, sharded or not), or a diffusers
pipeline folder with a ``transformer/`` model folder inside.

Every malformed input raises :class:`CheckpointError` with one line that names the
file and what is wrong with it.  A safetensors file is validated completely — header
length against the file size, the header's JSON, every entry's dtype, shape and
``data_offsets`` against each other and against the data section — before any tensor
data is read, so a truncated, corrupt or non-safetensors file never reaches NumPy.
:func:`check_finite` is the separate NaN/inf check converters call on the loaded arrays.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

# Training checkpoints nest the weights; DiT's own loader (``find_model``) prefers the EMA.
NESTED_KEYS = ("ema", "model", "state_dict")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# The safetensors library refuses larger headers too (100 MB).
MAX_HEADER_BYTES = 100_000_000
# Files that mark a jaxdq / orbax checkpoint folder (told apart from a PyTorch one in the error).
_ORBAX_FILES = ("_CHECKPOINT_METADATA", "manifest.ocdbt", "_METADATA", "_sharding")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (format, corrupt or truncated file, unsafe pickle,
    no weights, non-finite values).  The message is always a single line."""

    def __init__(self, message: str):
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


def _err(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


class StateDict(dict):
    """``{name: float32 numpy array}``; ``config`` is the diffusers ``config.json`` (dict)
    when loaded from a diffusers folder, else None; ``source`` the path read."""

    def __init__(self, arrays: Mapping[str, np.ndarray], config: Optional[dict] = None,
                 source: Optional[str] = None):
        super().__init__(arrays)
        self.config = config
        self.source = source


def load_state_dict(path: str | os.PathLike, *, require_finite: bool = False) -> StateDict:
    """Load a checkpoint file or diffusers folder as float32 numpy arrays (see module docstring).

    Args:
      path: a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` file or a diffusers folder.
      require_finite: also run :func:`check_finite` on the result.

    Raises:
      FileNotFoundError: nothing at ``path``.
      CheckpointError: anything else that makes ``path`` unreadable (one-line message).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        sd = _load_diffusers_folder(path)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory (no checkpoint there)")
    elif path.endswith(".safetensors"):
        sd = StateDict(_read_safetensors(path), source=path)
    elif path.endswith(TORCH_SUFFIXES):
        sd = StateDict(_read_torch(path), source=path)
    else:
        raise CheckpointError(f"unsupported checkpoint {path!r}: expected .safetensors, "
                              f"{'/'.join(TORCH_SUFFIXES)} or a diffusers model folder")
    if require_finite:
        check_finite(sd)
    return sd


def check_finite(state_dict: Mapping[str, np.ndarray], source: Optional[str] = None) -> None:
    """Raise :class:`CheckpointError` naming the first tensor (in key order) holding NaN or ±inf.

    ``source`` (default: ``state_dict.source`` for a :class:`StateDict`) is the file named
    in the message.  Integer and bool tensors are finite by construction.
    """
    source = source if source is not None else getattr(state_dict, "source", None)
    where = source if source is not None else "state dict"
    for name, value in state_dict.items():
        arr = np.asarray(value)
        if arr.dtype.kind in "biu":  # integers and bools are finite
            continue
        try:
            finite = np.isfinite(arr)
        except TypeError:  # not a numeric array (e.g. strings): nothing to check
            continue
        if finite.all():
            continue
        nan = int(np.isnan(arr).sum())
        inf = int(arr.size - finite.sum()) - nan
        parts = [f"{nan} NaN" if nan else "", f"{inf} inf" if inf else ""]
        raise _err(where, f"tensor {name!r} (shape {tuple(arr.shape)}) has "
                          f"{' and '.join(p for p in parts if p)} of {arr.size} values")


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise _err(path, f"cannot read {what} ({e.strerror or e})") from e
    if not raw.strip():
        raise _err(path, f"{what} is empty")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _err(path, f"{what} is not UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise _err(path, f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e


def _looks_like_orbax(path: str, names: list[str]) -> bool:
    return (".orbax-checkpoint-tmp" in os.path.basename(path.rstrip(os.sep))
            or any(n in names for n in _ORBAX_FILES)
            or all(n in names for n in ("params", "meta")))


def _load_diffusers_folder(path: str) -> StateDict:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path) and os.path.isdir(os.path.join(path, "transformer")):
        return _load_diffusers_folder(os.path.join(path, "transformer"))
    config = None
    if os.path.exists(config_path):
        config = _read_json(config_path, "config.json")
        if not isinstance(config, dict):
            raise _err(config_path, f"config.json holds a JSON {type(config).__name__}, not an object")
    for name in DIFFUSERS_WEIGHTS:
        weights = os.path.join(path, name)
        index = weights + ".index.json"
        weight_map = None
        if os.path.exists(weights):
            files = [weights]
        elif os.path.exists(index):
            files, weight_map = _index_shards(index, path)
        else:
            continue
        arrays: dict[str, np.ndarray] = {}
        for w in files:
            arrays.update(_read_safetensors(w) if w.endswith(".safetensors") else _read_torch(w))
        if weight_map is not None:
            missing = [k for k in weight_map if k not in arrays]
            if missing:
                raise _err(index, f"{len(missing)} tensor(s) listed in weight_map are in none of the shards "
                                  f"(first: {missing[0]!r}, said to be in {weight_map[missing[0]]})")
        return StateDict(arrays, config=config, source=path)
    if config is not None:
        raise _err(path, f"diffusers model folder (it has config.json) without "
                         f"{' or '.join(DIFFUSERS_WEIGHTS)} (sharded or not)")
    names = sorted(os.listdir(path))
    if _looks_like_orbax(path, names):
        raise _err(path, "not a PyTorch checkpoint folder: no config.json or weight files "
                         "(it looks like an orbax / jaxdq checkpoint; read it with `jaxdq load`)")
    if not names:
        raise _err(path, "not a PyTorch checkpoint folder: it is empty (no config.json or weight files)")
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    raise _err(path, f"not a PyTorch checkpoint folder: no config.json or weight files (it holds {shown})")


def _index_shards(index: str, folder: str) -> tuple[list[str], dict]:
    """The shard files a ``*.index.json`` names (each checked to exist) and its weight_map."""
    data = _read_json(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _err(index, "shard index has no \"weight_map\" object of tensor name → shard file")
    shards = set()
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or os.path.isabs(shard) or ".." in shard.split("/"):
            raise _err(index, f"weight_map entry {key!r} → {shard!r} is not a shard file name in this folder")
        shards.add(shard)
    files = []
    for shard in sorted(shards):
        f = os.path.join(folder, shard)
        if not os.path.isfile(f):
            raise _err(index, f"shard {shard} listed in weight_map is missing from {folder}")
        files.append(f)
    return files, weight_map


# ------------------------------------------------------------------------------------- safetensors

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
                       "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


def _safetensors_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes  # a jax dependency

    d = dict(_SAFETENSORS_DTYPES, BF16=ml_dtypes.bfloat16, F8_E4M3=ml_dtypes.float8_e4m3fn,
             F8_E5M2=ml_dtypes.float8_e5m2)
    return {k: np.dtype(v).newbyteorder("<") for k, v in d.items()}


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _safetensors_layout(path: str) -> tuple[int, list[tuple[str, np.dtype, tuple, int, int]]]:
    """Validate a safetensors file without reading its tensor data.

    Returns ``(data_start, [(name, dtype, shape, begin, end), ...])`` in header order.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                raise _err(path, "empty file (0 bytes), not a safetensors file")
            if len(head) < 8:
                raise _err(path, f"only {size} bytes, shorter than the 8-byte header length of a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise _err(path, f"header length {n} is larger than the file ({size} bytes): "
                                 f"not a safetensors file, or a truncated one")
            if n > MAX_HEADER_BYTES:
                raise _err(path, f"header length {n} exceeds the safetensors limit of {MAX_HEADER_BYTES} bytes")
            raw = f.read(n)
    except OSError as e:
        raise _err(path, f"cannot read ({e.strerror or e})") from e
    if len(raw) != n:  # the file shrank while being read
        raise _err(path, f"truncated: header of {n} bytes but only {len(raw)} could be read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _err(path, f"header is not UTF-8 text (byte {e.start} of {n}): not a safetensors file, "
                         f"or a corrupt one") from e
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise _err(path, f"header is not valid JSON ({e.msg} at column {e.colno}): "
                         f"not a safetensors file, or a corrupt one") from e
    except (ValueError, RecursionError) as e:
        raise _err(path, f"header is not a valid safetensors header ({str(e)[:80]})") from e
    if not isinstance(header, dict):
        raise _err(path, f"header is a JSON {type(header).__name__}, not an object of tensor entries")

    dtypes = _safetensors_dtypes()
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict)
                                         and all(isinstance(v, str) for v in info.values())):
                raise _err(path, "header's __metadata__ is not an object of strings")
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise _err(path, f"header entry {name!r} is not a tensor entry with dtype, shape and data_offsets")
        dt, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in dtypes:
            raise _err(path, f"tensor {name!r} has unsupported dtype {dt!r} "
                             f"(supported: {', '.join(sorted(dtypes))})")
        if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
            raise _err(path, f"tensor {name!r} has a bad shape {shape!r} (expected a list of non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise _err(path, f"tensor {name!r} has bad data_offsets {offsets!r} (expected [begin, end])")
        begin, end = offsets
        if begin > end:
            raise _err(path, f"tensor {name!r} has data_offsets [{begin}, {end}] out of order")
        nbytes = math.prod(shape) * dtypes[dt].itemsize
        if end - begin != nbytes:
            raise _err(path, f"tensor {name!r}: data_offsets [{begin}, {end}] span {end - begin} bytes "
                             f"but shape {shape} × {dt} needs {nbytes}")
        entries.append((name, dtypes[dt], tuple(shape), begin, end))

    data_len = size - 8 - n
    pos = 0
    for name, _, _, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != pos:
            # A tensor placed past the end explains the broken layout better than the gap it leaves.
            past = next(((nm, b, e) for nm, _, _, b, e in entries if e > data_len), None)
            if past is not None:
                raise _err(path, f"tensor {past[0]!r}: data_offsets [{past[1]}, {past[2]}] lie outside "
                                 f"the data section ({data_len} bytes)")
            what = ("overlaps the tensor before it" if begin < pos
                    else f"leaves a gap of {begin - pos} bytes before it")
            raise _err(path, f"tensor {name!r}: data_offsets [{begin}, {end}] {what} in the data section")
        pos = end
    if pos > data_len:
        raise _err(path, f"truncated: the data section has {data_len} bytes but the header's data_offsets "
                         f"need {pos} (file is {size} bytes, should be {8 + n + pos})")
    if pos < data_len:
        raise _err(path, f"{data_len - pos} bytes after the last tensor: the header's data_offsets "
                         f"cover {pos} of the data section's {data_len} bytes")
    return 8 + n, entries


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """safetensors → float32 arrays.  Read by hand (the format is a JSON header and raw
    little-endian buffers) because ``safetensors.numpy`` rejects bfloat16; the layout is
    validated first (:func:`_safetensors_layout`)."""
    start, entries = _safetensors_layout(path)
    total = max((e[4] for e in entries), default=0)
    if total == 0:  # np.memmap cannot map zero bytes
        return {name: np.zeros(shape, np.float32) for name, _, shape, _, _ in entries}
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(total,))
    except (OSError, ValueError) as e:
        raise _err(path, f"cannot map the data section ({e})") from e
    try:
        return {name: np.frombuffer(data[b:e], dtype=dt).reshape(shape).astype(np.float32)
                for name, dt, shape, b, e in entries}
    finally:
        del data


# ------------------------------------------------------------------------------------- torch pickles

def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch (pip install torch); "
                          ".safetensors files and diffusers folders with safetensors do not") from e
    import argparse
    import pickle

    size = os.path.getsize(path)
    if size == 0:
        raise _err(path, "empty file (0 bytes), not a PyTorch checkpoint")
    _check_torch_container(path, size)
    # DiT training checkpoints store their argparse.Namespace, a plain data holder.
    safe = [argparse.Namespace]
    try:
        with torch.serialization.safe_globals(safe):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _weights_only_detail(str(e))
        if detail is None or "global" not in detail.lower():  # a damaged pickle, not a forbidden object
            raise _err(path, f"not a readable PyTorch checkpoint (corrupt pickle: "
                             f"{detail or _first_line(str(e))})") from e
        raise CheckpointError(
            f"refusing to load {path}: it pickles objects other than tensors and plain containers, "
            f"and unpickling them could run arbitrary code (torch.load weights_only=True said: {detail})") from e
    except MemoryError as e:
        raise _err(path, "not a readable PyTorch checkpoint (corrupt: it asks for more memory than there is)") from e
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        kind = "truncated or corrupt zip archive" if "zip archive" in str(e) else "corrupt or not a checkpoint"
        raise _err(path, f"not a readable PyTorch checkpoint ({kind}: "
                         f"{type(e).__name__}: {_first_line(str(e))})") from e
    sd = _pick_state_dict(obj, path)
    return {k: v.detach().to(torch.float32).numpy() for k, v in sd.items()}


def _check_torch_container(path: str, size: int) -> None:
    """Cheap structural check before ``torch.load``: a zip-format checkpoint (torch ≥ 1.6) must have
    its central directory and every member inside the file; a legacy one must start as a pickle."""
    import zipfile

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                infos = z.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise _err(path, f"truncated or corrupt PyTorch checkpoint: its zip archive is unreadable ({e})") from e
        for info in infos:
            if info.header_offset + info.compress_size > size:
                raise _err(path, f"truncated PyTorch checkpoint: zip member {info.filename} ends past "
                                 f"the end of the file ({size} bytes)")
    elif magic[:1] != b"\x80":
        raise _err(path, "not a PyTorch checkpoint: neither a zip archive nor a pickle "
                         f"(it starts with {magic!r})")


def _first_line(msg: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in _ANSI.sub("", msg).splitlines() if ln.strip()), "no message")
    return line if len(line) <= limit else line[:limit] + "..."


def _weights_only_detail(msg: str) -> Optional[str]:
    """The reason in a ``torch.load(weights_only=True)`` failure, without torch's boilerplate
    (e.g. ``Unsupported global: GLOBAL print was not an allowed global by default``); None when
    ``msg`` is not such a failure."""
    msg = _ANSI.sub("", msg)
    if not msg.startswith("Weights only load failed"):
        return None
    rest = msg.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in msg else msg.partition("\n")[2]
    for line in rest.splitlines():
        line = line.strip()
        if line and not line.startswith(("Check the documentation", "Please file an issue", "(1)", "(2)")):
            return _first_line(line.split(". Please")[0].rstrip("."))
    return "no reason given"


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
