"""Path rules: first match wins, None keeps float, roles filter, clear errors."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.quant.qlinear import QLinear
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import (LayerQuant, Rule, dequantize_params, iter_linears, quantize_params,
                               summarize)

W8 = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=QuantSpec(bits=8, granularity="token"))
W4 = LayerQuant(weight=QuantSpec(bits=4, granularity="channel"), act=QuantSpec(bits=8, granularity="token"))


def _params():
    rng = np.random.default_rng(0)
    lin = lambda i, o: {"kernel": jnp.asarray(rng.normal(size=(i, o)).astype(np.float32)),
                        "bias": jnp.zeros((o,), jnp.float32)}
    return {"blocks_0": {"attn": {"qkv": lin(8, 24), "proj": lin(8, 8)}, "mlp": {"fc1": lin(8, 32)}},
            "blocks_1": {"attn": {"qkv": lin(8, 24), "proj": lin(8, 8)}, "mlp": {"fc1": lin(8, 32)}},
            "final_layer": {"linear": lin(8, 4)}, "y_embedder": {"embedding_table": jnp.ones((3, 8))}}


def test_iter_linears_finds_only_linears():
    paths = [p for p, _ in iter_linears(_params())]
    assert paths == ["blocks_0/attn/qkv", "blocks_0/attn/proj", "blocks_0/mlp/fc1",
                     "blocks_1/attn/qkv", "blocks_1/attn/proj", "blocks_1/mlp/fc1", "final_layer/linear"]


def test_first_match_wins_and_none_keeps_float():
    q = quantize_params(_params(), [Rule(r"final_layer", None), Rule(r"/attn/", W8), Rule(".*", W4)])
    bits = {r["path"]: r["bits"] for r in summarize(q)}
    assert bits["final_layer/linear"] == "float"
    assert bits["blocks_0/attn/qkv"] == "W8A8" and bits["blocks_1/attn/proj"] == "W8A8"
    assert bits["blocks_0/mlp/fc1"] == "W4A8"
    assert q["y_embedder"]["embedding_table"].shape == (3, 8)


def test_roles_filter():
    roles = {"blocks_0/mlp/fc1": "ffn", "blocks_1/mlp/fc1": "ffn"}
    q = quantize_params(_params(), [Rule(".*", W4, roles=("ffn",))], roles=roles)
    quantized = [p for p, layer in iter_linears(q) if "qlinear" in layer]
    assert quantized == ["blocks_0/mlp/fc1", "blocks_1/mlp/fc1"]


def test_unmatched_layers_stay_float_and_requantizing_is_a_noop():
    q = quantize_params(_params(), [Rule(r"blocks_0/mlp", W8)])
    again = quantize_params(q, [Rule(".*", W4)])
    assert isinstance(again["blocks_0"]["mlp"]["fc1"]["qlinear"], QLinear)
    assert again["blocks_0"]["mlp"]["fc1"]["qlinear"].w_spec.bits == 8


def test_static_rule_needs_stats():
    static = LayerQuant(weight=QuantSpec(bits=8), act=QuantSpec(bits=8, granularity="tensor"), act_static=True)
    with pytest.raises(ValueError, match="no calibration stats"):
        quantize_params(_params(), [Rule(".*", static)])
    with pytest.raises(ValueError, match="per-tensor"):
        LayerQuant(weight=QuantSpec(bits=8), act=QuantSpec(bits=8, granularity="token"), act_static=True)
    with pytest.raises(ValueError, match="pack"):
        LayerQuant(weight=QuantSpec(bits=8), pack=True)


def test_dequantize_params_recovers_weights_within_half_step():
    p = _params()
    q = quantize_params(p, [Rule(".*", W8)])
    back = dequantize_params(q)
    for (path, a), (_, b) in zip(iter_linears(p), iter_linears(back)):
        w = np.asarray(a["kernel"])
        step = np.abs(w).max(0) / 127
        assert np.all(np.abs(np.asarray(b["kernel"]) - w) <= step / 2 + 1e-6), path
