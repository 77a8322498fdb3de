"""jaxdq.quant.quantizer against an independent NumPy reference (float64 qparams).

The reference never calls the module.  Codes are compared exactly: the reference
rounds ``x / s`` in float32 with the float32 scale the module returns (whose
value is itself checked against the float64 reference to rtol 1e-6), because a
float64 quotient can fall on the other side of a .5 tie than the float32 one.
"""
import dataclasses

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from jaxdq.quant.quantizer import (
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quant,
    pack_int4,
    quantize,
    quantize_activation,
    quantize_weight,
    unpack_int4,
)

SETTINGS = settings(max_examples=30, deadline=None)
FLOOR = 1e-8

# ---------------------------------------------------------------- reference


def ref_qrange(bits, symmetric):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)


def ref_minmax(x, gran, g, kind):
    """Per-scale-group (min, max) of ``x`` in the documented scale shape."""
    if gran == "tensor":
        return x.min(), x.max()
    if gran == "channel":
        return x.min(axis=0, keepdims=True), x.max(axis=0, keepdims=True)
    if gran == "token":
        return x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    if kind == "weight":
        xg = x.reshape(x.shape[0] // g, g, x.shape[1])
        return xg.min(axis=1), xg.max(axis=1)
    xg = x.reshape(x.shape[:-1] + (x.shape[-1] // g, g))
    return xg.min(axis=-1), xg.max(axis=-1)


def ref_expand(p, gran, g, kind, shape):
    """Scale-shaped array → one value per element of an array of ``shape``."""
    p = np.asarray(p)
    if gran == "group":
        p = np.repeat(p, g, axis=0 if kind == "weight" else -1)
    return np.broadcast_to(p, shape)


def ref_scale64(x, bits, symmetric, gran, g, kind):
    """float64 min-max scale, documented shape."""
    lo, hi = ref_minmax(np.asarray(x, np.float64), gran, g, kind)
    _, qmax = ref_qrange(bits, symmetric)
    if symmetric:
        s = np.maximum(np.abs(lo), np.abs(hi)) / qmax
    else:
        s = (np.maximum(hi, 0.0) - np.minimum(lo, 0.0)) / qmax
    return np.maximum(s, FLOOR)


def ref_zero(x, s32, bits, gran, g, kind):
    """Asymmetric zero point from the module's float32 scale."""
    lo, _ = ref_minmax(np.asarray(x, np.float32), gran, g, kind)
    lo = np.minimum(lo, np.float32(0))
    return np.clip(np.rint(-lo / s32), 0, 2 ** bits - 1).astype(np.float32)


def ref_codes(x, s32, z32, bits, symmetric, gran, g, kind):
    """``clip(rint(x / s) + z)`` in float32 (ties to even, like jnp.round)."""
    x = np.asarray(x, np.float32)
    s = ref_expand(np.asarray(s32, np.float32), gran, g, kind, x.shape)
    q = np.rint(x / s)
    if z32 is not None:
        q = q + ref_expand(np.asarray(z32, np.float32), gran, g, kind, x.shape)
    qmin, qmax = ref_qrange(bits, symmetric)
    return np.clip(q, qmin, qmax).astype(np.int64)


def ref_dequant(q, s, z, gran, g, kind):
    s64 = ref_expand(np.asarray(s, np.float64), gran, g, kind, q.shape)
    z64 = 0.0 if z is None else ref_expand(np.asarray(z, np.float64), gran, g, kind, q.shape)
    return (q - z64) * s64


# ---------------------------------------------------------------- strategies

VALUE_RANGES = [(-1024.0, 1024.0), (-1.0, 1.0), (0.0, 8.0), (-4.0, 0.0), (-2.0 ** -10, 2.0 ** -10),
                (0.0, 0.0)]


# A few fixed shapes (every group size divides the grouped axis): eager JAX
# compiles each op once per shape, so shape variety is what costs test time.
WEIGHT_SHAPES = [(8, 3), (16, 5), (24, 1)]
ACT_SHAPES = [(8,), (3, 8), (2, 3, 16)]
ODD_SHAPES = {"weight": [(1, 6), (5, 2)], "activation": [(5,), (2, 7)]}


@st.composite
def cases(draw, range_="minmax"):
    """(x float32, spec, kind) with small shapes valid for the spec."""
    kind = draw(st.sampled_from(["weight", "activation"]))
    grans = ["tensor", "channel", "group"] if kind == "weight" else ["tensor", "token", "group"]
    gran = draw(st.sampled_from(grans))
    g = draw(st.sampled_from([1, 2, 4, 8])) if gran == "group" else None
    spec = QuantSpec(bits=draw(st.integers(2, 8)), symmetric=draw(st.booleans()),
                     granularity=gran, group_size=g, range=range_,
                     mse_grid=draw(st.sampled_from([1, 7, 80])) if range_ == "mse" else 80)
    shapes = WEIGHT_SHAPES if kind == "weight" else ACT_SHAPES
    shape = draw(st.sampled_from(shapes if g else shapes + ODD_SHAPES[kind]))
    lo, hi = draw(st.sampled_from(VALUE_RANGES))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(
        lo, hi, width=32, allow_subnormal=False)))
    return x, spec, kind


def scale_shape(spec, kind, shape):
    if spec.granularity == "tensor":
        return ()
    if spec.granularity == "channel":
        return (1, shape[1])
    if spec.granularity == "token":
        return shape[:-1] + (1,)
    if kind == "weight":
        return (shape[0] // spec.group_size, shape[1])
    return shape[:-1] + (shape[-1] // spec.group_size,)


def check_codes_and_roundtrip(x, spec, kind, s, z, q, *, all_in_range):
    """Codes exactly equal the reference from (s, z); |x - x̂| <= s/2 inside the grid."""
    g = spec.group_size
    gran = spec.granularity
    qmin, qmax = ref_qrange(spec.bits, spec.symmetric)
    q_mod = np.asarray(q)
    assert q_mod.dtype == (np.int8 if spec.symmetric else np.uint8)
    q = q_mod.astype(np.int64)
    np.testing.assert_array_equal(q, ref_codes(x, s, z, spec.bits, spec.symmetric, gran, g, kind))
    assert q.min() >= qmin and q.max() <= qmax

    xhat = np.asarray(dequantize(q_mod, s, z, spec, kind=kind))
    assert xhat.dtype == np.float32 and xhat.shape == x.shape
    ref_hat = ref_dequant(q, s, z, gran, g, kind)
    np.testing.assert_allclose(xhat, ref_hat, rtol=1e-6, atol=1e-30)

    s_el = ref_expand(np.asarray(s, np.float64), gran, g, kind, x.shape)
    z_el = 0.0 if z is None else ref_expand(np.asarray(z, np.float64), gran, g, kind, x.shape)
    x64 = x.astype(np.float64)
    if all_in_range:  # min-max: the clipping range holds every element
        inside = np.ones(x.shape, bool)
    else:
        # the zero point's rounding shifts the grid by up to s/2 against the clipping
        # range, so points up to s/2 beyond the grid's ends still round within s/2
        inside = ((x64 >= (qmin - z_el - 0.5) * s_el * (1 - 1e-6))
                  & (x64 <= (qmax - z_el + 0.5) * s_el * (1 - 1e-6)))
    err = np.abs(x64 - xhat)
    bound = s_el / 2 * (1 + 1e-5) + 1e-6 * np.abs(x64)
    assert (err[inside] <= bound[inside]).all()


# ---------------------------------------------------------------- min-max


@SETTINGS
@given(cases())
def test_minmax_matches_reference(case):
    x, spec, kind = case
    g, gran = spec.group_size, spec.granularity
    s, z = compute_qparams(jnp.asarray(x), spec, kind=kind)
    s = np.asarray(s)
    assert s.dtype == np.float32 and s.shape == scale_shape(spec, kind, x.shape)
    np.testing.assert_allclose(s, ref_scale64(x, spec.bits, spec.symmetric, gran, g, kind), rtol=1e-6)
    if spec.symmetric:
        assert z is None
    else:
        z = np.asarray(z)
        assert z.dtype == np.float32 and z.shape == s.shape
        np.testing.assert_array_equal(z, ref_zero(x, s, spec.bits, gran, g, kind))

    q = np.asarray(quantize(jnp.asarray(x), s, z, spec, kind=kind))
    check_codes_and_roundtrip(x, spec, kind, s, z, q, all_in_range=True)

    convenience = quantize_weight if kind == "weight" else quantize_activation
    q2, s2, z2 = convenience(jnp.asarray(x), spec)
    np.testing.assert_array_equal(np.asarray(q2), q)
    np.testing.assert_array_equal(np.asarray(s2), s)
    fq = np.asarray(fake_quant(jnp.asarray(x), spec, kind=kind))
    np.testing.assert_array_equal(fq, np.asarray(dequantize(q2, s2, z2, spec, kind=kind)))
    if not x.any():  # all-zero tensor: floored scale, exact zeros, no NaN
        np.testing.assert_array_equal(fq, 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kind,spec", [
    ("weight", QuantSpec(bits=4, granularity="group", group_size=4)),
    ("activation", QuantSpec(bits=8, symmetric=False, granularity="token")),
], ids=["w4-group", "a8-token-asym"])
def test_fake_quant_keeps_dtype(kind, spec, dtype):
    x = np.random.default_rng(5).normal(size=(8, 12)).astype(np.float32)
    out = fake_quant(jnp.asarray(x, dtype), spec, kind=kind)
    assert out.dtype == dtype and out.shape == x.shape
    ref = fake_quant(jnp.asarray(x, dtype).astype(jnp.float32), spec, kind=kind).astype(dtype)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


# ---------------------------------------------------------------- MSE range


def total_sq_err(x, spec, kind):
    return float(np.sum((np.asarray(fake_quant(jnp.asarray(x), spec, kind=kind), np.float64) - x) ** 2))


@SETTINGS
@given(cases(range_="mse"))
def test_mse_never_worse_than_minmax(case):
    x, spec, kind = case
    mm = dataclasses.replace(spec, range="minmax")
    e_mse, e_mm = total_sq_err(x, spec, kind), total_sq_err(x, mm, kind)
    assert e_mse <= e_mm * (1 + 1e-5) + 1e-12

    s, z = compute_qparams(jnp.asarray(x), spec, kind=kind)
    s = np.asarray(s)
    s_mm = np.asarray(compute_qparams(jnp.asarray(x), mm, kind=kind)[0])
    assert s.shape == s_mm.shape
    # the clipping ratio lies in [mse_min_ratio, 1] (up to the floor on scales)
    assert (s <= s_mm * (1 + 1e-6)).all()
    assert (s >= np.minimum(s_mm * spec.mse_min_ratio * (1 - 1e-5), FLOOR * 1.01)).all()
    q = np.asarray(quantize(jnp.asarray(x), s, None if z is None else np.asarray(z), spec, kind=kind))
    check_codes_and_roundtrip(x, spec, kind, s, None if z is None else np.asarray(z), q,
                              all_in_range=False)


@pytest.mark.parametrize("symmetric,kind,gran", [
    (True, "weight", "tensor"), (False, "weight", "channel"),
    (True, "activation", "token"), (False, "activation", "token")])
def test_mse_strictly_better_with_outlier(symmetric, kind, gran):
    x = np.random.default_rng(0).normal(size=(256, 32)).astype(np.float32)
    x[17, 5] = 25.0  # 25 sigma: clipping it is cheaper than the resolution it costs
    if gran == "token":
        x = x.T.copy()  # the outlier row is then a token with 256 channels
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=gran, range="mse")
    e_mse = total_sq_err(x, spec, kind)
    e_mm = total_sq_err(x, dataclasses.replace(spec, range="minmax"), kind)
    assert e_mse < 0.9 * e_mm


def test_mse_memory_is_linear_in_x():
    """[4096, 4096] per-channel MSE search compiles without a mse_grid-sized buffer."""
    spec = QuantSpec(bits=4, granularity="channel", range="mse")
    x = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    compiled = jax.jit(lambda w: compute_qparams(w, spec, kind="weight")).lower(x).compile()
    mem = compiled.memory_analysis()
    if mem is None:
        pytest.skip("backend reports no memory analysis")
    assert mem.temp_size_in_bytes < 4 * 4096 * 4096 * 4


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("kind,spec", [
    ("weight", QuantSpec(bits=4, symmetric=False, granularity="group", group_size=4, range="mse")),
    ("weight", QuantSpec(bits=3, granularity="channel")),
    ("activation", QuantSpec(bits=8, granularity="token", range="mse")),
    ("activation", QuantSpec(bits=2, symmetric=False, granularity="tensor")),
], ids=["w-group-asym-mse", "w-channel-sym", "a-token-sym-mse", "a-tensor-asym"])
def test_zero_tensor(kind, spec):
    x = jnp.zeros((8, 12), jnp.float32)
    s, z = compute_qparams(x, spec, kind=kind)
    assert np.isfinite(np.asarray(s)).all() and (np.asarray(s) > 0).all()
    q = quantize(x, s, z, spec, kind=kind)
    if z is not None:
        np.testing.assert_array_equal(np.asarray(z), 0)
    np.testing.assert_array_equal(np.asarray(q), 0)
    xhat = np.asarray(dequantize(q, s, z, spec, kind=kind))
    assert not np.isnan(xhat).any()
    np.testing.assert_array_equal(xhat, 0)
    np.testing.assert_array_equal(np.asarray(fake_quant(x, spec, kind=kind)), 0)


def test_zero_rows_among_nonzero():
    x = np.zeros((3, 5, 8), np.float32)
    x[1, 2] = np.linspace(-1, 2, 8)
    spec = QuantSpec(bits=8, symmetric=False, granularity="token")
    out = np.asarray(fake_quant(jnp.asarray(x), spec, kind="activation"))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], 0)
    np.testing.assert_allclose(out[1, 2], x[1, 2], atol=3 / 255 / 2 + 1e-6)


@pytest.mark.parametrize("kwargs", [
    dict(bits=1), dict(bits=9), dict(bits=4.0), dict(bits=True),
    dict(granularity="group"), dict(granularity="group", group_size=0),
    dict(granularity="channel", group_size=8), dict(granularity="row"),
    dict(range="quantile"), dict(mse_grid=0), dict(mse_min_ratio=0.0), dict(mse_min_ratio=1.5),
    dict(symmetric="yes"),
], ids=str)
def test_bad_specs_raise(kwargs):
    with pytest.raises(ValueError):
        QuantSpec(**kwargs)


def test_bad_kind_and_shapes_raise():
    w = jnp.ones((8, 4))
    with pytest.raises(ValueError, match="token"):
        compute_qparams(w, QuantSpec(granularity="token"), kind="weight")
    with pytest.raises(ValueError, match="channel"):
        compute_qparams(w, QuantSpec(granularity="channel"), kind="activation")
    with pytest.raises(ValueError, match="kind"):
        compute_qparams(w, QuantSpec(), kind="bias")
    with pytest.raises(ValueError, match="divisible"):
        compute_qparams(w, QuantSpec(granularity="group", group_size=3), kind="weight")
    with pytest.raises(ValueError, match="divisible"):
        quantize_activation(jnp.ones((2, 6)), QuantSpec(granularity="group", group_size=4))
    with pytest.raises(ValueError, match="2-D"):
        compute_qparams(jnp.ones((2, 8, 4)), QuantSpec(granularity="channel"), kind="weight")
    with pytest.raises(ValueError, match="zero point"):
        quantize(w, jnp.float32(1.0), None, QuantSpec(symmetric=False), kind="weight")


def test_spec_is_hashable_static_config():
    a, b = QuantSpec(bits=4, granularity="group", group_size=8), QuantSpec(bits=4, granularity="group",
                                                                          group_size=8)
    assert a == b and hash(a) == hash(b) and len({a, b, QuantSpec()}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.bits = 8
    f = jax.jit(fake_quant, static_argnames=("spec", "kind"))
    x = jnp.arange(32.0).reshape(8, 4)
    np.testing.assert_array_equal(np.asarray(f(x, a, kind="weight")),
                                  np.asarray(fake_quant(x, b, kind="weight")))


# ---------------------------------------------------------------- dynamic fake_quant


def test_dynamic_fake_quant_recomputes_scale():
    x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    spec = QuantSpec(bits=4, granularity="tensor")
    fq = jax.jit(lambda v: fake_quant(v, spec, kind="activation"))
    for fn in (lambda v: fake_quant(v, spec, kind="activation"), fq):
        a, b = np.asarray(fn(jnp.asarray(x))), np.asarray(fn(jnp.asarray(4 * x)))
        # a power-of-two rescale rescales the dynamic scale exactly
        np.testing.assert_array_equal(b, 4 * a)
    s1, _ = compute_qparams(jnp.asarray(x), spec, kind="activation")
    s2, _ = compute_qparams(jnp.asarray(4 * x), spec, kind="activation")
    assert float(s2) == 4 * float(s1)
    static = np.asarray(fake_quant(jnp.asarray(4 * x), spec, kind="activation", scale=s1))
    assert not np.array_equal(static, np.asarray(fq(jnp.asarray(4 * x))))  # static clips


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("range_", ["minmax", "mse"])
def test_dynamic_fake_quant_under_vmap(symmetric, range_):
    x = np.random.default_rng(2).normal(size=(5, 3, 16)).astype(np.float32)
    x *= np.arange(1, 6, dtype=np.float32)[:, None, None]
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity="tensor", range=range_, mse_grid=10)
    fn = lambda v: fake_quant(v, spec, kind="activation")  # noqa: E731
    batched = np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(x)))
    per_example = np.stack([np.asarray(fn(jnp.asarray(row))) for row in x])
    np.testing.assert_allclose(batched, per_example, rtol=1e-6, atol=1e-7)
    assert not np.allclose(batched, np.asarray(fn(jnp.asarray(x))))  # one scale per example


def test_group_activation_vmap_and_static_scale():
    x = np.random.default_rng(3).normal(size=(6, 16)).astype(np.float32)
    spec = QuantSpec(bits=8, granularity="group", group_size=4)
    s, _ = compute_qparams(jnp.asarray(x), spec, kind="activation")
    assert s.shape == (6, 4)
    dyn = fake_quant(jnp.asarray(x), spec, kind="activation")
    static = fake_quant(jnp.asarray(x), spec, kind="activation", scale=s)
    np.testing.assert_array_equal(np.asarray(dyn), np.asarray(static))
    rows = jax.vmap(lambda r: fake_quant(r, spec, kind="activation"))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(rows), np.asarray(dyn), rtol=1e-6)


# ---------------------------------------------------------------- int4 packing


@st.composite
def int4_codes(draw, signed):
    shape = draw(st.sampled_from([(2,), (3, 8), (2, 3, 6)]))
    lo, hi, dt = (-8, 7, np.int8) if signed else (0, 15, np.uint8)
    return draw(hnp.arrays(dt, shape, elements=st.integers(lo, hi)))


@SETTINGS
@given(st.booleans().flatmap(lambda sg: st.tuples(st.just(sg), int4_codes(sg))))
def test_pack_unpack_lossless(args):
    signed, codes = args
    packed = pack_int4(jnp.asarray(codes))
    assert packed.dtype == jnp.uint8 and packed.shape == codes.shape[:-1] + (codes.shape[-1] // 2,)
    ref = (codes[..., 0::2].astype(np.int64) & 0xF) | ((codes[..., 1::2].astype(np.int64) & 0xF) << 4)
    np.testing.assert_array_equal(np.asarray(packed), ref)
    out = unpack_int4(packed, signed=signed)
    assert out.dtype == (jnp.int8 if signed else jnp.uint8)
    np.testing.assert_array_equal(np.asarray(out), codes)
    jitted = jax.jit(unpack_int4, static_argnames="signed")(jax.jit(pack_int4)(codes), signed=signed)
    np.testing.assert_array_equal(np.asarray(jitted), codes)


def test_pack_layout_and_odd_axis():
    packed = np.asarray(pack_int4(jnp.asarray([[1, 2, -1, -8]], jnp.int8)))
    np.testing.assert_array_equal(packed, [[0x21, 0x8F]])
    with pytest.raises(ValueError, match="even"):
        pack_int4(jnp.zeros((4, 3), jnp.int8))


def test_packed_4bit_weight_roundtrip():
    w = np.random.default_rng(4).normal(size=(16, 10)).astype(np.float32)
    for sym in (True, False):
        spec = QuantSpec(bits=4, symmetric=sym, granularity="group", group_size=8)
        q, s, z = quantize_weight(jnp.asarray(w), spec)
        back = unpack_int4(pack_int4(q), signed=sym)
        np.testing.assert_array_equal(np.asarray(back), np.asarray(q))


# ---------------------------------------------------------------- percentile range


def ref_percentile_params(x, spec, kind):
    """float64 NumPy qparams of the percentile range (np.percentile, linear interpolation)."""
    x = np.asarray(x, np.float64)
    g, p = spec.group_size, spec.percentile
    if spec.granularity == "tensor":
        view, axes = x, tuple(range(x.ndim))
    elif spec.granularity == "channel":
        view, axes = x, (0,)
    elif spec.granularity == "token":
        view, axes = x, (x.ndim - 1,)
    elif kind == "weight":
        view, axes = x.reshape(x.shape[0] // g, g, x.shape[1]), (1,)
    else:
        view, axes = x.reshape(x.shape[:-1] + (x.shape[-1] // g, g)), (x.ndim,)
    keep = spec.granularity in ("channel", "token")
    qmin, qmax = ref_qrange(spec.bits, spec.symmetric)
    if spec.symmetric:
        amax = np.percentile(np.abs(view), p, axis=axes, keepdims=keep)
        return np.maximum(amax / qmax, FLOOR), None
    lo = np.minimum(np.percentile(view, 100 - p, axis=axes, keepdims=keep), 0.0)
    hi = np.maximum(np.percentile(view, p, axis=axes, keepdims=keep), 0.0)
    s = np.maximum((hi - lo) / qmax, FLOOR)
    return s, np.clip(np.round(-lo / s), qmin, qmax)


@pytest.mark.parametrize("kind,gran,g", [("weight", "tensor", None), ("weight", "channel", None),
                                         ("weight", "group", 8), ("activation", "tensor", None),
                                         ("activation", "token", None), ("activation", "group", 16)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("p", [99.0, 90.0, 100.0])
def test_percentile_range_equals_numpy(kind, gran, g, symmetric, p):
    rng = np.random.default_rng(int(p) + 7 * symmetric)
    shape = (64, 6) if kind == "weight" else (3, 5, 64)
    x = rng.standard_t(3, size=shape).astype(np.float32) + (0.5 if not symmetric else 0.0)
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=gran, group_size=g, range="percentile", percentile=p)
    s, z = compute_qparams(jnp.asarray(x), spec, kind=kind)
    s_ref, z_ref = ref_percentile_params(x, spec, kind)
    np.testing.assert_allclose(np.asarray(s), s_ref, rtol=1e-5)  # float32 interpolation
    if symmetric:
        assert z is None
    else:
        np.testing.assert_array_equal(np.asarray(z), z_ref)
    if p == 100.0:  # the 100th percentile is min-max
        mm = compute_qparams(jnp.asarray(x), dataclasses.replace(spec, range="minmax"), kind=kind)
        np.testing.assert_allclose(np.asarray(s), np.asarray(mm[0]), rtol=1e-6)
    else:  # a narrower range: values beyond it clamp to the end codes
        q = np.asarray(quantize(jnp.asarray(x), s, z, spec, kind=kind))
        qmin, qmax = ref_qrange(spec.bits, symmetric)
        assert q.min() >= qmin and q.max() <= qmax
        assert (q == qmax).mean() > 0


def test_percentile_clips_an_outlier_and_ignores_non_finite():
    x = np.linspace(-1.0, 1.0, 1001).astype(np.float32)
    x[500] = 1000.0
    spec = QuantSpec(bits=8, granularity="tensor", range="percentile", percentile=99.0)
    s, _ = compute_qparams(jnp.asarray(x), spec, kind="activation")
    assert float(s) == pytest.approx(np.percentile(np.abs(x.astype(np.float64)), 99.0) / 127, rel=1e-6)
    assert float(s) < 0.01  # min-max would give 1000 / 127
    y = x.copy()
    y[3] = np.nan
    y[4] = np.inf
    out = np.asarray(fake_quant(jnp.asarray(y), spec, kind="activation"))
    assert np.isnan(out[3]) and out[4] == np.inf and np.isfinite(np.delete(out, [3, 4])).all()


@pytest.mark.parametrize("bad", [50.0, 0.0, 100.5, True, "99"])
def test_percentile_validation(bad):
    with pytest.raises(ValueError, match="percentile"):
        QuantSpec(range="percentile", percentile=bad)
