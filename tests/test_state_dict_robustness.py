"""Malformed checkpoints: every one is a single-line CheckpointError naming the file (issue 18).

Each case starts from a real file written with ``safetensors.numpy.save_file`` (or
``torch.save``) and corrupts it; the fuzz test at the end mutates a real file at random and
checks the reader against the ``safetensors`` library itself.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from converters import state_dict as sdmod
from converters.state_dict import CheckpointError, load_state_dict

ARRAYS = {
    "blocks.0.weight": np.arange(72 * 4, dtype=np.float32).reshape(72, 4) / 7.0,
    "blocks.0.bias": np.linspace(-1, 1, 5).astype(np.float16),
    "pos": np.arange(6, dtype=np.int64).reshape(2, 3),
    "scale": np.array(2.5, np.float32),
}


def _write(path, arrays=ARRAYS) -> bytes:
    save_file(dict(arrays), str(path))
    return path.read_bytes()


def _split(data: bytes) -> tuple[int, dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _with_header(header, body: bytes, n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + body


def _expect(path, *words: str) -> str:
    """load_state_dict(path) raises a one-line CheckpointError naming the file and ``words``."""
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert os.path.basename(os.fspath(path)) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def _assert_loaded(sd, arrays=ARRAYS):
    assert set(sd) == set(arrays)
    for k, v in arrays.items():
        assert sd[k].dtype == np.float32
        np.testing.assert_array_equal(sd[k], np.asarray(v, np.float32))


# ------------------------------------------------------------------------------ single files


def test_good_file_still_loads(tmp_path):
    _write(tmp_path / "w.safetensors")
    _assert_loaded(load_state_dict(tmp_path / "w.safetensors"))


def test_zero_size_tensors_and_metadata_load(tmp_path):
    arrays = {"empty": np.zeros((0, 3), np.float32), "x": np.ones(2, np.float32)}
    save_file(arrays, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    _assert_loaded(load_state_dict(tmp_path / "w.safetensors"), arrays)
    save_file({"only_empty": np.zeros((0,), np.float16)}, str(tmp_path / "e.safetensors"))
    _assert_loaded(load_state_dict(tmp_path / "e.safetensors"), {"only_empty": np.zeros((0,), np.float32)})


def test_bfloat16_still_loads(tmp_path):
    import ml_dtypes

    good = _write(tmp_path / "w.safetensors", {"w": np.ones((2, 3), np.float32)})
    n, header, body = _split(good)
    header["w"]["dtype"] = "BF16"
    header["w"]["shape"] = [2, 6]
    (tmp_path / "bf16.safetensors").write_bytes(_with_header(header, body))
    expect = np.frombuffer(body, ml_dtypes.bfloat16).reshape(2, 6).astype(np.float32)
    np.testing.assert_array_equal(load_state_dict(tmp_path / "bf16.safetensors")["w"], expect)


def test_empty_file(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"")
    _expect(tmp_path / "w.safetensors", "empty file (0 bytes)")


def test_shorter_than_header_length(tmp_path):
    good = _write(tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").write_bytes(good[:5])
    _expect(tmp_path / "w.safetensors", "only 5 bytes", "8-byte header length")


def test_header_length_larger_than_file(tmp_path):
    good = _write(tmp_path / "w.safetensors")
    n, _, _ = _split(good)
    (tmp_path / "w.safetensors").write_bytes(good[:8 + n // 2])
    _expect(tmp_path / "w.safetensors", f"header length {n} is larger than the file")


def test_text_file_renamed(tmp_path):
    """Was a MemoryError traceback (the first 8 characters read as a huge header length)."""
    (tmp_path / "notes.safetensors").write_text("These are my notes, not weights.\n" * 40)
    _expect(tmp_path / "notes.safetensors", "larger than the file", "not a safetensors file")


def test_small_binary_file_renamed(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe\x00\x01" + b"\x00" * 40)
    _expect(tmp_path / "junk.safetensors", "header is not UTF-8")


def test_header_not_json(tmp_path):
    good = _write(tmp_path / "w.safetensors")
    n, _, body = _split(good)
    (tmp_path / "w.safetensors").write_bytes(_with_header(b'{"a": [1, 2', body))
    _expect(tmp_path / "w.safetensors", "header is not valid JSON")


@pytest.mark.parametrize("header, what", [
    ([1, 2, 3], "header is a JSON list, not an object of tensor entries"),
    ("weights", "header is a JSON str, not an object of tensor entries"),
    ({"w": [0, 4]}, "header entry 'w' is not a tensor entry"),
    ({"w": {"dtype": "F32", "shape": [1]}}, "header entry 'w' is not a tensor entry"),
    ({"__metadata__": {"format": 3}}, "__metadata__ is not an object of strings"),
])
def test_header_not_tensor_entries(tmp_path, header, what):
    (tmp_path / "w.safetensors").write_bytes(_with_header(header, b"\x00" * 4))
    _expect(tmp_path / "w.safetensors", what)


def test_duplicate_tensor_names(tmp_path):
    raw = (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
           b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
    (tmp_path / "w.safetensors").write_bytes(_with_header(raw, b"\x00" * 4))
    _expect(tmp_path / "w.safetensors", "duplicate key 'w'")


def _edit(tmp_path, name: str, field: str, value) -> str:
    good = _write(tmp_path / "w.safetensors")
    _, header, body = _split(good)
    header[name][field] = value
    (tmp_path / "w.safetensors").write_bytes(_with_header(header, body))
    return str(tmp_path / "w.safetensors")


def test_unknown_dtype(tmp_path):
    _expect(_edit(tmp_path, "pos", "dtype", "Q7"), "tensor 'pos' has unsupported dtype 'Q7'")
    _expect(_edit(tmp_path, "pos", "dtype", 32), "tensor 'pos' has unsupported dtype 32")


@pytest.mark.parametrize("shape", [[2, -3], [2.0, 3], ["2", 3], [True, 6], 6, None])
def test_bad_shape(tmp_path, shape):
    _expect(_edit(tmp_path, "pos", "shape", shape), "tensor 'pos' has a bad shape")


def test_shape_not_matching_offsets(tmp_path):
    _expect(_edit(tmp_path, "pos", "shape", [3, 3]), "tensor 'pos'", "span 48 bytes", "needs 72")


@pytest.mark.parametrize("offsets, what", [
    ([0], "bad data_offsets"), ([0, 4, 8], "bad data_offsets"), ([-4, 0], "bad data_offsets"),
    ("0-4", "bad data_offsets"), ([48, 0], "out of order"),
])
def test_bad_data_offsets(tmp_path, offsets, what):
    _expect(_edit(tmp_path, "pos", "data_offsets", offsets), "tensor 'pos'", what)


def test_data_offsets_outside_data_section(tmp_path):
    good = _write(tmp_path / "w.safetensors")
    _, header, body = _split(good)
    begin, end = header["pos"]["data_offsets"]
    header["pos"]["data_offsets"] = [len(body) + 8, len(body) + 8 + end - begin]
    (tmp_path / "w.safetensors").write_bytes(_with_header(header, body))
    _expect(tmp_path / "w.safetensors", "tensor 'pos'", "outside the data section")
    header["pos"]["data_offsets"] = [begin, end]
    header["pos"]["shape"], header["pos"]["data_offsets"] = [2, 2], [begin + 8, begin + 40]
    (tmp_path / "w.safetensors").write_bytes(_with_header(header, body))
    _expect(tmp_path / "w.safetensors", "gap of 8 bytes")


def test_data_offsets_overlap(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    (tmp_path / "w.safetensors").write_bytes(_with_header(header, b"\x00" * 24))
    _expect(tmp_path / "w.safetensors", "tensor 'b'", "overlaps the tensor before it")


@pytest.mark.parametrize("cut", [1, 3, 100, 1000])
def test_truncated_data(tmp_path, cut):
    good = _write(tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").write_bytes(good[:-cut])
    _expect(tmp_path / "w.safetensors", "truncated", f"file is {len(good) - cut} bytes, should be {len(good)}")


def test_bytes_after_the_last_tensor(tmp_path):
    good = _write(tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").write_bytes(good + b"\x00" * 16)
    _expect(tmp_path / "w.safetensors", "16 bytes after the last tensor")


# ------------------------------------------------------------------------------ folders


def _sharded(tmp_path, n_shards: int = 3):
    """A diffusers-style sharded folder written by hand: config.json, shards, index."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    rng = np.random.default_rng(0)
    arrays = {f"transformer_blocks.{i}.attn.to_q.weight": rng.normal(size=(72, 256)).astype(np.float16)
              for i in range(n_shards)}
    weight_map = {}
    for i, (k, v) in enumerate(arrays.items()):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: v}, str(folder / shard))
        weight_map[k] = shard
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder, arrays, weight_map


def test_sharded_folder_loads(tmp_path):
    folder, arrays, _ = _sharded(tmp_path)
    sd = load_state_dict(folder)
    _assert_loaded(sd, arrays)
    assert sd.config == {"_class_name": "DiTTransformer2DModel"}


def test_truncated_shard_names_the_shard(tmp_path):
    """Was ``cannot reshape array of size 4778 into shape (72,256)``: no file, no word of truncation."""
    folder, _, weight_map = _sharded(tmp_path)
    shard = folder / sorted(set(weight_map.values()))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 3])
    msg = _expect(folder, "truncated")
    assert shard.name in msg


def test_index_points_at_missing_shard(tmp_path):
    folder, _, weight_map = _sharded(tmp_path)
    gone = sorted(set(weight_map.values()))[2]
    os.remove(folder / gone)
    msg = _expect(folder, "missing", gone)
    assert "index.json" in msg


@pytest.mark.parametrize("index, what", [
    ("{not json", "shard index is not valid JSON"),
    ("", "shard index is empty"),
    ('{"metadata": {}}', 'no "weight_map"'),
    ('{"weight_map": {"w": "../../etc/passwd"}}', "is not a shard file name in this folder"),
])
def test_bad_shard_index(tmp_path, index, what):
    folder, _, _ = _sharded(tmp_path)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(index)
    msg = _expect(folder, what)
    assert "index.json" in msg


def test_index_lists_a_tensor_no_shard_has(tmp_path):
    folder, _, weight_map = _sharded(tmp_path)
    weight_map = dict(weight_map, **{"lost.weight": next(iter(weight_map.values()))})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _expect(folder, "in none of the shards", "'lost.weight'")


def test_bad_config_json(tmp_path):
    folder, _, _ = _sharded(tmp_path)
    (folder / "config.json").write_text("{'single': 'quotes'}")
    msg = _expect(folder, "config.json is not valid JSON")
    assert "config.json" in msg


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = _expect(tmp_path / "empty", "not a PyTorch checkpoint folder", "empty")
    assert "diffusion_pytorch_model" not in msg


def test_directory_without_weights(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"\x89PNG")
    msg = _expect(tmp_path / "pics", "not a PyTorch checkpoint folder: no config.json or weight files", "a.png")
    assert "diffusion_pytorch_model" not in msg


@pytest.mark.parametrize("layout", [
    ("_CHECKPOINT_METADATA", "params/", "meta/"),  # a jaxdq checkpoint (orbax)
    ("params/", "meta/"),  # without orbax's own metadata
    ("q.orbax-checkpoint-tmp-17/",),  # an interrupted orbax save
])
def test_orbax_checkpoint_folder_is_not_called_diffusers(tmp_path, layout):
    root = tmp_path / "ckpt"
    root.mkdir()
    for item in layout:
        if item.endswith("/"):
            (root / item).mkdir()
        else:
            (root / item).write_text("{}")
    target = root / layout[0] if layout[0].endswith("-17/") else root
    msg = _expect(target, "not a PyTorch checkpoint folder", "orbax / jaxdq checkpoint")
    assert "diffusion_pytorch_model" not in msg and "diffusers" not in msg


def test_config_without_weights_still_says_diffusers(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    _expect(tmp_path / "model", "diffusers model folder", "without diffusion_pytorch_model")


# ------------------------------------------------------------------------------ torch files


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pickle_with_code_is_refused(tmp_path, torch):
    marker = str(tmp_path / "pwned")
    torch.save({"model": _Evil(marker)}, tmp_path / "evil.pt")
    msg = _expect(tmp_path / "evil.pt", "refusing to load", "arbitrary code", "GLOBAL posix.mkdir")
    assert "\x1b" not in msg
    assert not os.path.exists(marker)


def test_torch_empty_text_and_truncated_files(tmp_path, torch):
    (tmp_path / "empty.pt").write_bytes(b"")
    _expect(tmp_path / "empty.pt", "empty file (0 bytes)")
    (tmp_path / "notes.pt").write_text("not a checkpoint\n" * 20)  # was a KeyError traceback
    _expect(tmp_path / "notes.pt", "not a PyTorch checkpoint", "neither a zip archive nor a pickle")
    torch.save({"w": torch.ones(64, 64)}, tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])  # was a RuntimeError traceback
    _expect(tmp_path / "cut.pt", "truncated or corrupt PyTorch checkpoint", "zip archive")


def test_torch_non_tensor_file(tmp_path, torch):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    _expect(tmp_path / "list.pt", "holds a list, not a state dict")


# ------------------------------------------------------------------------------ NaN / inf


def test_check_finite_names_the_tensor(tmp_path):
    bad = dict(ARRAYS, **{"blocks.1.weight": np.array([1.0, np.nan, np.inf, -np.inf], np.float32)})
    _write(tmp_path / "w.safetensors", bad)
    sd = load_state_dict(tmp_path / "w.safetensors")  # loading alone does not judge values
    with pytest.raises(CheckpointError) as info:
        sdmod.check_finite(sd)
    msg = str(info.value)
    assert "\n" not in msg and "w.safetensors" in msg
    assert "tensor 'blocks.1.weight'" in msg and "1 NaN and 2 inf of 4 values" in msg
    with pytest.raises(CheckpointError, match=r"w\.safetensors: tensor 'blocks\.1\.weight'"):
        load_state_dict(tmp_path / "w.safetensors", require_finite=True)
    sdmod.check_finite(ARRAYS)  # finite, ints included: no error
    with pytest.raises(CheckpointError, match=r"^state dict: tensor 'x' .* 1 inf of 1 values$"):
        sdmod.check_finite({"x": np.array([np.inf], np.float16)})


# ------------------------------------------------------------------------------ fuzz


def _official(path):
    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - the reference rejects it, whatever it raises
        return None


_DTYPES = ["F32", "F16", "F64", "I64", "I32", "U32", "I16", "U16", "I8", "U8", "BOOL", "XX", "", 4, None]
_VALUES = st.one_of(
    st.sampled_from(_DTYPES),
    st.lists(st.integers(-3, 400), max_size=4),
    st.lists(st.sampled_from([1.5, "2", True, None, [1]]), min_size=1, max_size=3),
    st.integers(-10, 10), st.text(max_size=4), st.none(),
)


@st.composite
def _mutation(draw):
    kind = draw(st.sampled_from(["truncate", "flip", "flip_data", "header"]))
    if kind == "truncate":
        return kind, draw(st.integers(0, 10_000))
    if kind in ("flip", "flip_data"):
        flips = draw(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4))
        return kind, flips
    fields = st.sampled_from(["dtype", "shape", "data_offsets", "rename", None])
    edits = draw(st.lists(st.tuples(st.integers(0, 10), fields, _VALUES), min_size=1, max_size=3))
    whole = draw(st.sampled_from([None] * 6 + [[1], "x", 3, {}]))
    n_delta = draw(st.sampled_from([0] * 6 + [-1, 1, 7, -20]))
    pad = draw(st.sampled_from([b"", b"", b"   ", b"\n", b"\x00"]))
    return kind, (edits, whole, n_delta, pad)


def _mutate(good: bytes, mutation) -> tuple[bytes, str]:
    kind, arg = mutation
    n, header, body = _split(good)
    if kind == "truncate":
        return good[:arg % len(good)], kind
    if kind in ("flip", "flip_data"):
        data = bytearray(good)
        lo = 8 + n if kind == "flip_data" else 0
        for pos, mask in arg:
            data[lo + pos % (len(good) - lo)] ^= mask
        return bytes(data), kind
    edits, whole, n_delta, pad = arg
    names = [k for k in header if k != "__metadata__"]
    for i, field, value in edits:
        name = names[i % len(names)]
        if field is None:
            header.pop(name, None)
        elif field == "rename" and name in header:
            header[str(value)] = header.pop(name)
        elif isinstance(header.get(name), dict):
            header[name][field] = value
    raw = json.dumps(header if whole is None else whole).encode() + pad
    return struct.pack("<Q", max(0, len(raw) + n_delta)) + raw + body, kind


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=_mutation())
def test_fuzz_corrupt_safetensors(tmp_path, mutation):
    """Random truncations, byte flips and header edits of a real file: the load either gives the
    arrays the ``safetensors`` library reads from the same bytes, or a one-line CheckpointError
    naming the file — never another exception."""
    good = _write(tmp_path / "good.safetensors")
    data, kind = _mutate(good, mutation)
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(data)
    try:
        sd = load_state_dict(path)
    except CheckpointError as e:
        msg = str(e)
        assert "\n" not in msg and "fuzzed.safetensors" in msg, msg
        assert kind != "flip_data", f"a flip inside tensor data is still a valid file: {msg}"
        assert kind != "truncate" or len(data) < len(good)
        return
    assert kind != "truncate" or data == good, "a truncated file loaded"
    ref = _official(path)
    assert ref is not None, "loaded a file the safetensors library rejects"
    assert set(sd) == set(ref)
    for k, v in ref.items():
        assert sd[k].dtype == np.float32 and sd[k].shape == v.shape
        np.testing.assert_array_equal(sd[k], v.astype(np.float32))
