"""jaxdq.quant.twinlog against an independent float64 NumPy reference of LRQ-DiT's eq. 7.

The reference never calls the module's encode/decode.  Codes are compared exactly
except where the float64 log-domain value lies within 1e-4 of a rounding tie
(or of the zero-underflow threshold), where float32 and float64 may differ.
"""
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from jaxdq.quant import twinlog as tl
from jaxdq.quant.quantizer import QuantSpec, pack_int4, quantize_activation

SETTINGS = settings(max_examples=8, deadline=None)
SMALL = dict(alpha_grid=6, step_grid=8)   # keeps the searches fast on CPU

# ---------------------------------------------------------------- reference


def ref_encode(w, sp, zp, sn, zn, bits, underflow):
    """float64 codes and the mask of entries too close to a tie to compare exactly."""
    w = np.asarray(w, np.float64)
    codes = np.zeros(w.shape, np.int64)
    ambiguous = np.zeros(w.shape, bool)
    for sign, s, z, levels in ((1, sp, zp, 2 ** (bits - 1) - 1), (-1, sn, zn, 2 ** (bits - 1))):
        s, z = np.asarray(s, np.float64), np.asarray(z, np.float64)
        a = np.where(sign * w > 0, np.abs(w), 0.0)
        t = np.log2(np.where(a > 0, a, 1.0)) / s - z
        q = np.clip(np.round(t), 0, levels - 1)
        keep = a > 0
        thr = 0.5 * 2.0 ** (s * z)
        if underflow:
            keep &= a >= thr
            ambiguous |= (a > 0) & (np.abs(a / thr - 1) < 1e-5)
        ambiguous |= keep & (np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-4)
        codes += np.where(keep, sign * (q + 1), 0).astype(np.int64)
    return codes, ambiguous


def ref_eq7(codes, sp, zp, sn, zn):
    """W_f = 2^{s⁺(q⁺+z⁺)} M⁺ − 2^{s⁻(q⁻+z⁻)} M⁻ in float64, masks and q from the codes."""
    c = np.asarray(codes, np.float64)
    sp, zp, sn, zn = (np.asarray(v, np.float64) for v in (sp, zp, sn, zn))
    m_pos, m_neg = c > 0, c < 0
    q_pos, q_neg = c - 1, -c - 1
    return 2.0 ** (sp * (q_pos + zp)) * m_pos - 2.0 ** (sn * (q_neg + zn)) * m_neg


def col_err(a, b):
    return np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=0)


def weights(seed, shape=(96, 16), tail="normal"):   # one shape: the jit cache is shared
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) if tail == "normal" else rng.standard_t(3, size=shape)
    return (0.05 * w).astype(np.float32)


# ---------------------------------------------------------------- eq. 7 and the code format


@pytest.mark.parametrize("bits, underflow, search", [(3, True, True), (4, False, True), (2, True, False),
                                                     (8, True, True)])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2 ** 16))
def test_matches_float64_reference(bits, underflow, search, seed):
    w = weights(seed, tail="t" if seed % 2 else "normal")
    spec = tl.TwinLogSpec(bits=bits, search=search, zero_underflow=underflow, **SMALL)
    tw = tl.quantize_twinlog(w, spec)
    codes, amb = ref_encode(w, *tw.params, bits, underflow)
    got = np.asarray(tw.codes, np.int64)
    assert amb.mean() < 0.01
    np.testing.assert_array_equal(got[~amb], codes[~amb])
    np.testing.assert_allclose(np.asarray(tl.decode(tw)), ref_eq7(got, *tw.params), rtol=2e-6, atol=0)


@pytest.mark.parametrize("bits", [3, 4])
def test_code_range_and_levels(bits):
    spec = tl.TwinLogSpec(bits=bits, **SMALL)
    tw = tl.quantize_twinlog(weights(1), spec)
    c = np.asarray(tw.codes)
    assert tw.codes.dtype == jnp.int8 and tw.s_pos.shape == (1, 16) and tw.z_neg.dtype == jnp.float32
    assert c.min() >= -(2 ** (bits - 1)) and c.max() <= 2 ** (bits - 1) - 1
    # all 2^b codes are in use on a Gaussian weight: 0, L⁺ = 2^{b-1}-1 positive, L⁻ = 2^{b-1} negative
    assert set(np.unique(c)) == set(range(-(2 ** (bits - 1)), 2 ** (bits - 1)))
    levels = tl.level_sets(tw, 0, bits)
    assert len(levels) == 2 ** bits and levels[2 ** (bits - 1)] == 0.0
    got = np.unique(np.asarray(tl.decode(tw))[:, 0])
    assert np.all(np.min(np.abs(got[:, None] - levels[None]), axis=1) <= 1e-6 * np.abs(got))


@pytest.mark.parametrize("underflow", [True, False])
def test_zeros(underflow):
    w = weights(2)
    w[:, 0] = 0.0           # a zero-initialized column (DiT's adaLN / final layer)
    w[:, 1] = np.abs(w[:, 1])  # a column without negative entries
    w[5, 2] = w[9, 3] = 0.0
    spec = tl.TwinLogSpec(bits=3, zero_underflow=underflow, **SMALL)
    tw = tl.quantize_twinlog(w, spec)
    wf = np.asarray(tl.decode(tw))
    assert np.all(np.isfinite(wf)) and all(np.all(np.isfinite(np.asarray(p))) for p in tw.params)
    assert np.all(np.asarray(tw.codes)[:, 0] == 0) and np.all(wf[:, 0] == 0)
    assert wf[5, 2] == 0 and wf[9, 3] == 0
    assert np.all(wf[:, 1] >= 0)
    nz = wf != 0
    assert np.all(np.sign(wf[nz]) == np.sign(w[nz]))   # a nonzero reconstruction keeps the sign
    if not underflow:
        np.testing.assert_array_equal(nz, w != 0)       # literal masks M± = [W ≷ 0]
    np.testing.assert_array_equal(tl.decode(tl.quantize_twinlog(np.zeros_like(w), spec)), 0)


# ---------------------------------------------------------------- packing


@SETTINGS
@given(seed=st.integers(0, 2 ** 16), bits=st.integers(2, 8))
def test_pack_round_trip(seed, bits):
    rows, n = 3, 16
    rng = np.random.default_rng(seed)
    codes = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(rows, n)).astype(np.int8)
    packed = tl.pack_codes(codes, bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (rows, n * bits // 8)
    np.testing.assert_array_equal(tl.unpack_codes(packed, bits), codes)


def test_pack_layouts():
    codes = np.array([[1, 2, 3, -1, -2, -3, -4, 0]], np.int8)
    word = sum((int(c) & 7) << (3 * i) for i, c in enumerate(codes[0]))   # LSB-first bit stream
    np.testing.assert_array_equal(tl.pack_codes(codes, 3)[0], [word & 255, (word >> 8) & 255, word >> 16])
    c4 = np.random.default_rng(0).integers(-8, 8, size=(5, 12)).astype(np.int8)
    np.testing.assert_array_equal(tl.pack_codes(c4, 4), pack_int4(c4))   # 4 bit = the nibble layout
    with pytest.raises(ValueError):
        tl.pack_codes(np.zeros((2, 4), np.int8), 3)


# ---------------------------------------------------------------- clipping search


@pytest.mark.parametrize("bits", [3, 4])
def test_search_never_worse_than_no_clipping(bits):
    w = weights(3, tail="t")
    spec = tl.TwinLogSpec(bits=bits, **SMALL)
    err = col_err(tl.fake_quant_twinlog(w, spec), w)
    baselines = [tl.minmax_params(w, spec)]
    _, steps = spec.grid()
    baselines += [tl.clip_params(w, 1.0, 1.0, s, s, spec) for s in np.unique(np.asarray(steps))]
    for p in baselines:
        base = col_err(tl.decode(tl.TwinLogWeight(tl.encode(w, *p, spec), *p)), w)
        assert np.all(err <= base * (1 + 1e-5))   # float32 vs float64 sums


def test_search_improves_on_an_outlier():
    w = weights(4)
    w[7, :] = 0.4          # one positive outlier per column, 8σ
    w[9, :] = -0.2         # one negative outlier, 4σ
    spec = tl.TwinLogSpec(bits=3, **SMALL)
    tw = tl.quantize_twinlog(w, spec)
    err = col_err(tl.decode(tw), w)

    def unclipped(p):
        return col_err(tl.decode(tl.TwinLogWeight(tl.encode(w, *p, spec), *p)), w)

    _, steps = spec.grid()
    best_unclipped = np.min([unclipped(tl.clip_params(w, 1.0, 1.0, s, s, spec))
                             for s in np.unique(np.asarray(steps))], axis=0)
    assert err.sum() < 0.9 * best_unclipped.sum()                  # α < 1 pays off ...
    assert err.sum() < 0.1 * unclipped(tl.minmax_params(w, spec)).sum()
    top = 2.0 ** (np.asarray(tw.s_pos) * (spec.levels_pos - 1 + np.asarray(tw.z_pos)))
    assert np.any(top < 0.99 * 0.4)                                # ... because it clipped


def test_output_error_refinement():
    rng = np.random.default_rng(5)
    w = weights(5)
    x = (rng.standard_normal((48, 96)) * np.linspace(0.1, 5, 96)).astype(np.float32)
    spec = tl.TwinLogSpec(bits=3, **SMALL)
    p0 = tl.search_weight_error(w, spec)
    p1 = tl.refine_output_error(w, x, p0, spec, rounds=2)

    def out_err(p):
        wf = np.asarray(tl.decode(tl.TwinLogWeight(tl.encode(w, *p, spec), *p)), np.float64)
        return np.sum((x.astype(np.float64) @ (wf - w)) ** 2, axis=0)

    e0, e1 = out_err(p0), out_err(p1)
    assert np.all(e1 <= e0 * (1 + 1e-5)) and e1.sum() < e0.sum()


def test_jit():
    w = weights(6)
    spec = tl.TwinLogSpec(bits=3, **SMALL)
    eager = tl.quantize_twinlog(w, spec)
    jitted = jax.jit(tl.quantize_twinlog, static_argnames="spec")(jnp.asarray(w), spec)
    assert jax.tree_util.tree_structure(eager) == jax.tree_util.tree_structure(jitted)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- integer form


@pytest.mark.parametrize("frac_bits", [0, 2, 4, 8])
def test_int_form_weight_bound(frac_bits):
    tw = tl.quantize_twinlog(weights(7, tail="t"), tl.TwinLogSpec(bits=4, **SMALL))
    wf = ref_eq7(np.asarray(tw.codes), *tw.params)
    iw = tl.int_form(tw, frac_bits)
    approx = np.asarray(iw.w_int, np.float64) * 2.0 ** np.asarray(iw.shift, np.float64)
    nz = wf != 0
    np.testing.assert_array_equal(approx != 0, nz)
    np.testing.assert_array_equal(np.sign(approx), np.sign(wf))
    # |m 2^{f−I} − 2^{f+r}| ≤ 2^{−I−1−r} |w_f|, r = frac(e)
    e = np.log2(np.abs(wf[nz]))
    r = e - np.floor(e)
    ratio = np.abs(approx[nz] - wf[nz]) / (2.0 ** (-frac_bits - 1 - r) * np.abs(wf[nz]))
    assert ratio.max() <= 1 + 1e-4
    assert ratio.max() > 0.5   # the bound is tight, not vacuous


@pytest.mark.parametrize("frac_bits", [2, 5])
def test_int_matmul_matches_fake_quant_to_bound(frac_bits):
    rng = np.random.default_rng(8)
    tw = tl.quantize_twinlog(weights(8), tl.TwinLogSpec(bits=3, **SMALL))
    x = rng.standard_normal((2, 9, 96)).astype(np.float32) * 3
    xq, xs, _ = quantize_activation(x, QuantSpec(bits=8, granularity="token"))
    iw = tl.int_form(tw, frac_bits)
    assert tl.int_accumulation_exact(iw)
    y_int = np.asarray(tl.twinlog_int_matmul(xq, xs, iw), np.float64)
    x_hat = np.asarray(xq, np.float64) * np.asarray(xs, np.float64)
    wf = ref_eq7(np.asarray(tw.codes), *tw.params)
    y_fq = x_hat @ wf                                          # float64 fake-quant path
    scale = np.abs(x_hat) @ np.abs(wf)
    bound = 2.0 ** (-frac_bits - 1) * scale
    np.testing.assert_allclose(np.asarray(tl.int_error_bound(x_hat, wf, frac_bits)), bound, rtol=1e-6)
    assert np.all(np.abs(y_int - y_fq) <= bound + 1e-6 * scale)
