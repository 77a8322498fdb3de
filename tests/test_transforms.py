"""Defining properties of the float-equivalent transforms: smoothing and Hadamard rotation."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.nn import linear
from jaxdq.quant.hadamard import (Hadamard, block_hadamard, fwht, hadamard_block_size, hadamard_matrix,
                                  rotate_kernel)
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import LayerQuant, dequantize_params, quantize_linear
from jaxdq.quant.smooth import smooth_layer, smoothing_factors


def _np_hadamard(n):
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h / np.sqrt(n)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_fwht_equals_dense_hadamard(n):
    x = np.random.default_rng(n).normal(size=(3, 5, n))
    ref = x @ _np_hadamard(n)
    np.testing.assert_allclose(hadamard_matrix(n), _np_hadamard(n), atol=1e-12)
    np.testing.assert_allclose(np.asarray(fwht(jnp.asarray(x, jnp.float32))), ref, atol=2e-5)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(jnp.ones((2, 12)))


@pytest.mark.parametrize("k,block", [(1152, 128), (96, 32), (64, 64)])
def test_block_hadamard_is_its_own_inverse_and_orthogonal(k, block):
    assert hadamard_block_size(k) == block
    x = jnp.asarray(np.random.default_rng(0).normal(size=(7, k)), jnp.float32)
    y = block_hadamard(x, block)
    np.testing.assert_allclose(np.asarray(block_hadamard(y, block)), np.asarray(x), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=1), np.linalg.norm(np.asarray(x), axis=1),
                               rtol=1e-5)
    dense = np.kron(np.eye(k // block), _np_hadamard(block))
    np.testing.assert_allclose(np.asarray(y), np.asarray(x, np.float64) @ dense, atol=2e-5)


def _layer(rng, cin=64, cout=48, outliers=(3, 17)):
    w = rng.normal(size=(cin, cout)) * 0.1
    x = rng.normal(size=(4, 10, cin))
    x[..., list(outliers)] *= 40.0  # activation outlier channels, as after adaLN modulation
    return {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(rng.normal(size=cout), jnp.float32)}, x


def test_smoothing_and_rotation_leave_float_output_unchanged():
    rng = np.random.default_rng(1)
    layer, x = _layer(rng)
    ref = x @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
    lam = smoothing_factors(np.abs(x).reshape(-1, 64).max(0), layer["kernel"], 0.5)
    sm = smooth_layer(layer, lam)
    rot = dict(sm, kernel=rotate_kernel(sm["kernel"], 64), hadamard=Hadamard(64))
    for p in (sm, rot):
        np.testing.assert_allclose(np.asarray(linear(p, jnp.asarray(x, jnp.float32))), ref, rtol=1e-4, atol=1e-3)
    # λ follows its formula
    expect = np.abs(x).reshape(-1, 64).max(0) ** 0.5 / np.abs(np.asarray(layer["kernel"])).max(1) ** 0.5
    np.testing.assert_allclose(np.asarray(lam), expect, rtol=1e-5)
    # and the quantized layer built from the transformed dict carries the transforms
    q = quantize_linear(rot, LayerQuant(weight=QuantSpec(bits=8, granularity="channel")))
    assert q.had_block == 64 and q.smooth is not None
    back = dequantize_params({"l": {"qlinear": q}})["l"]
    eff = np.diag(1 / np.asarray(lam, np.float64)) @ _np_hadamard(64) @ np.asarray(q.dequantized_weight(), np.float64)
    np.testing.assert_allclose(np.asarray(back["kernel"]), eff, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(back["kernel"]), np.asarray(layer["kernel"]), atol=0.02)


def test_smoothing_then_rotation_shrinks_per_token_range_and_quant_error():
    rng = np.random.default_rng(2)
    layer, x = _layer(rng)
    xf = jnp.asarray(x, jnp.float32)
    ref = x @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
    cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=QuantSpec(bits=4, granularity="token"))
    lam = smoothing_factors(np.abs(x).reshape(-1, 64).max(0), layer["kernel"], 0.5)
    sm = smooth_layer(layer, lam)
    rot = dict(sm, kernel=rotate_kernel(sm["kernel"], 64), hadamard=Hadamard(64))
    errs = [float(np.mean((np.asarray(quantize_linear(p, cfg)(xf)) - ref) ** 2)) for p in (layer, sm, rot)]
    assert errs[1] < 0.5 * errs[0] and errs[2] < errs[1], errs


def test_smooth_refuses_after_rotation():
    layer, _ = _layer(np.random.default_rng(3))
    with pytest.raises(ValueError, match="before rotating"):
        smooth_layer(dict(layer, hadamard=Hadamard(64)), jnp.ones(64))
