"""The NaN/inf policy (jaxdq.quant.quantizer docstring): a non-finite activation neither sets a range
nor hides as a finite code — it passes through (reference) or makes its output row NaN (integer
path) — and non-finite weights are refused, naming the layer."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq import backend
from jaxdq.quant.layers import FloatLinear
from jaxdq.quant.quantizer import QuantSpec, fake_quant
from jaxdq.quant.rules import LayerQuant, Rule, quantize_linear, quantize_params

TOKEN = QuantSpec(bits=8, granularity="token")


def _x(seed=0, shape=(4, 16)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_dynamic_per_token_nonfinite_passes_through_and_does_not_set_the_range(bad):
    x = _x()
    y = x.copy()
    y[1, 3] = bad
    clean = x.copy()
    clean[1, 3] = 0.0  # what the token's range is computed from
    got = np.asarray(fake_quant(jnp.asarray(y), TOKEN, kind="activation"))
    ref = np.asarray(fake_quant(jnp.asarray(clean), TOKEN, kind="activation"))
    assert np.isnan(got[1, 3]) if np.isnan(bad) else got[1, 3] == bad
    mask = np.ones_like(x, bool)
    mask[1, 3] = False
    np.testing.assert_array_equal(got[mask], ref[mask])  # the rest of the token is quantized as usual


def test_per_tensor_dynamic_range_ignores_an_inf():
    spec = QuantSpec(bits=8, granularity="tensor")
    x = _x(1)
    y = x.copy()
    y[0, 0] = np.inf
    got = np.asarray(fake_quant(jnp.asarray(y), spec, kind="activation"))
    clean = x.copy()
    clean[0, 0] = 0.0
    ref = np.asarray(fake_quant(jnp.asarray(clean), spec, kind="activation"))
    assert got[0, 0] == np.inf
    np.testing.assert_array_equal(got.ravel()[1:], ref.ravel()[1:])
    assert np.isfinite(got.ravel()[1:]).all()


def test_static_quantization_keeps_nan_visible():
    spec = QuantSpec(bits=8, symmetric=False, granularity="tensor")
    x = jnp.asarray([[0.5, np.nan, -0.25]])
    out = np.asarray(fake_quant(x, spec, kind="activation", scale=jnp.float32(0.01), zero=jnp.float32(128)))
    assert np.isnan(out[0, 1]) and np.isfinite(out[0, [0, 2]]).all()


def test_integer_path_gives_nan_rows_for_nonfinite_inputs_and_the_reference_elsewhere():
    rng = np.random.default_rng(2)
    layer = FloatLinear(kernel=jnp.asarray(rng.normal(size=(16, 8)), jnp.float32))
    q = quantize_linear(layer, LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=TOKEN))
    x = _x(3)
    x[2, 5] = np.inf
    y_int = np.asarray(backend.execute(q, jnp.asarray(x), backend.policy("integer")))
    y_ref = np.asarray(backend.execute(q, jnp.asarray(x), backend.REFERENCE))
    assert np.isnan(y_int[2]).all() and not np.isfinite(y_ref[2]).all()
    rows = [0, 1, 3]
    np.testing.assert_allclose(y_int[rows], y_ref[rows], rtol=1e-5, atol=1e-5)


def test_nonfinite_weights_are_refused_naming_the_layer():
    w = np.random.default_rng(4).normal(size=(8, 4)).astype(np.float32)
    w[3, 1] = np.nan
    params = {"blocks_0": {"fc1": {"kernel": jnp.asarray(w)}}}
    cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=TOKEN)
    with pytest.raises(ValueError, match=r"layer 'blocks_0/fc1': weight \(8, 4\) holds 1 NaN/inf"):
        quantize_params(params, [Rule(cfg)], roles={"blocks_0/fc1": "ffn"})
