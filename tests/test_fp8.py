"""FP8 W8A8 (issue 19, item 5): float8 e4m3 codes (``QuantSpec(fmt="e4m3")``), weights per
output channel, activations per token, scale ``absmax / 448``.

* the fake-quant reference against an independent float64 NumPy e4m3 rounding (nearest,
  ties to even, 3 mantissa bits, subnormals below 2^-6), itself checked against
  ``ml_dtypes.float8_e4m3fn``;
* the integer path (XLA's float8 × float8 dot, f32 accumulator) against the fake-quant
  product in float64;
* the recipes ``fp8-w8a8`` / ``vidit-q-fp8-w8a8`` through the CLI, a checkpoint round trip
  (e4m3 codes and the spec's ``fmt`` survive; same samples), and compare's method list.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxdq.quant.layers import QLinear, iter_layers
from jaxdq.quant.quantizer import QuantSpec, fake_quant, quantize_weight

E4M3_MAX = 448.0


def e4m3_round(v: np.ndarray) -> np.ndarray:
    """float64 values rounded to the nearest float8 e4m3fn value (ties to even), saturated at
    ±448: 3 mantissa bits, exponent ≥ −6 (subnormal step 2^-9)."""
    v = np.asarray(v, np.float64)
    a = np.minimum(np.abs(v), E4M3_MAX)
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    step = np.exp2(np.maximum(e, -6.0) - 3.0)  # spacing of the binade (subnormals: 2^-9)
    r = np.round(a / step) * step  # np.round: half to even on the integer a/step
    return np.sign(v) * np.minimum(r, E4M3_MAX)


def test_numpy_e4m3_rounding_is_ml_dtypes():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(size=20000) * 10.0 ** rng.uniform(-4, 2.7, size=20000),
                        # exact ties between neighbours in several binades and among subnormals
                        np.array([1.0625, 1.1875, 17.0, 19.0, 2 ** -9 * 0.5, 2 ** -9 * 1.5, 232.0, 464.0, -1.0625]),
                        np.linspace(-448, 448, 4001)]).astype(np.float32).astype(np.float64)
    want = v.astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    inside = np.abs(v) <= E4M3_MAX  # ml_dtypes turns |v| > 464 into NaN; ours saturates (as the quantizer clips)
    np.testing.assert_array_equal(e4m3_round(v)[inside], want[inside])
    assert e4m3_round(np.array([1.0625]))[0] == 1.0 and e4m3_round(np.array([1.1875]))[0] == 1.25  # ties to even


def _ref_fake(x: np.ndarray, axis: int) -> np.ndarray:
    """Per-row (axis=1, tokens) or per-column (axis=0, output channels) e4m3 fake quant in
    NumPy: ``s = max(absmax / 448, 1e-8)``, ``e4m3(x / s) · s`` (the quotient in float32, as
    the quantizer computes it)."""
    x32 = np.asarray(x, np.float32)
    s = np.maximum(np.max(np.abs(x32), axis=axis, keepdims=True) / np.float32(E4M3_MAX), np.float32(1e-8))
    q = e4m3_round((x32 / s).astype(np.float64))
    return q * s.astype(np.float64), s


def _heavy(rng, shape):
    """Activations with outlier channels (what per-token FP8 must cope with)."""
    x = rng.normal(size=shape) * np.exp(rng.normal(size=shape[-1]) * 1.5)
    return x.astype(np.float32)


def test_fake_quant_activations_per_token_is_float64_numpy_e4m3():
    rng = np.random.default_rng(1)
    x = _heavy(rng, (64, 96))
    spec = QuantSpec(bits=8, granularity="token", fmt="e4m3")
    got = np.asarray(fake_quant(jnp.asarray(x), spec, kind="activation"), np.float64)
    want, _ = _ref_fake(x, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert np.all(np.max(np.abs(got), axis=1) == pytest.approx(np.max(np.abs(x), axis=1), rel=1e-6))
    # e4m3 keeps ~2^-4 relative precision everywhere (not int8's absolute step): error bound per element
    rel = np.abs(got - x) / np.maximum(np.abs(x), 2 ** -6 * np.max(np.abs(x), axis=1, keepdims=True) / 448)
    assert rel.max() <= 2 ** -4 + 1e-6


def test_weights_per_output_channel_are_e4m3_codes():
    rng = np.random.default_rng(2)
    w = _heavy(rng, (96, 48)).T.copy()  # [C_in, C_out], outlier input rows
    spec = QuantSpec(bits=8, granularity="channel", fmt="e4m3")
    codes, scale, zero = quantize_weight(jnp.asarray(w), spec)
    assert codes.dtype == jnp.float8_e4m3fn and zero is None
    _, s = _ref_fake(w, axis=0)  # one scale per output channel (column)
    sc = np.asarray(scale, np.float32).reshape(1, -1)
    np.testing.assert_allclose(sc.reshape(-1), s.reshape(-1), rtol=2.4e-7)  # absmax/448: XLA may use ·(1/448), 1 ulp
    want = e4m3_round((np.asarray(w, np.float32) / sc).astype(np.float64))  # the codes, given the scales
    np.testing.assert_array_equal(np.asarray(codes.astype(jnp.float32), np.float64), want)
    with pytest.raises(ValueError, match="e4m3"):
        QuantSpec(bits=4, fmt="e4m3")


def test_fp8_integer_path_is_the_fake_quant_product():
    """XLA's float8 × float8 dot with an f32 accumulator: the e4m3 products are exact in
    f32, so the integer path equals the reference ``Q_a(X)·deq(W)`` to f32 summation error."""
    from jaxdq.quant.rules import LayerQuant, Rule, quantize_params
    from jaxdq.quant.recipes import fp8_cfg

    rng = np.random.default_rng(3)
    params = {"l": {"kernel": jnp.asarray(rng.normal(size=(128, 64)) / 11, jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=64) * 0.1, jnp.float32)}}
    q = quantize_params(params, [Rule(fp8_cfg())], roles={"l": "ffn"})["l"]
    assert isinstance(q, QLinear) and q.int_path_ok() and q.weight.codes.dtype == jnp.float8_e4m3fn
    x = jnp.asarray(_heavy(rng, (32, 128)))
    xq, _ = _ref_fake(np.asarray(x), axis=1)
    wq = np.asarray(q.weight.dequantize(), np.float64)
    want = xq @ wq + np.asarray(q.bias, np.float64)
    fake = np.asarray(q.product_fake(x) + q.bias, np.float64)
    intp = np.asarray(q.product_int(x) + q.bias, np.float64)
    for got in (fake, intp):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    exact = x @ params["l"]["kernel"] + params["l"]["bias"]
    rel = np.linalg.norm(intp - np.asarray(exact)) / np.linalg.norm(np.asarray(exact))
    assert 1e-3 < rel < 6e-2, rel  # FP8 error: nonzero, a few percent


def _fp8_layers(params):
    layers = [lay for _, lay in iter_layers(params) if isinstance(lay, QLinear)]
    assert layers and all(lay.weight.spec.fmt == "e4m3" and lay.act.spec.fmt == "e4m3"
                          and lay.weight.codes.dtype == jnp.float8_e4m3fn for lay in layers)
    return layers


def _same_params_and_samples(loaded, direct_params):
    from jaxdq.sampling.families import Request

    for a, b in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(direct_params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    b = loaded.family.batch(loaded.config, Request(classes=(3,), per_class=2, seed=0))
    run = loaded.family.sampler(loaded.config, num_steps=4)
    xa = run(loaded.params, b.x_T, b.cond, b.uncond, jax.random.PRNGKey(0))
    xb = run(direct_params, b.x_T, b.cond, b.uncond, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))


def test_fp8_recipes_are_listed_with_w8a8_labels():
    from jaxdq.compare import DEFAULT_METHODS
    from jaxdq.quant.recipes import get_recipe

    for method in ("fp8-w8a8", "vidit-q-fp8-w8a8"):
        assert method in DEFAULT_METHODS and get_recipe(method).bits == "W8A8"
        assert "FP8" in get_recipe(method).description and "e4m3" in get_recipe(method).description


def test_fp8_recipe_cli_checkpoint_round_trip(tmp_path, capsys):
    from jaxdq.cli import main
    from jaxdq.models.sources import load_model
    from jaxdq.quantize import quantize_model

    ckpt = tmp_path / "fp8"
    assert main(["quantize", "--method", "fp8-w8a8", "--out", str(ckpt)]) == 0
    loaded = load_model(str(ckpt))
    assert loaded.metadata["method"] == "fp8-w8a8" and loaded.metadata["bits"] == "W8A8"
    _fp8_layers(loaded.params)
    _same_params_and_samples(loaded, quantize_model(load_model("default"), "fp8-w8a8", progress=False).params)
    assert main(["load", str(ckpt)]) == 0
    assert '"method": "fp8-w8a8"' in capsys.readouterr().out


def test_vidit_q_fp8_checkpoint_round_trip(tmp_path):
    """The calibrated variant (smoothing + Hadamard before the e4m3 codes), on a small calibration."""
    from jaxdq.models.sources import load_model, save_model
    from jaxdq.quantize import calibration_request, quantize_model

    model = load_model("default")
    req = calibration_request(model, per_class=1, classes=(0, 5))
    q = quantize_model(model, "vidit-q-fp8-w8a8", request=req, calib_steps=4, progress=False)
    layers = _fp8_layers(q.params)
    assert any(lay.transform.smooth is not None and lay.transform.rotation is not None for lay in layers)
    path = save_model(str(tmp_path / "vq"), q)
    loaded = load_model(str(path))
    assert loaded.metadata["method"] == "vidit-q-fp8-w8a8" and loaded.metadata["bits"] == "W8A8"
    _same_params_and_samples(loaded, q.params)
