"""QLinear forward vs a float64 NumPy reference; the node under jit/vmap; dispatch in a Flax model."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.nn import Linear, linear
from jaxdq.quant.qlinear import QLinear, nbytes
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import LayerQuant, Rule, quantize_linear, quantize_params


def np_sym_quant(x, bits, axis):
    """float64 reference: symmetric fake quant, scale = absmax / (2^(b-1) - 1) over ``axis``."""
    qmax = 2 ** (bits - 1) - 1
    s = np.max(np.abs(x), axis=axis, keepdims=True) / qmax
    s = np.where(s == 0, 1.0, s)
    return np.clip(np.round(x / s), -qmax - 1, qmax) * s


def np_group_quant(w, bits, g):
    cin, cout = w.shape
    wg = w.reshape(cin // g, g, cout)
    return np_sym_quant(wg, bits, axis=1).reshape(cin, cout)


@pytest.fixture
def layer():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 48)).astype(np.float32) * 0.1
    w[3] *= 20.0  # an outlier input channel
    return {"kernel": jnp.asarray(w), "bias": jnp.asarray(rng.normal(size=48).astype(np.float32))}


def make_x(seed=1, shape=(2, 5, 64)):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    x[..., 7] *= 30.0
    return x


def test_w8a8_per_channel_per_token_matches_numpy(layer):
    cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=QuantSpec(bits=8, granularity="token"))
    q = quantize_linear(layer, cfg)
    x = make_x()
    w64 = np.asarray(layer["kernel"], np.float64)
    ref = np_sym_quant(x.astype(np.float64), 8, -1) @ np_sym_quant(w64, 8, 0) + np.asarray(layer["bias"])
    out = np.asarray(q(jnp.asarray(x)))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # and quantization really happened: differs from the float layer by more than rounding
    float_out = x.astype(np.float64) @ w64 + np.asarray(layer["bias"])
    assert np.max(np.abs(out - float_out)) > 1e-3
    # the outlier channel (x30) costs the other channels precision under per-token scales, but not all of it
    assert np.max(np.abs(out - float_out)) < 0.15 * np.max(np.abs(float_out))


def test_int_impl_equals_fake_impl(layer):
    for granularity in ("token", "tensor"):
        cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"),
                         act=QuantSpec(bits=8, granularity=granularity))
        fake = quantize_linear(layer, cfg)
        intq = fake.replace(impl="int")
        assert intq.int_path_ok()
        x = jnp.asarray(make_x(2))
        np.testing.assert_allclose(np.asarray(intq(x)), np.asarray(fake(x)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,layout", [(8, "kn"), (8, "nk"), (4, "kn"), (4, "nk")])
def test_int_impl_reads_the_stored_codes(layer, bits, layout):
    """``stored_codes`` is the storage order (int4: a view of the packed bytes), and the int
    path on it computes what the fake path computes, in both layouts."""
    cfg = LayerQuant(weight=QuantSpec(bits=bits, granularity="channel"), act=QuantSpec(bits=8, granularity="token"),
                     pack=bits == 4)
    q = quantize_linear(layer, cfg).to_layout(layout)
    codes = np.asarray(q.weight_codes(), np.int32)  # [C_in, C_out], unpacked by unpack_int4
    stored = np.asarray(q.stored_codes().astype(jnp.int8), np.int32)
    np.testing.assert_array_equal(stored, codes.T if layout == "nk" else codes)
    assert q.stored_codes().dtype == (jnp.int4 if bits == 4 else jnp.int8)
    x = jnp.asarray(make_x(2))
    np.testing.assert_allclose(np.asarray(q.replace(impl="int")(x)), np.asarray(q(x)), rtol=1e-5, atol=1e-4)


def test_weight_only_int4_packed_group(layer):
    cfg = LayerQuant(weight=QuantSpec(bits=4, granularity="group", group_size=16), act=None, pack=True)
    q = quantize_linear(layer, cfg)
    assert q.qweight.dtype == jnp.uint8 and q.qweight.shape == (64, 24)
    assert q.out_features == 48 and q.in_features == 64
    x = make_x(3)
    ref = x.astype(np.float64) @ np_group_quant(np.asarray(layer["kernel"], np.float64), 4, 16) + np.asarray(layer["bias"])
    np.testing.assert_allclose(np.asarray(q(jnp.asarray(x))), ref, rtol=1e-4, atol=1e-4)
    # packed storage is half the int8 codes
    assert q.qweight.nbytes == 64 * 48 // 2


def test_smooth_and_lowrank_semantics(layer):
    rng = np.random.default_rng(5)
    cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=QuantSpec(bits=8, granularity="token"))
    q = quantize_linear(layer, cfg)
    s = rng.uniform(0.5, 2.0, size=64).astype(np.float32)
    a = rng.normal(size=(64, 4)).astype(np.float32)
    b = rng.normal(size=(4, 48)).astype(np.float32)
    q2 = q.replace(smooth=jnp.asarray(s), lowrank_a=jnp.asarray(a), lowrank_b=jnp.asarray(b))
    x = make_x(4).astype(np.float64)
    xs = x / s
    w_deq = np.asarray(q.dequantized_weight(), np.float64)
    ref = np_sym_quant(xs, 8, -1) @ w_deq + xs @ a @ b + np.asarray(layer["bias"])
    np.testing.assert_allclose(np.asarray(q2(jnp.asarray(x, jnp.float32))), ref, rtol=1e-4, atol=2e-4)


def test_static_activation_uses_stored_range(layer):
    cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="tensor"),
                     act=QuantSpec(bits=8, symmetric=False, granularity="tensor"), act_static=True)
    q = quantize_linear(layer, cfg, act_stats={"min": jnp.float32(-2.0), "max": jnp.float32(6.0)})
    x = np.linspace(-4, 8, 64 * 3, dtype=np.float32).reshape(3, 64)
    s, z = (6.0 + 2.0) / 255, np.round(2.0 / ((6.0 + 2.0) / 255))
    xq = (np.clip(np.round(x / s) + z, 0, 255) - z) * s
    w = np.asarray(layer["kernel"], np.float64)
    ws = np.max(np.abs(w)) / 127
    ref = xq @ (np.clip(np.round(w / ws), -128, 127) * ws) + np.asarray(layer["bias"])
    np.testing.assert_allclose(np.asarray(q(jnp.asarray(x))), ref, rtol=1e-4, atol=1e-3)
    # static: clipping at the calibrated range (dynamic would not clip x=8)
    assert np.asarray(q.quantized_input(jnp.asarray(x))).max() <= 6.0 + s


def test_qlinear_is_a_pytree_that_jits_and_vmaps(layer):
    cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=QuantSpec(bits=8, granularity="token"))
    q = quantize_linear(layer, cfg)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 3  # qweight, w_scale, bias (None fields are empty subtrees)
    assert jax.tree_util.tree_unflatten(treedef, leaves).w_spec == cfg.weight
    x = jnp.asarray(make_x(6))
    out = jax.jit(lambda q, x: q(x))(q, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(q(x)), rtol=1e-6, atol=1e-6)
    # vmap over a stack of two quantized layers
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), q, q.replace(bias=q.bias + 1))
    outs = jax.vmap(lambda qq: qq(x))(stacked)
    np.testing.assert_allclose(np.asarray(outs[1] - outs[0]), 1.0, atol=1e-4)


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(Linear(32, name="fc1", role="ffn")(x))
        return Linear(8, name="fc2", role="ffn")(h)


def test_model_dispatches_on_quantized_params():
    model = TinyMLP()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    qparams = quantize_params(params, [Rule("fc1", LayerQuant(weight=QuantSpec(bits=4, granularity="channel"),
                                                              act=QuantSpec(bits=8, granularity="token")))])
    assert isinstance(qparams["fc1"]["qlinear"], QLinear) and "kernel" in qparams["fc2"]
    out_f = model.apply({"params": params}, x)
    out_q = jax.jit(model.apply)({"params": qparams}, x)
    # the quantized model equals the same model built by hand from the quantized layer
    h = jax.nn.gelu(linear(qparams["fc1"], x))
    np.testing.assert_allclose(np.asarray(out_q), np.asarray(linear(params["fc2"], h)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(out_q), np.asarray(out_f), atol=1e-4)
    assert nbytes(qparams) < nbytes(params)
