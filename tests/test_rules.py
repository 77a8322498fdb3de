"""Rules: first match wins, None keeps float, roles select (a path regex as escape hatch), clear
errors; LayerQuant.fit fallbacks; dequantize_params against a float64 reference."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.quant.hadamard import BlockHadamard, hadamard_matrix
from jaxdq.quant.layers import FloatLinear, QLinear, iter_layers
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import (LayerQuant, Rule, dequantize_params, first_match, quantize_linear, quantize_params,
                               role_matches, summarize)
from jaxdq.quant.smooth import smoothing_factors
from jaxdq.quant.transforms import lowrank_layer, rotate_layer, smooth_layer

W8 = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=QuantSpec(bits=8, granularity="token"))
W4 = LayerQuant(weight=QuantSpec(bits=4, granularity="channel"), act=QuantSpec(bits=8, granularity="token"))

ROLES = {"blocks_0/attn/qkv": "self-attn", "blocks_0/attn/proj": "self-attn", "blocks_0/mlp/fc1": "ffn",
         "blocks_1/attn/qkv": "self-attn", "blocks_1/attn/proj": "self-attn", "blocks_1/mlp/fc1": "ffn",
         "final_layer/linear": "final"}


def _params():
    rng = np.random.default_rng(0)
    lin = lambda i, o: {"kernel": jnp.asarray(rng.normal(size=(i, o)).astype(np.float32)),
                        "bias": jnp.zeros((o,), jnp.float32)}
    return {"blocks_0": {"attn": {"qkv": lin(8, 24), "proj": lin(8, 8)}, "mlp": {"fc1": lin(8, 32)}},
            "blocks_1": {"attn": {"qkv": lin(8, 24), "proj": lin(8, 8)}, "mlp": {"fc1": lin(8, 32)}},
            "final_layer": {"linear": lin(8, 4)}, "y_embedder": {"embedding_table": jnp.ones((3, 8))}}


def test_iter_layers_finds_only_linears():
    layers = list(iter_layers(_params()))
    assert [p for p, _ in layers] == ["blocks_0/attn/qkv", "blocks_0/attn/proj", "blocks_0/mlp/fc1",
                                      "blocks_1/attn/qkv", "blocks_1/attn/proj", "blocks_1/mlp/fc1",
                                      "final_layer/linear"]
    assert all(isinstance(l, FloatLinear) for _, l in layers)


def test_first_match_wins_and_none_keeps_float():
    q = quantize_params(_params(), [Rule(None, pattern=r"final_layer"), Rule(W8, pattern=r"/attn/"),
                                    Rule(W4, pattern=".*")], roles=ROLES)
    bits = {r["path"]: r["bits"] for r in summarize(q)}
    assert bits["final_layer/linear"] == "float"
    assert bits["blocks_0/attn/qkv"] == "W8A8" and bits["blocks_1/attn/proj"] == "W8A8"
    assert bits["blocks_0/mlp/fc1"] == "W4A8"
    assert q["y_embedder"]["embedding_table"].shape == (3, 8)
    # the same selection by role tag
    qr = quantize_params(_params(), [Rule(None, roles="final"), Rule(W8, roles="self-attn"), Rule(W4)], roles=ROLES)
    assert {r["path"]: r["bits"] for r in summarize(qr)} == bits
    # a float layer stays the Flax-native dict
    assert set(q["final_layer"]["linear"]) == {"kernel", "bias"}


def test_roles_filter():
    roles = {"blocks_0/mlp/fc1": "ffn", "blocks_1/mlp/fc1": "ffn"}
    q = quantize_params(_params(), [Rule(W4, roles=("ffn",), pattern=".*")], roles=roles)
    quantized = [p for p, layer in iter_layers(q) if isinstance(layer, QLinear)]
    assert quantized == ["blocks_0/mlp/fc1", "blocks_1/mlp/fc1"]
    # role and pattern must both match
    q2 = quantize_params(_params(), [Rule(W4, roles=("ffn",), pattern="blocks_1")], roles=roles)
    assert [p for p, layer in iter_layers(q2) if isinstance(layer, QLinear)] == ["blocks_1/mlp/fc1"]


def test_role_tags_and_sub_roles():
    assert role_matches("cross-attn", "cross-attn:kv") and role_matches("cross-attn", "cross-attn")
    assert not role_matches("cross-attn:kv", "cross-attn") and role_matches("cross-attn:kv", "cross-attn:kv")
    assert not role_matches("attn", "self-attn") and not role_matches("ffn", None)
    rules = [Rule(None, roles="cross-attn:kv"), Rule(W8, roles="cross-attn")]
    assert first_match(rules, "x/k", "cross-attn:kv") is rules[0]
    assert first_match(rules, "x/q", "cross-attn") is rules[1]
    assert first_match(rules, "x/fc", "ffn") is None
    assert Rule(W8, roles="ffn").roles == ("ffn",)


def test_unmatched_layers_stay_float_and_requantizing_is_a_noop():
    q = quantize_params(_params(), [Rule(W8, pattern=r"blocks_0/mlp")], roles=ROLES)
    assert [p for p, l in iter_layers(q) if isinstance(l, QLinear)] == ["blocks_0/mlp/fc1"]
    again = quantize_params(q, [Rule(W4, pattern=".*")], roles=ROLES)
    assert isinstance(again["blocks_0"]["mlp"]["fc1"], QLinear)
    assert again["blocks_0"]["mlp"]["fc1"].weight.spec.bits == 8
    assert again["blocks_0"]["mlp"]["fc1"] is q["blocks_0"]["mlp"]["fc1"]


def test_quantize_linear_takes_only_float_layers():
    layer = FloatLinear(kernel=jnp.ones((8, 4)), bias=jnp.zeros(4))
    q = quantize_linear(layer, W8)
    with pytest.raises(TypeError, match="float layer"):
        quantize_linear(q, W8)
    with pytest.raises(TypeError, match="float layer"):
        quantize_linear({"kernel": jnp.ones((8, 4))}, W8)


def test_static_rule_needs_stats():
    static = LayerQuant(weight=QuantSpec(bits=8), act=QuantSpec(bits=8, granularity="tensor"), act_static=True)
    with pytest.raises(ValueError, match="no calibration statistics"):
        quantize_params(_params(), [Rule(static, pattern=".*")], roles=ROLES)
    with pytest.raises(ValueError, match="per-tensor"):
        LayerQuant(weight=QuantSpec(bits=8), act=QuantSpec(bits=8, granularity="token"), act_static=True)
    with pytest.raises(ValueError, match="pack"):
        LayerQuant(weight=QuantSpec(bits=8), pack=True)
    with pytest.raises(ValueError, match="activation QuantSpec"):
        LayerQuant(weight=QuantSpec(bits=8), act_static=True)


def test_layer_quant_fit_fallbacks():
    g64 = QuantSpec(bits=4, granularity="group", group_size=64)
    cfg = LayerQuant(weight=g64, act=g64, pack=True)
    # the group divides C_in and C_out is even: unchanged
    assert cfg.fit(128, 64) == cfg
    # group not dividing C_in: per-channel weights, per-token activations, bits / symmetry kept
    fit = cfg.fit(96, 64)
    assert fit.weight == QuantSpec(bits=4, granularity="channel")
    assert fit.act == QuantSpec(bits=4, granularity="token") and fit.pack
    asym = LayerQuant(weight=QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64),
                      act=QuantSpec(bits=8, symmetric=False, granularity="group", group_size=64))
    fa = asym.fit(96, 64)
    assert fa.weight == QuantSpec(bits=4, symmetric=False, granularity="channel")
    assert fa.act == QuantSpec(bits=8, symmetric=False, granularity="token")
    # the fallback changes the granularity only: the range search (MSE clipping) is kept
    mse = QuantSpec(bits=4, granularity="group", group_size=64, range="mse", mse_grid=20, mse_min_ratio=0.5)
    fm = LayerQuant(weight=mse).fit(96, 64)
    assert fm.weight == QuantSpec(bits=4, granularity="channel", range="mse", mse_grid=20, mse_min_ratio=0.5)
    # odd C_out: int4 packing (pairs along C_out) is dropped, the specs stay
    odd = cfg.fit(128, 63)
    assert not odd.pack and odd.weight == g64 and odd.act == g64
    # non-group specs and weight-only configs are left alone
    assert W8.fit(96, 63) == W8
    wo = LayerQuant(weight=g64, pack=True)
    assert wo.fit(96, 64) == LayerQuant(weight=QuantSpec(bits=4, granularity="channel"), pack=True)
    assert wo.fit(96, 64).act is None
    # quantize_linear applies the fit: a 96-wide layer with odd C_out gets unpacked per-channel codes
    layer = FloatLinear(kernel=jnp.asarray(np.random.default_rng(0).normal(size=(96, 63)), jnp.float32))
    q = quantize_linear(layer, cfg)
    assert q.weight.spec == QuantSpec(bits=4, granularity="channel") and not q.weight.packed
    assert q.weight.codes.shape == (96, 63) and q.weight.scale.shape == (1, 63)
    assert q.act.spec == QuantSpec(bits=4, granularity="token")


def test_dequantize_params_recovers_weights_within_half_step():
    p = _params()
    q = quantize_params(p, [Rule(W8, pattern=".*")], roles=ROLES)
    back = dequantize_params(q)
    for (path, a), (_, b) in zip(iter_layers(p), iter_layers(back)):
        assert isinstance(b, FloatLinear) and b.transform.is_identity, path
        w = np.asarray(a.kernel)
        step = np.abs(w).max(0) / 127
        assert np.all(np.abs(np.asarray(b.kernel) - w) <= step / 2 + 1e-6), path


def _np_block_hadamard(k, block):
    return np.kron(np.eye(k // block), hadamard_matrix(block))


def test_dequantize_params_of_transformed_qlinear_is_its_fake_forward_without_act_quant():
    """smooth + rotate + low-rank + W4A8: the dequantized float layer (transforms folded out,
    a plain ``x W + b``) computes what the QLinear's fake forward computes with activation
    quantization dropped — checked against a float64 NumPy product of the stored pieces."""
    rng = np.random.default_rng(3)
    cin, cout = 64, 48
    w = rng.normal(size=(cin, cout)) * 0.1
    x = rng.normal(size=(3, 7, cin))
    x[..., [5, 40]] *= 25.0
    fl = FloatLinear(kernel=jnp.asarray(w, jnp.float32), bias=jnp.asarray(rng.normal(size=cout), jnp.float32))
    lam = smoothing_factors(np.abs(x).reshape(-1, cin).max(0), fl.kernel, 0.5)
    t = lowrank_layer(rotate_layer(smooth_layer(fl, lam), BlockHadamard(32)), 4, factor_dtype=jnp.float16)
    cfg = LayerQuant(weight=QuantSpec(bits=4, granularity="group", group_size=16),
                     act=QuantSpec(bits=8, granularity="token"), pack=True)
    q = quantize_linear(t, cfg)
    tr = q.transform
    assert tr.smooth is not None and tr.rotation == BlockHadamard(32) and tr.rank == 4 and q.act is not None
    back = dequantize_params({"blk": {"l": q}})["blk"]["l"]
    assert set(back) == {"kernel", "bias"}  # a plain float layer, stored as the Flax dict
    # float64 reference from the stored pieces: x/s · H · (deq(W) + L1 L2) + b
    h = _np_block_hadamard(cin, 32)
    s = np.asarray(tr.smooth, np.float64)
    l1, l2 = np.asarray(tr.lowrank_a, np.float64), np.asarray(tr.lowrank_b, np.float64)
    wd = np.asarray(q.weight.dequantize(), np.float64)
    xt = (x / s) @ h
    ref = xt @ wd + xt @ l1 @ l2 + np.asarray(q.bias, np.float64)
    eff = np.diag(1 / s) @ h @ (wd + l1 @ l2)
    np.testing.assert_allclose(np.asarray(back["kernel"], np.float64), eff, rtol=1e-5, atol=1e-6)
    xf = jnp.asarray(x, jnp.float32)
    out_back = np.asarray(linear_plain(back, xf), np.float64)
    out_noact = np.asarray(q.replace(act=None)(xf), np.float64)
    rel = lambda a: np.linalg.norm(a - ref) / np.linalg.norm(ref)
    assert rel(out_back) < 1e-5 and rel(out_noact) < 1e-5, (rel(out_back), rel(out_noact))
    np.testing.assert_allclose(out_back, out_noact, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # and activation quantization was what was dropped: the W4A8 layer itself differs
    assert rel(np.asarray(q(xf), np.float64)) > 10 * rel(out_back)


def linear_plain(node, x):
    """``x W + b`` of a Flax float dict (no transforms)."""
    return x @ node["kernel"] + node["bias"]
