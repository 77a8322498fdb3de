"""Orbax export/reload of quantized params trees: every field, metadata, identical outputs."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq import __version__, checkpoint
from jaxdq.quant.qlinear import QLinear
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import LayerQuant, Rule, quantize_params


def _params():
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
    return {"a": {"kernel": f(16, 8), "bias": f(8)}, "b": {"kernel": f(8, 8), "bias": f(8)},
            "c": {"kernel": f(8, 6)}, "emb": {"embedding": f(3, 16)}, "scale": f(4)}


def test_roundtrip_all_fields(tmp_path):
    params = quantize_params(_params(), [
        Rule("^a$", LayerQuant(weight=QuantSpec(bits=4, granularity="group", group_size=8),
                               act=QuantSpec(bits=8, granularity="token"), pack=True)),
        Rule("^b$", LayerQuant(weight=QuantSpec(bits=8, granularity="tensor"),
                               act=QuantSpec(bits=8, symmetric=False, granularity="tensor"), act_static=True)),
    ], stats={"b": {"min": jnp.float32(-1.0), "max": jnp.float32(3.0)}})
    q = params["a"]["qlinear"]
    params["a"]["qlinear"] = q.replace(smooth=jnp.linspace(0.5, 2.0, 16), lowrank_a=jnp.ones((16, 2)),
                                       lowrank_b=jnp.full((2, 8), 0.1))
    path = checkpoint.save(tmp_path / "ckpt", params, metadata={"method": "test", "bits": "W4A8"})
    assert os.path.isdir(path)
    loaded, meta = checkpoint.load(path)
    assert meta["method"] == "test" and meta["bits"] == "W4A8" and meta["jaxdq_version"] == __version__
    assert set(meta["layers"]) == {"a/qlinear", "b/qlinear"}
    la, lb = loaded["a"]["qlinear"], loaded["b"]["qlinear"]
    assert isinstance(la, QLinear) and la.packed and la.w_spec == QuantSpec(bits=4, granularity="group", group_size=8)
    assert lb.act_spec.symmetric is False and lb.act_static
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
    for x, y in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    xin = jnp.asarray(np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(la(xin)), np.asarray(params["a"]["qlinear"](xin)))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no jaxdq checkpoint"):
        checkpoint.load(tmp_path / "nope")
