"""LRQ-DiT in the core: the twin-log weight as a QLinear weight node (fake and integer
paths, weight bytes, checkpoints, dequantize_params, summarize), the DuQuant rotation as
a rotation node folded by transforms.rotate_layer, ARS on the default DiT (its report),
and the recipes (registered, role-based, options).  float64 NumPy references throughout.
The CLI / orbax / family round trip of the three recipes is tests/test_lrq_dit_family.py."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq import backend, checkpoint
from jaxdq.quant import duquant as dq
from jaxdq.quant import twinlog as tl
from jaxdq.quant.hadamard import BlockHadamard, rotation_for
from jaxdq.quant.layers import FloatLinear, QLinear, QWeight, iter_layers, weight_bytes
from jaxdq.quant.quantizer import QuantSpec, quantize_activation
from jaxdq.calibrate import pool_stats
from jaxdq.quant.recipes import get_recipe, lrq_cfg, method_names
from jaxdq.quant.rules import (LayerQuant, Rule, dequantize_params, keep_float, quantize_linear, quantize_params,
                               selected, summarize)
from jaxdq.quant.transforms import rotate_layer, smooth_layer

SMALL = dict(alpha_grid=5, step_grid=6)   # fast searches
A8 = QuantSpec(bits=8, granularity="token")


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _float_layer(seed, k, n, scale=0.05):
    rng = np.random.default_rng(seed)
    return FloatLinear(kernel=jnp.asarray(scale * rng.standard_normal((k, n)), jnp.float32),
                       bias=jnp.asarray(0.1 * rng.standard_normal(n), jnp.float32))


def _tokens(seed, shape, outliers=()):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    for ch, f in outliers:
        x[..., ch] *= f
    return x


def _tlq(layer, bits, act=A8, **spec):
    cfg = LayerQuant(weight=tl.TwinLogSpec(bits=bits, **{**SMALL, **spec}), act=act, pack=True)
    return quantize_linear(layer, cfg)


def ref_eq7(tw):
    """float64 W_f = 2^{s⁺(q⁺+z⁺)} M⁺ − 2^{s⁻(q⁻+z⁻)} M⁻ from the node's codes and params."""
    c = np.asarray(tw.unpacked(), np.float64)
    sp, zp, sn, zn = (np.asarray(v, np.float64) for v in tw.params)
    return np.where(c > 0, 2.0 ** (sp * (c - 1 + zp)), 0) - np.where(c < 0, 2.0 ** (sn * (-c - 1 + zn)), 0)


# ---------------------------------------------------------------- the weight node


@pytest.mark.parametrize("bits", [3, 4])
def test_twinlog_qlinear_fake_path_is_eq7(bits):
    layer = _float_layer(0, 64, 48)
    q = _tlq(layer, bits)
    assert isinstance(q, QLinear) and isinstance(q.weight, tl.TwinLogWeight)
    assert q.weight.packed and q.weight.bits == bits and q.weight.shape == (64, 48) == (q.in_features, q.out_features)
    assert q.weight.codes.dtype == jnp.uint8 and q.weight.codes.shape == (64, 48 * bits // 8)
    assert q.bits_label == f"W{bits}A8"
    x = _tokens(1, (2, 5, 64))
    xq, sx, _ = quantize_activation(jnp.asarray(x), A8)
    want = (_f64(xq) * _f64(sx)) @ ref_eq7(q.weight) + _f64(q.bias)
    for got in (q(jnp.asarray(x)), backend.execute(q, jnp.asarray(x), backend.REFERENCE)):
        np.testing.assert_allclose(_f64(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(_f64(q.weight.dequantize()), ref_eq7(q.weight), rtol=2e-6, atol=0)


@pytest.mark.parametrize("bits, act_bits", [(3, 8), (4, 6), (4, 4)])
def test_integer_path_equals_fake_path_to_the_bound(bits, act_bits):
    """int8 codes × w_int (shift/multiply form) with int32 accumulation, then s_x · 2^shift:
    within 2^{−I−1} (|x̂| @ |W_f|) of the fake path, I the layer's chosen frac_bits."""
    act = QuantSpec(bits=act_bits, granularity="token")
    q = _tlq(_float_layer(2, 256, 64), bits, act)
    w = q.weight
    assert q.int_path_ok() and 0 <= w.frac_bits <= tl.MAX_FRAC_BITS
    k = tl.INT_CHUNK                                                       # int32 sums over 128 channels
    assert tl.int_accumulation_exact(w.int_form(), act_bits, k)           # the choice keeps int32 exact
    assert w.frac_bits == tl.MAX_FRAC_BITS or not tl.int_accumulation_exact(tl.int_form(w, w.frac_bits + 1),
                                                                             act_bits, k)
    pol = backend.policy("integer")
    x = jnp.asarray(_tokens(3, (3, 11, 256), outliers=[(7, 20.0)]))
    assert backend.choose(q, 33, pol) == "int"
    y_int = _f64(backend.execute(q, x, pol))
    xq, sx, _ = quantize_activation(x, act)
    x_hat = _f64(xq) * _f64(sx)
    w_f = ref_eq7(w)
    y_fq = x_hat @ w_f + _f64(q.bias)                                      # float64 fake-quant path
    scale = np.abs(x_hat) @ np.abs(w_f)
    bound = 2.0 ** (-w.frac_bits - 1) * scale
    err = np.abs(y_int - y_fq)
    assert np.all(err <= bound + 1e-5 * scale + 1e-6)
    jaxpr = str(jax.make_jaxpr(lambda a: backend.execute(q, a, pol))(x))
    assert "preferred_element_type=int32" in jaxpr                        # an integer accumulation
    # the chunked int32 sums equal one int32 sum over C_in where that cannot overflow either
    xq8 = xq.astype(jnp.int8)
    np.testing.assert_allclose(_f64(tl.twinlog_int_matmul(xq8, sx, w.int_form(), 128)),
                               _f64(tl.twinlog_int_matmul(xq8, sx, w.int_form(), 0)), rtol=1e-6)


def test_int_path_off_when_no_frac_bits_fit():
    q = _tlq(_float_layer(4, 64, 32), 4)
    q = q.replace(weight=q.weight.replace(frac_bits=-1))
    assert not q.int_path_ok() and backend.choose(q, 4, backend.policy("integer")) == "fake"


def test_weight_bytes_w3_is_three_eighths_of_a_byte_per_weight():
    layer = _float_layer(5, 128, 96)
    q3, q4 = _tlq(layer, 3), _tlq(layer, 4)
    uni4 = quantize_linear(layer, LayerQuant(weight=QuantSpec(bits=4, granularity="channel"), act=A8, pack=True))
    params = 4 * 4 * 96                                                  # s⁺, z⁺, s⁻, z⁻ float32 per column
    assert weight_bytes({"l": q3}) == 128 * 96 * 3 // 8 + params
    assert weight_bytes({"l": q4}) == 128 * 96 // 2 + params
    assert weight_bytes({"l": q3}) < weight_bytes({"l": q4})
    assert weight_bytes({"l": q3}) < weight_bytes({"l": uni4}) == 128 * 96 // 2 + 4 * 96
    rows = summarize({"a": q3, "b": q4, "c": uni4, "d": _tlq(layer, 4, QuantSpec(bits=6, granularity="token"))})
    assert [r["bits"] for r in rows] == ["W3A8", "W4A8", "W4A8", "W4A6"]
    assert rows[0]["weight_bytes"] == weight_bytes({"l": q3}) and rows[0]["shape"] == (128, 96)


def test_unpacked_storage_when_c_out_does_not_fill_bytes():
    q = _tlq(_float_layer(6, 32, 12), 3)                                 # 12 · 3 bits is not whole bytes
    assert not q.weight.packed and q.weight.codes.dtype == jnp.int8 and q.weight.shape == (32, 12)


def test_dequantize_params_folds_rotation_and_keeps_eq7():
    layer = rotate_layer(_float_layer(7, 128, 32), rotation_for(128))
    q = _tlq(layer, 3)
    back = dequantize_params({"l": q})["l"]
    want = _f64(q.transform.rotation.unrotate_weight(jnp.asarray(ref_eq7(q.weight), jnp.float32)))
    np.testing.assert_allclose(_f64(back["kernel"]), want, rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    x = _tokens(8, (4, 128), outliers=[(3, 50.0)])
    lay = _float_layer(9, 128, 64)
    params = {
        "a": _tlq(rotate_layer(lay, dq.duquant_rotation(np.abs(x).max(axis=0))), 3),
        "b": _tlq(rotate_layer(lay, rotation_for(128)), 4, QuantSpec(bits=4, granularity="token")),
        "c": _tlq(_float_layer(10, 32, 12), 3),                          # unpacked codes
        "d": {"kernel": lay.kernel, "bias": lay.bias},
    }
    path = checkpoint.save(tmp_path / "ck", params, metadata={"method": "lrq-dit-w3a8", "bits": "W3A8"})
    loaded, meta = checkpoint.load(path)
    assert meta["nodes"]["a/weight"]["type"] == "TwinLogWeight"
    assert meta["nodes"]["a/transform/rotation"]["type"] == "DuQuantRotation"
    for k in ("a", "b", "c"):
        got, want = loaded[k], params[k]
        assert type(got.weight) is tl.TwinLogWeight and type(got.transform.rotation) is type(want.transform.rotation)
        assert (got.weight.bits, got.weight.packed, got.weight.frac_bits) == \
            (want.weight.bits, want.weight.packed, want.weight.frac_bits)
        xin = jnp.asarray(_tokens(11, (3, got.in_features)))
        np.testing.assert_array_equal(np.asarray(got(xin)), np.asarray(want(xin)))
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)


def test_qweight_protocol_is_what_it_was():
    """QWeight keeps its behaviour: the protocol members are views of what it had."""
    layer = _float_layer(12, 64, 32)
    for spec, pack in ((QuantSpec(bits=8, granularity="channel"), False), (QuantSpec(bits=4, granularity="channel"), True)):
        q = quantize_linear(layer, LayerQuant(weight=spec, act=A8, pack=pack))
        assert isinstance(q.weight, QWeight) and q.weight.bits == spec.bits and q.weight.int_ok
        assert [a.shape for a in q.weight.stored_arrays()] == [q.weight.codes.shape, q.weight.scale.shape]
        x = jnp.asarray(_tokens(13, (5, 64)))
        codes, sx, _ = q.act.codes(x)
        want = (np.asarray(codes, np.int64) @ np.asarray(q.weight.unpacked(), np.int64)) * _f64(sx) \
            * _f64(q.weight.scale).reshape(-1)
        np.testing.assert_allclose(_f64(q.weight.int_product(codes, sx)), want, rtol=1e-6)


# ---------------------------------------------------------------- the DuQuant rotation node


@pytest.mark.parametrize("width", [1152, 3072])
def test_duquant_node_folds_exactly_through_rotate_layer(width):
    x = _tokens(14, (64, width), outliers=[(5, 245.0), (9, 120.0), (200, 60.0)])
    rot = dq.duquant_rotation(np.abs(x).max(axis=0))
    assert rot.kernel_block == 0 and rot.width == width
    layer = _float_layer(15, width, 32)
    r = rotate_layer(layer, rot)
    want = x.astype(np.float64) @ _f64(layer.kernel) + _f64(layer.bias)
    got = _f64(r(jnp.asarray(x)))
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    np.testing.assert_allclose(_f64(r.effective_kernel()), _f64(layer.kernel), rtol=0, atol=2e-6)
    # a later smoothing folds through the rotation (it calls unrotate_weight)
    lam = jnp.asarray(np.random.default_rng(16).uniform(0.5, 2.0, width), jnp.float32)
    got2 = _f64(smooth_layer(r, lam)(jnp.asarray(x)))
    assert np.linalg.norm(got2 - want) <= 2e-5 * np.linalg.norm(want)
    # R W and Rᵀ W against the dense matrix
    dense = _f64(dq.rotation_matrix(rot))
    w = _f64(layer.kernel)
    np.testing.assert_allclose(_f64(rot.unrotate_weight(layer.kernel)), dense @ w, atol=2e-6)
    np.testing.assert_allclose(_f64(rot.rotate_weight(layer.kernel)), dense.T @ w, atol=2e-6)


def _stats(x):
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return {"absmax": np.abs(x).max(axis=0).astype(np.float32), "sq_sum": np.float32((x * x).sum()),
            "count": np.float32(x.size), "min": np.float32(x.min()), "max": np.float32(x.max())}


@pytest.mark.parametrize("width", [1152, 3072])
def test_ars_params_keep_the_float_model_and_pick_paths_by_j(width):
    lo = _tokens(17, (32, width)) * 0.5                                    # J ≈ 0.5: Hadamard
    hi = _tokens(18, (32, width), outliers=[(3, 245.0), (700, 80.0)])      # J ≫ 1: DuQuant
    params = {"lo": {"kernel": _float_layer(19, width, 16).kernel}, "hi": {"kernel": _float_layer(20, width, 16).kernel}}
    out, rows = dq.ars_params(params, {"lo": _stats(lo), "hi": _stats(hi)}, lambda p: True, tau=1.0)
    assert [(r["layer"], r["path"]) for r in rows] == [("lo", "hadamard"), ("hi", "duquant")]
    assert rows[0]["J"] < 1.0 <= rows[1]["J"] and rows[1]["absmax_max"] > 100 * rows[1]["absmax_median"]
    assert isinstance(out["hi"].transform.rotation, dq.DuQuantRotation)
    assert type(out["lo"].transform.rotation) is type(rotation_for(width))  # ARS's Hadamard = quarot's
    for name in ("lo", "hi"):                    # every rotation ARS builds is orthogonal: R Rᵀ = I
        r = _f64(out[name].transform.rotation.apply(jnp.eye(width, dtype=jnp.float32)))
        assert np.abs(r @ r.T - np.eye(width)).max() < 2e-6, name
    for name, x in (("lo", lo), ("hi", hi)):
        want = x.astype(np.float64) @ _f64(params[name]["kernel"])
        got = _f64(out[name](jnp.asarray(x)))
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    text = dq.format_report(rows, tau=1.0)
    assert "1 of 2 layers Hadamard (J < τ), 1 DuQuant (J ≥ τ)" in text and "hi" in text


# ---------------------------------------------------------------- the recipes


RECIPES = ("lrq-dit-w3a8", "lrq-dit-w4a6", "lrq-dit-w4a4")


def test_recipes_registered():
    names = method_names()
    for w, a in ((3, 8), (4, 6), (4, 4)):
        s = f"w{w}a{a}"
        for n in (f"lrq-dit-{s}", f"lrq-dit-tlq-only-{s}", f"lrq-dit-ars-only-{s}", f"lrq-dit-hadamard-only-{s}",
                  f"quarot-{s}", f"vidit-q-{s}", f"dynamic-{s}"):
            assert n in names and get_recipe(n).bits == f"W{w}A{a}", n
    assert get_recipe("lrq-dit-w3a8").needs.stats and not get_recipe("lrq-dit-tlq-only-w3a8").needs.any
    assert "svdquant-w3a8" in names and "svdquant-w4a6" in names and get_recipe("svdquant").bits == "W4A4"


@pytest.fixture(scope="module")
def default_dit():
    from jaxdq.models.sources import load_model
    from jaxdq.quantize import calibration, calibration_request

    model = load_model("default")
    calib = calibration(model, ["lrq-dit-w3a8"], request=calibration_request(model, per_class=1), num_steps=4)
    return model, calib


def test_lrq_recipe_on_the_default_dit(default_dit):
    """lrq-dit-w3a8: every layer but the first/last is a W3A8 twin-log QLinear with its ARS
    rotation; the report (metadata) lists each layer's J and path, J < τ ⇔ Hadamard; the
    model's weight bytes sit below the W4A4 recipe's."""
    from jaxdq.quantize import quantize_model
    from jaxdq.quant.rules import role_matches

    model, calib = default_dit
    q = quantize_model(model, "lrq-dit-w3a8", calib=calib)
    rows = q.metadata["report"]["ars"]
    assert q.metadata["bits"] == "W3A8" and q.metadata["report"]["ars_tau"] == 1.0
    by_path = {r["layer"]: r for r in rows}
    for path, layer in iter_layers(q.params):
        role = model.roles[path]
        if role_matches("embedding", role) or role_matches("final", role):
            assert isinstance(layer, FloatLinear) and path not in by_path, path
            continue
        assert isinstance(layer, QLinear) and isinstance(layer.weight, tl.TwinLogWeight) and layer.bits_label == "W3A8"
        r = by_path[path]
        assert (r["J"] < 1.0) == (r["path"] == "hadamard")
        want = dq.DuQuantRotation if r["path"] == "duquant" else type(rotation_for(layer.in_features))
        assert isinstance(layer.transform.rotation, want), path
    text = dq.format_report(q)
    n_dq = sum(r["path"] == "duquant" for r in rows)
    assert f"{len(rows) - n_dq} of {len(rows)} layers Hadamard" in text and text.startswith("layer")
    # the ARS transform alone (no quantization) leaves the float model's output unchanged
    sel = selected([keep_float(), Rule(lrq_cfg(3, 8))], model.roles)
    rot, rows2 = dq.ars_params(model.params, pool_stats(calib), sel)
    assert [(r["layer"], r["path"]) for r in rows2] == [(r["layer"], r["path"]) for r in rows]
    x = jax.random.normal(jax.random.key(0), (2, 1, 16, 16))
    kw = model.family.model_kwargs(model.config, x, jnp.array([500, 20]), {"y": jnp.array([3, 7])})
    y0 = model.module.apply({"params": model.params}, **kw)
    y1 = model.module.apply({"params": rot}, **kw)
    assert float(jnp.linalg.norm(y1 - y0) / jnp.linalg.norm(y0)) < 1e-5
    # and the quantized model's weight bytes at W3 sit below a W4 model's with the same ARS
    # rotations (uniform per-channel W4: lrq-dit-ars-only-w4a4; the DuQuant blocks count too,
    # and re-quantizing at TLQ W4 would compile every search again)
    q4 = quantize_model(model, "lrq-dit-ars-only-w4a4", calib=calib)
    assert [r["path"] for r in q4.metadata["report"]["ars"]] == [r["path"] for r in rows]
    assert weight_bytes(q.params) < weight_bytes(q4.params)


def test_lrq_options_and_the_output_error_objective():
    """Recipe options: tau moves layers between paths; tlq_objective="output" needs stored
    tokens and then searches on the layer's transformed tokens (what quantize_linear hands it)."""
    layer = _float_layer(21, 128, 32)
    x = _tokens(22, (40, 128), outliers=[(1, 30.0)])
    st = dict(_stats(x), samples=x)
    spec = tl.TwinLogSpec(bits=3, objective="output", **SMALL)
    cfg = LayerQuant(weight=spec, act=A8, pack=True)
    rot = rotate_layer(layer, BlockHadamard(128))
    with pytest.raises(ValueError, match="calibration tokens"):
        quantize_params({"l": rot}, [Rule(cfg)], roles={"l": "ffn"})
    got = quantize_params({"l": rot}, [Rule(cfg)], roles={"l": "ffn"}, stats={"l": st})["l"].weight
    want = tl.TwinLogWeight.from_kernel(rot.kernel, spec, x=rot.transform.apply(jnp.asarray(x)))
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
    weight_only = tl.TwinLogWeight.from_kernel(rot.kernel, dataclasses.replace(spec, objective="weight"))
    assert not np.array_equal(np.asarray(got.codes), np.asarray(weight_only.codes))


def test_ablation_recipes_pick_their_rotations_and_weights():
    """lrq-dit-hadamard-only: every layer the full-width Hadamard whatever J (τ = ∞, the
    report says so); lrq-dit: the J ≥ τ layer DuQuant; lrq-dit-ars-only: the same rotations
    with uniform weights; lrq-dit-tlq-only: twin-log weights, no rotation."""
    from jaxdq.quant.recipes import Context

    width = 256
    lo = _tokens(30, (32, width)) * 0.5
    hi = _tokens(31, (32, width), outliers=[(3, 245.0)])
    stats = {"lo": _stats(lo), "hi": _stats(hi)}
    params = {"lo": {"kernel": _float_layer(32, width, 128).kernel}, "hi": {"kernel": _float_layer(33, width, 128).kernel}}

    class Ctx(Context):
        def pooled(self, name, steps=None):
            return stats

    ctx = Ctx(roles={"lo": "ffn", "hi": "self-attn"})
    rot = {"lrq-dit-w4a6": ("hadamard", "duquant"), "lrq-dit-hadamard-only-w4a6": ("hadamard", "hadamard"),
           "lrq-dit-ars-only-w4a6": ("hadamard", "duquant")}
    for name, paths in rot.items():
        out, report = get_recipe(name).build(params, ctx)
        assert tuple(r["path"] for r in report["ars"]) == paths, name
        assert report["ars_tau"] == ("inf" if "hadamard-only" in name else 1.0)
        want = tl.TwinLogWeight if "ars-only" not in name else QWeight
        assert all(isinstance(out[k].weight, want) and out[k].bits_label == "W4A6" for k in ("lo", "hi")), name
        assert isinstance(out["hi"].transform.rotation, dq.DuQuantRotation if paths[1] == "duquant"
                          else type(rotation_for(width))), name
    out, report = get_recipe("lrq-dit-tlq-only-w4a6").build(params, ctx)
    assert "ars" not in report and out["hi"].transform.rotation is None
    assert isinstance(out["hi"].weight, tl.TwinLogWeight)
