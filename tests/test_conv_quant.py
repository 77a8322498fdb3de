"""Quantized 2-D convolution (issue 15): QConv against a float64 NumPy convolution of the
dequantized operands, the integer path against the fake-quant path, shortcut splitting, and
the UNet routing (every conv but the first and last quantized by the round-to-nearest recipe)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq import backend
from jaxdq.quant.layers import FloatConv, QConv, conv_geometry, iter_layers, static_act_quant
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import LayerQuant, quantize_conv


def _np_conv(x, k, stride, pad):
    """float64 direct convolution: x [N, H, W, C] (NHWC), k [kh, kw, C, O] (HWIO)."""
    x = np.asarray(x, np.float64)
    k = np.asarray(k, np.float64)
    kh, kw, _, o = k.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], ho, wo, o))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            y[:, i, j] = np.einsum("nhwc,hwco->no", patch, k)
    return y


def _np_weight_deq(kernel, bits):
    """Per-output-channel symmetric round-to-nearest in float64 (the papers' weight quantizer)."""
    w = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    qmax = 2 ** (bits - 1) - 1
    s = np.maximum(np.abs(w).max(0, keepdims=True), 1e-8) / qmax
    q = np.clip(np.round(w / s), -qmax - 1, qmax)
    return (q * s).reshape(kernel.shape), s


def _np_act_deq(x, scale, zero, spec):
    x = np.asarray(x, np.float64)
    s = float(scale)
    z = 0.0 if zero is None else float(zero)
    q = np.clip(np.round(x / s) + z, spec.qmin, spec.qmax)
    return (q - z) * s


CASES = [(8, True, 1, 1, 3), (4, True, 2, 1, 3), (8, False, 1, 0, 1), (4, False, 2, 1, 3)]


@pytest.mark.parametrize("wbits,sym,stride,pad,ksize", CASES)
def test_qconv_equals_float64_conv_of_the_dequantized_operands(wbits, sym, stride, pad, ksize):
    rng = np.random.default_rng(wbits + 10 * stride + ksize)
    x = rng.normal(size=(2, 9, 8, 6)).astype(np.float32) + 0.3
    kernel = rng.normal(size=(ksize, ksize, 6, 8)).astype(np.float32) * 0.2
    bias = rng.normal(size=(8,)).astype(np.float32)
    aspec = QuantSpec(bits=8, symmetric=sym, granularity="tensor")
    cfg = LayerQuant(weight=QuantSpec(bits=wbits, granularity="channel"), act=aspec, act_static=True,
                     pack=wbits <= 4)
    stats = {"min": np.float32(x.min()), "max": np.float32(x.max())}
    q = quantize_conv(FloatConv(kernel=jnp.asarray(kernel), bias=jnp.asarray(bias)), cfg, stats)
    assert isinstance(q, QConv) and q.weight.packed == (wbits <= 4)
    wdeq, s = _np_weight_deq(kernel, wbits)
    np.testing.assert_allclose(np.asarray(q.weight.scale).reshape(-1), s.reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.dequantized_kernel(), np.float64), wdeq, rtol=1e-6, atol=1e-7)
    # the activation range: min-max over the tensor (widened to 0), as Q-Diffusion's quantizer
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    want_s = (hi - lo) / (2 ** 8 - 1) if not sym else max(-lo, hi) / 127
    np.testing.assert_allclose(float(q.act.scale), want_s, rtol=1e-5)
    xdeq = _np_act_deq(x, q.act.scale, q.act.zero, aspec)
    ref = _np_conv(xdeq, wdeq, stride, pad) + bias
    geom = conv_geometry(ksize, stride, pad)
    got = np.asarray(q(jnp.asarray(x), geom), np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # and through the backend's reference policy
    got_b = np.asarray(backend.conv(q, jnp.asarray(x), geom))
    np.testing.assert_allclose(got_b, got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "im2col"])
@pytest.mark.parametrize("wbits,sym,stride,pad,ksize", CASES)
def test_integer_conv_equals_fake_quant_to_float_rounding(impl, wbits, sym, stride, pad, ksize):
    rng = np.random.default_rng(7 + wbits + stride)
    x = jnp.asarray(rng.normal(size=(3, 8, 7, 6)).astype(np.float32) * 2.0 - 0.5)
    kernel = jnp.asarray(rng.normal(size=(ksize, ksize, 6, 10)).astype(np.float32))
    act = static_act_quant(float(x.min()), float(x.max()), QuantSpec(bits=8, symmetric=sym, granularity="tensor"))
    q = QConv.from_kernel(kernel, jnp.ones((10,)), QuantSpec(bits=wbits, granularity="channel"),
                          pack=wbits <= 4, act=act)
    geom = conv_geometry(ksize, stride, pad)
    assert q.int_path_ok()
    fake = np.asarray(q.conv_fake(x, geom))
    integer = np.asarray(q.conv_int(x, geom, impl=impl))
    np.testing.assert_allclose(integer, fake, rtol=1e-5, atol=1e-5 * np.abs(fake).max())
    # integer accumulation really happens: the codes are int8 operands of an int32 conv
    hlo = jax.jit(lambda v: q.conv_int(v, geom, impl=impl)).lower(x).as_text()
    out_shape = "x".join(str(d) for d in integer.shape)
    assert f"tensor<{out_shape}xi32>" in hlo and "xi8>" in hlo


def test_split_shortcut_has_a_range_per_half_and_both_paths_agree():
    """Q-Diffusion's shortcut splitting: [h, skip] with very different magnitudes; each half
    quantized with its own range beats one range over both, and int == fake."""
    rng = np.random.default_rng(3)
    h = rng.normal(size=(2, 6, 6, 4)).astype(np.float32) * 20.0
    skip = rng.normal(size=(2, 6, 6, 4)).astype(np.float32) * 0.1
    x = jnp.asarray(np.concatenate([h, skip], -1))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 8, 5)).astype(np.float32))
    spec = QuantSpec(bits=8, symmetric=False, granularity="tensor")
    lo = np.stack([h.min(), skip.min()]).astype(np.float32)
    hi = np.stack([h.max(), skip.max()]).astype(np.float32)
    split = QConv.from_kernel(kernel, None, QuantSpec(bits=8, granularity="channel"),
                              act=static_act_quant(lo, hi, spec, split=4))
    whole = QConv.from_kernel(kernel, None, QuantSpec(bits=8, granularity="channel"),
                              act=static_act_quant(lo.min(), hi.max(), spec))
    geom = conv_geometry(3)
    a = split.act
    xdeq = np.concatenate([_np_act_deq(h, a.scale[0], a.zero[0], spec), _np_act_deq(skip, a.scale[1], a.zero[1],
                                                                                      spec)], -1)
    ref = _np_conv(xdeq, np.asarray(split.dequantized_kernel()), 1, 1)
    np.testing.assert_allclose(np.asarray(split.conv_fake(x, geom)), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(split.conv_int(x, geom)), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # the skip half's own range: its quantization error is far below one range over both halves
    xs = np.asarray(x)[..., 4:]
    e_split = np.abs(_np_act_deq(xs, a.scale[1], a.zero[1], spec) - xs).mean()
    e_whole = np.abs(_np_act_deq(xs, whole.act.scale, whole.act.zero, spec) - xs).mean()
    assert e_split < 0.05 * e_whole


def test_unet_rtn_quantizes_every_conv_but_first_and_last_and_runs_integer():
    from jaxdq.models.sources import load_model
    from jaxdq.quant.recipes import Context, ptq_cfg, rtn_params
    from jaxdq.quantize import quantize_model
    from jaxdq.sampling.families import Request

    model = load_model("default-unet")
    from jaxdq.quantize import calibration

    calib = calibration(model, ["qdiffusion-w8a8"], request=Request(classes=(1, 7), per_class=1, seed=5),
                        num_steps=3)
    m = quantize_model(model, "rtn-w8a8", calib=calib, progress=False)
    layers = dict(iter_layers(m.params))
    convs = {p: l for p, l in layers.items() if isinstance(l, (QConv, FloatConv))}
    assert isinstance(convs.pop("conv_in"), FloatConv) and isinstance(convs.pop("conv_out"), FloatConv)
    assert convs and all(isinstance(l, QConv) and l.act is not None for l in convs.values())
    # up-block concatenations are split (one range per half) for Q-Diffusion's shortcut splitting
    # (the round-to-nearest step of qdiffusion-*/tfmq-dm-*; test_tfmq checks the recipe sets it)
    mq = rtn_params(model.params, Context(roles=model.roles, calib=calib), ptq_cfg(8, 8), split=True)
    splits = [p for p, l in iter_layers(mq) if isinstance(l, QConv) and l.act.split is not None]
    assert splits and all(p.startswith("up_blocks") for p in splits)
    assert not any(l.act.split is not None for l in convs.values())  # rtn-w8a8: one range per input
    # the integer policy runs the quantized network and matches the reference to rounding
    b = model.family.batch(model.config, Request(classes=(3,), per_class=2, seed=0))
    t = jnp.full((2,), 500, jnp.int32)
    ref_net = jax.jit(model.family.eps_fn(model.config))  # jitted: one compile, not one per op
    int_net = jax.jit(model.family.eps_fn(model.config, backend.policy("integer")))
    ref = np.asarray(ref_net(m.params, b.x_T, t, **b.cond))
    got = np.asarray(int_net(m.params, b.x_T, t, **b.cond))
    flt = np.asarray(ref_net(model.params, b.x_T, t, **b.cond))
    # per layer int == fake to rounding (above); through 20-odd layers a code flipped at a
    # rounding boundary propagates, so the network outputs agree closely, not to rounding
    assert all(backend.choose_conv(l, backend.policy("integer")) == "int" for l in convs.values())
    assert np.abs(got - ref).mean() < 0.05 * np.abs(ref).mean()
    assert np.abs(ref - flt).mean() < 0.2 * np.abs(flt).mean()
