"""Orbax export/reload of quantized params trees: every node type and field, metadata, identical
outputs; checkpoints written by jaxdq 0.1.0 (format 1) load and compute what they computed then."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq import __version__, checkpoint
from jaxdq.quant.hadamard import BlockHadamard
from jaxdq.quant.layers import QLinear, Segmented, iter_layers
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import LayerQuant, Rule, quantize_params

DATA_V010 = os.path.join(os.path.dirname(__file__), "data", "ckpt_v0_1_0")
ROLES = {"a": "ffn", "b": "self-attn", "c": "final"}


def _params():
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))  # noqa: E731
    return {"a": {"kernel": f(16, 8), "bias": f(8)}, "b": {"kernel": f(8, 8), "bias": f(8)},
            "c": {"kernel": f(8, 6)}, "emb": {"embedding": f(3, 16)}, "scale": f(4)}


def _quantized():
    params = quantize_params(_params(), [
        Rule(LayerQuant(weight=QuantSpec(bits=4, granularity="group", group_size=8),
                        act=QuantSpec(bits=8, granularity="token"), pack=True), roles="ffn"),
        Rule(LayerQuant(weight=QuantSpec(bits=8, granularity="tensor"),
                        act=QuantSpec(bits=8, symmetric=False, granularity="tensor"), act_static=True),
             roles="self-attn"),
    ], roles=ROLES, stats={"b": {"min": jnp.float32(-1.0), "max": jnp.float32(3.0)}})
    q = params["a"]
    t = q.transform.replace(smooth=jnp.linspace(0.5, 2.0, 16), rotation=BlockHadamard(8),
                            lowrank_a=jnp.ones((16, 2)), lowrank_b=jnp.full((2, 8), 0.1))
    params["a"] = q.replace(transform=t, weight=q.weight.to_layout("nk"))
    variants = (params["b"], params["b"].replace(bias=params["b"].bias + 1))
    params["seg"] = Segmented(variants=variants, index=(0, 1, 1), bounds=(600, 300))
    return params


def test_roundtrip_all_node_types_and_fields(tmp_path):
    params = _quantized()
    path = checkpoint.save(tmp_path / "ckpt", params, metadata={"method": "test", "bits": "W4A8"})
    assert os.path.isdir(path)
    loaded, meta = checkpoint.load(path)
    assert meta["method"] == "test" and meta["bits"] == "W4A8" and meta["jaxdq_version"] == __version__
    assert meta["format_version"] == checkpoint.FORMAT_VERSION == 2
    assert {meta["nodes"][p]["type"] for p in ("a", "b", "seg", "a/transform/rotation")} == \
        {"QLinear", "Segmented", "BlockHadamard"}
    la, lb = loaded["a"], loaded["b"]
    assert isinstance(la, QLinear) and la.weight.packed and la.weight.layout == "nk"
    assert la.weight.spec == QuantSpec(bits=4, granularity="group", group_size=8)
    assert la.transform.rotation == BlockHadamard(8)
    assert lb.act.spec.symmetric is False and lb.act.static
    assert loaded["seg"].index == (0, 1, 1) and loaded["seg"].bounds == (600, 300)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
    for x, y in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    xin = jnp.asarray(np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(la(xin)), np.asarray(params["a"](xin)))


def test_checkpoint_stores_no_execution_choice(tmp_path):
    """How a layer runs is the backend's policy, never data: no 'impl'/'policy' in the schema."""
    path = checkpoint.save(tmp_path / "ckpt", _quantized(), metadata={"method": "test"})
    with open(os.path.join(path, "meta", "metadata")) as f:
        text = f.read()
    nodes = json.loads(text)["nodes"]
    keys = {k for n in nodes.values() for k in list(n["static"]) + list(n["fields"])}
    assert not keys & {"impl", "policy", "backend"}, keys


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no jaxdq checkpoint"):
        checkpoint.load(tmp_path / "nope")


def test_unknown_format_version_is_one_line(tmp_path):
    path = checkpoint.save(tmp_path / "ckpt", _params(), metadata={"method": "float"})
    meta_file = os.path.join(path, "meta", "metadata")
    meta = json.load(open(meta_file))
    meta["format_version"] = 99
    json.dump(meta, open(meta_file, "w"))
    with pytest.raises(checkpoint.CheckpointFormatError, match="damaged checkpoint: meta/metadata"):
        checkpoint.load(path)  # edited behind jaxdq's back: the file list says so
    json.dump(checkpoint._file_list(path), open(os.path.join(path, checkpoint.FILE_LIST), "w"))
    with pytest.raises(checkpoint.CheckpointFormatError, match="format 99 is not one this jaxdq"):
        checkpoint.load(path)  # as a newer jaxdq would write it


@pytest.mark.parametrize("method", ["dynamic-w8a8", "vidit-q-w4a8", "qdiffusion-w8a8", "vidit-q-mp", "svdquant"])
def test_format_1_checkpoints_of_jaxdq_0_1_0_load_and_compute_the_same(method):
    """tests/data/ckpt_v0_1_0 was written by jaxdq 0.1.0 (commit 8dcc718) from a tiny random DiT, with
    the model's outputs at four timesteps (one call each); they load as today's typed layers and the
    model computes the same outputs (the old `impl` field is dropped)."""
    from jaxdq.models.dit import DiT
    from jaxdq.models.sources import load_model
    from jaxdq.quant.timestep import timestep_aware

    model = load_model(os.path.join(DATA_V010, method))
    assert model.metadata["format_version"] == 1 and "layers" not in model.metadata
    kinds = {type(l).__name__ for _, l in iter_layers(model.params)}
    assert "QLinear" in kinds and (method != "vidit-q-mp" or "Segmented" in kinds)
    ref = np.load(os.path.join(DATA_V010, "reference_outputs.npz"))
    apply = timestep_aware(lambda p, x, t, y: DiT(model.config).apply({"params": p}, x, t, y), model.params)
    got = np.concatenate([np.asarray(apply(ref["x"][i:i + 1], ref["t"][i:i + 1], ref["y"][i:i + 1]))
                          for i in range(4)])
    np.testing.assert_allclose(got, ref[method], rtol=1e-5, atol=1e-5 * np.abs(ref[method]).max())
