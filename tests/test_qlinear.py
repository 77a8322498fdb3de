"""QLinear forward vs a float64 NumPy reference; the integer path vs the reference; the
weight storage (layouts, packing, bytes); the node under jit/vmap; dispatch in a Flax model."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq import backend
from jaxdq.nn import Linear, linear
from jaxdq.quant.layers import (FloatLinear, InputTransform, QLinear, QWeight, forward, nbytes,
                                weight_bytes)
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import LayerQuant, Rule, quantize_linear, quantize_params

INTEGER = backend.policy("integer")


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
    return FloatLinear(kernel=jnp.asarray(w), bias=jnp.asarray(rng.normal(size=48).astype(np.float32)))


def make_x(seed=1, shape=(2, 5, 64)):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    x[..., 7] *= 30.0
    return x


def test_w8a8_per_channel_per_token_matches_numpy(layer):
    cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=QuantSpec(bits=8, granularity="token"))
    q = quantize_linear(layer, cfg)
    x = make_x()
    w64 = np.asarray(layer.kernel, np.float64)
    ref = np_sym_quant(x.astype(np.float64), 8, -1) @ np_sym_quant(w64, 8, 0) + np.asarray(layer.bias)
    out = np.asarray(q(jnp.asarray(x)))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # the backend's reference policy runs the same function
    np.testing.assert_array_equal(np.asarray(backend.execute(q, jnp.asarray(x), backend.REFERENCE)), out)
    # and quantization really happened: differs from the float layer by more than rounding
    float_out = x.astype(np.float64) @ w64 + np.asarray(layer.bias)
    assert np.max(np.abs(out - float_out)) > 1e-3
    # the outlier channel (x30) costs the other channels precision under per-token scales, but not all of it
    assert np.max(np.abs(out - float_out)) < 0.15 * np.max(np.abs(float_out))


def test_int_impl_equals_fake_impl(layer):
    for granularity in ("token", "tensor"):
        cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"),
                         act=QuantSpec(bits=8, granularity=granularity))
        q = quantize_linear(layer, cfg)
        assert q.int_path_ok()
        assert backend.choose(q, 10, INTEGER) == "int" and backend.choose(q, 10, backend.REFERENCE) == "fake"
        x = jnp.asarray(make_x(2))
        fake = np.asarray(q(x))
        np.testing.assert_allclose(np.asarray(backend.execute(q, x, INTEGER)), fake, rtol=1e-5, atol=1e-4)
        # the integer product through the one reference forward
        via_forward = forward(q.transform, q.bias, x, q.product_int, jnp.float32)
        np.testing.assert_allclose(np.asarray(via_forward), fake, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,layout", [(8, "kn"), (8, "nk"), (4, "kn"), (4, "nk")])
def test_int_impl_reads_the_stored_codes(layer, bits, layout):
    """``QWeight.stored`` is the storage order (int4: a view of the packed bytes), and the int
    path on it computes what the fake path computes, in both layouts."""
    cfg = LayerQuant(weight=QuantSpec(bits=bits, granularity="channel"), act=QuantSpec(bits=8, granularity="token"),
                     pack=bits == 4)
    q = quantize_linear(layer, cfg)
    q = q.replace(weight=q.weight.to_layout(layout))
    codes = np.asarray(q.weight.unpacked(), np.int32)  # [C_in, C_out], unpacked by unpack_int4
    stored = np.asarray(q.weight.stored().astype(jnp.int8), np.int32)
    np.testing.assert_array_equal(stored, codes.T if layout == "nk" else codes)
    assert q.weight.stored().dtype == (jnp.int4 if bits == 4 else jnp.int8)
    x = jnp.asarray(make_x(2))
    np.testing.assert_allclose(np.asarray(backend.execute(q, x, INTEGER)), np.asarray(q(x)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, True), (4, False), (8, False)])
def test_to_layout_round_trip_keeps_codes_and_outputs(layer, bits, symmetric):
    """kn → nk → kn: the unpacked codes, the stored bytes and the layer's outputs (reference and
    integer path) are unchanged; shape / in/out features are the kernel's whatever the layout."""
    cfg = LayerQuant(weight=QuantSpec(bits=bits, symmetric=symmetric, granularity="channel"),
                     act=QuantSpec(bits=8, granularity="token"), pack=bits == 4)
    q = quantize_linear(layer, cfg)
    w_nk = q.weight.to_layout("nk")
    w_back = w_nk.to_layout("kn")
    assert q.weight.layout == "kn" and w_nk.layout == "nk" and w_back.layout == "kn"
    assert q.weight.to_layout("kn") is q.weight  # same layout: unchanged
    assert w_nk.codes.shape == ((48, 32) if bits == 4 else (48, 64))  # [C_out, C_in] (packed along C_in)
    for w in (w_nk, w_back):
        assert isinstance(w, QWeight) and w.shape == (64, 48) and w.packed == (bits == 4) and w.spec == q.weight.spec
        assert w.codes.dtype == q.weight.codes.dtype
        np.testing.assert_array_equal(np.asarray(w.unpacked()), np.asarray(q.weight.unpacked()))
        np.testing.assert_array_equal(np.asarray(w.dequantize()), np.asarray(q.weight.dequantize()))
    np.testing.assert_array_equal(np.asarray(w_back.codes), np.asarray(q.weight.codes))
    x = jnp.asarray(make_x(8))
    ref = np.asarray(q(x))
    for w in (w_nk, w_back):
        qq = q.replace(weight=w)
        assert qq.in_features == 64 and qq.out_features == 48
        np.testing.assert_array_equal(np.asarray(qq(x)), ref)
        if symmetric:
            np.testing.assert_allclose(np.asarray(backend.execute(qq, x, INTEGER)), ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="layout"):
        q.weight.to_layout("kk")


def test_weight_only_int4_packed_group(layer):
    cfg = LayerQuant(weight=QuantSpec(bits=4, granularity="group", group_size=16), act=None, pack=True)
    q = quantize_linear(layer, cfg)
    assert q.act is None and q.bits_label == "W4A16"
    assert q.weight.codes.dtype == jnp.uint8 and q.weight.codes.shape == (64, 24)
    assert q.out_features == 48 and q.in_features == 64
    x = make_x(3)
    ref = x.astype(np.float64) @ np_group_quant(np.asarray(layer.kernel, np.float64), 4, 16) + np.asarray(layer.bias)
    np.testing.assert_allclose(np.asarray(q(jnp.asarray(x))), ref, rtol=1e-4, atol=1e-4)
    # packed storage is half the int8 codes
    assert q.weight.codes.nbytes == 64 * 48 // 2


def test_smooth_and_lowrank_semantics(layer):
    rng = np.random.default_rng(5)
    cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=QuantSpec(bits=8, granularity="token"))
    q = quantize_linear(layer, cfg)
    s = rng.uniform(0.5, 2.0, size=64).astype(np.float32)
    a = rng.normal(size=(64, 4)).astype(np.float32)
    b = rng.normal(size=(4, 48)).astype(np.float32)
    q2 = q.replace(transform=InputTransform(smooth=jnp.asarray(s), lowrank_a=jnp.asarray(a), lowrank_b=jnp.asarray(b)))
    x = make_x(4).astype(np.float64)
    xs = x / s
    w_deq = np.asarray(q.weight.dequantize(), np.float64)
    ref = np_sym_quant(xs, 8, -1) @ w_deq + xs @ a @ b + np.asarray(layer.bias)
    np.testing.assert_allclose(np.asarray(q2(jnp.asarray(x, jnp.float32))), ref, rtol=1e-4, atol=2e-4)
    # the integer path applies the same transforms and branch
    np.testing.assert_allclose(np.asarray(backend.execute(q2, jnp.asarray(x, jnp.float32), INTEGER)), ref,
                               rtol=1e-4, atol=2e-4)


def test_static_activation_uses_stored_range(layer):
    cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="tensor"),
                     act=QuantSpec(bits=8, symmetric=False, granularity="tensor"), act_static=True)
    q = quantize_linear(layer, cfg, act_stats={"min": jnp.float32(-2.0), "max": jnp.float32(6.0)})
    assert q.act.static
    x = np.linspace(-4, 8, 64 * 3, dtype=np.float32).reshape(3, 64)
    s, z = (6.0 + 2.0) / 255, np.round(2.0 / ((6.0 + 2.0) / 255))
    xq = (np.clip(np.round(x / s) + z, 0, 255) - z) * s
    w = np.asarray(layer.kernel, np.float64)
    ws = np.max(np.abs(w)) / 127
    ref = xq @ (np.clip(np.round(w / ws), -128, 127) * ws) + np.asarray(layer.bias)
    np.testing.assert_allclose(np.asarray(q(jnp.asarray(x))), ref, rtol=1e-4, atol=1e-3)
    # static: clipping at the calibrated range (dynamic would not clip x=8)
    assert np.asarray(q.act.fake(jnp.asarray(x))).max() <= 6.0 + s


def test_qlinear_is_a_pytree_that_jits_and_vmaps(layer):
    cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=QuantSpec(bits=8, granularity="token"))
    q = quantize_linear(layer, cfg)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 3  # codes, scale, bias (None fields and the identity transform are empty subtrees)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.weight.spec == cfg.weight and back.act.spec == cfg.act
    x = jnp.asarray(make_x(6))
    out = jax.jit(lambda q, x: q(x))(q, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(q(x)), rtol=1e-6, atol=1e-6)
    # vmap over a stack of two quantized layers
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), q, q.replace(bias=q.bias + 1))
    outs = jax.vmap(lambda qq: qq(x))(stacked)
    np.testing.assert_allclose(np.asarray(outs[1] - outs[0]), 1.0, atol=1e-4)


def test_weight_bytes_counts_codes_scales_zeros_factors_and_smooth(layer):
    """``weight_bytes``: codes + scales + zero points + low-rank factors + smoothing vector of a
    quantized layer, kernel (+ transform arrays) of a float one; biases and activation
    qparams excluded."""
    rng = np.random.default_rng(11)
    s = jnp.asarray(rng.uniform(0.5, 2.0, size=64), jnp.float32)
    a = jnp.asarray(rng.normal(size=(64, 4)), jnp.float16)
    b = jnp.asarray(rng.normal(size=(4, 48)), jnp.float16)
    cfg = LayerQuant(weight=QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16),
                     act=QuantSpec(bits=8, granularity="tensor"), act_static=True, pack=True)
    q = quantize_linear(layer, cfg, act_stats={"min": -3.0, "max": 3.0})
    q = q.replace(transform=InputTransform(smooth=s, lowrank_a=a, lowrank_b=b))
    # asymmetric group-16: packed codes [64, 24] uint8, scale and zero [4, 48] float32
    assert q.weight.codes.shape == (64, 24) and q.weight.scale.shape == (4, 48) and q.weight.zero.shape == (4, 48)
    expect = 64 * 24 * 1 + 2 * (4 * 48 * 4) + (64 * 4 + 4 * 48) * 2 + 64 * 4
    assert weight_bytes({"l": q}) == expect
    # float dict: the kernel only (not the bias); a transformed float layer adds its arrays
    f = {"kernel": layer.kernel, "bias": layer.bias}
    assert weight_bytes({"l": f}) == 64 * 48 * 4
    ft = FloatLinear(kernel=layer.kernel, bias=layer.bias, transform=InputTransform(smooth=s, lowrank_a=a,
                                                                                   lowrank_b=b))
    assert weight_bytes({"l": ft}) == 64 * 48 * 4 + (64 * 4 + 4 * 48) * 2 + 64 * 4
    # sums over a tree, and a dict that is not a linear contributes nothing
    tree = {"a": {"l": q}, "b": f, "emb": {"embedding_table": jnp.ones((3, 8))}}
    assert weight_bytes(tree) == expect + 64 * 48 * 4


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(Linear(32, name="fc1", role="ffn")(x))
        return Linear(8, name="fc2", role="ffn")(h)


def test_model_dispatches_on_quantized_params():
    model = TinyMLP()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    roles = {"fc1": "ffn", "fc2": "ffn"}
    qparams = quantize_params(params, [Rule(LayerQuant(weight=QuantSpec(bits=4, granularity="channel"),
                                                       act=QuantSpec(bits=8, granularity="token")), pattern="fc1")],
                              roles=roles)
    assert isinstance(qparams["fc1"], QLinear) and "kernel" in qparams["fc2"]
    out_f = model.apply({"params": params}, x)
    out_q = jax.jit(model.apply)({"params": qparams}, x)
    # the quantized model equals the same model built by hand from the quantized layer
    h = jax.nn.gelu(linear(qparams["fc1"], x))
    np.testing.assert_allclose(np.asarray(out_q), np.asarray(linear(params["fc2"], h)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(out_q), np.asarray(out_f), atol=1e-4)
    assert nbytes(qparams) < nbytes(params)
