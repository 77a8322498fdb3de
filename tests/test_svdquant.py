"""Defining properties of SVDQuant: exact SVD split, low-rank branch vs outliers, rank 0,
refinement, α search, and the recipe on the default DiT."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.calibrate import pool_stats
from jaxdq.nn import linear
from jaxdq.quant.layers import FloatLinear, QLinear, get_path, iter_layers, weight_bytes
from jaxdq.quant.lowrank import svd_split, weight_error
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import quantize_linear, quantize_params
from jaxdq.quant.smooth import smoothing_factors
from jaxdq.quant.svdquant import (output_error, search_alpha, svdquant, svdquant_config, svdquant_layer,
                                  svdquant_rules)
from jaxdq.quant.transforms import lowrank_layer, smooth_layer

W4A4 = svdquant_config(4, 4, 64)


def _outlier_layer(seed, cin=256, cout=256, n=256):
    """Gaussian layer with 4 large weight rows and 4 activation outlier channels (x30)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(cin, cout)) * 0.05
    w[rng.choice(cin, 4, replace=False)] *= 10.0
    x = rng.normal(size=(n, cin))
    x[:, rng.choice(cin, 4, replace=False)] *= 30.0
    layer = FloatLinear(kernel=jnp.asarray(w, jnp.float32), bias=jnp.asarray(rng.normal(size=cout) * 0.1, jnp.float32))
    return layer, x.astype(np.float32)


@pytest.mark.parametrize("rank", [0, 1, 7, 32, 48])
def test_split_is_exact_without_quantization(rank):
    w = np.random.default_rng(rank).normal(size=(64, 48)).astype(np.float32)
    l1, l2, r = svd_split(w, rank)
    assert l1.shape == (64, rank) and l2.shape == (rank, 48) and r.shape == (64, 48)
    recon = np.asarray(l1, np.float64) @ np.asarray(l2, np.float64) + np.asarray(r, np.float64)
    np.testing.assert_allclose(recon, w, atol=2e-6)
    # L1 L2 is the best rank-r approximation (float64 reference), so R holds the tail
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(np.asarray(l1, np.float64) @ np.asarray(l2), (u[:, :rank] * s[:rank]) @ vt[:rank],
                               atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(r, np.float64)), np.sqrt(np.sum(s[rank:] ** 2)),
                               rtol=1e-5, atol=1e-5)
    # with 16-bit factors the identity still holds for the stored factors
    l1h, l2h, rh = svd_split(w, rank, factor_dtype=jnp.float16)
    np.testing.assert_array_equal(np.asarray(l1h), np.asarray(l1h.astype(jnp.float16), np.float32))
    recon = np.asarray(l1h, np.float64) @ np.asarray(l2h, np.float64) + np.asarray(rh, np.float64)
    np.testing.assert_allclose(recon, w, atol=2e-6)
    # the float layer's output is unchanged
    x = np.random.default_rng(9).normal(size=(5, 64)).astype(np.float32)
    layer = lowrank_layer(FloatLinear(kernel=jnp.asarray(w)), rank)
    assert layer.transform.rank == rank
    np.testing.assert_allclose(np.asarray(linear(layer, jnp.asarray(x))), x.astype(np.float64) @ w, atol=1e-4)


def _np_sym_group_fq(a, bits, group, axis):
    """float64 reference: symmetric per-group fake quantization along ``axis`` (max|.|/qmax)."""
    a = np.moveaxis(np.asarray(a, np.float64), axis, -1)
    g = a.reshape(a.shape[:-1] + (a.shape[-1] // group, group))
    qmax = 2 ** (bits - 1) - 1
    s = np.maximum(np.abs(g).max(-1, keepdims=True) / qmax, 1e-8)
    out = (np.clip(np.round(g / s), -qmax - 1, qmax) * s).reshape(a.shape)
    return np.moveaxis(out, -1, axis)


def test_svdquant_layer_forward_matches_numpy_reference():
    layer, x = _outlier_layer(0, cin=128, cout=64, n=16)
    am = np.abs(x).max(0)
    q = svdquant_layer(layer, W4A4, act_absmax=am, alpha=0.6, rank=8)
    t = q.transform
    assert q.weight.packed and q.weight.codes.shape == (128, 32) and q.weight.scale.shape == (2, 64)
    assert t.lowrank_a.dtype == jnp.float16 and t.lowrank_a.shape == (128, 8) and t.lowrank_b.shape == (8, 64)
    assert t.rotation is None
    w = np.asarray(layer.kernel, np.float64)
    lam = am.astype(np.float64) ** 0.6 / np.abs(w).max(1) ** 0.4
    np.testing.assert_allclose(np.asarray(t.smooth), lam, rtol=1e-5)
    xh = x.astype(np.float64) / np.asarray(t.smooth, np.float64)
    l1, l2 = np.asarray(t.lowrank_a, np.float64), np.asarray(t.lowrank_b, np.float64)
    res = np.asarray(t.smooth, np.float64)[:, None] * w - l1 @ l2
    ref = (_np_sym_group_fq(xh, 4, 64, axis=1) @ _np_sym_group_fq(res, 4, 64, axis=0)
           + xh @ l1 @ l2 + np.asarray(layer.bias, np.float64))
    np.testing.assert_allclose(np.asarray(q(jnp.asarray(x)), np.float64), ref, rtol=1e-3, atol=2e-3)


def test_float16_weight_scales_are_exact_for_their_codes():
    layer, x = _outlier_layer(7, cin=128, cout=64, n=16)
    am = np.abs(x).max(0)
    q32 = svdquant_layer(layer, W4A4, act_absmax=am, alpha=0.5, rank=8)
    q16 = svdquant_layer(layer, W4A4, act_absmax=am, alpha=0.5, rank=8, scale_dtype=jnp.float16)
    assert q16.weight.scale.dtype == jnp.float16 and q16.weight.scale.shape == q32.weight.scale.shape
    # codes are round(R / s16) clipped to [-8, 7], R = Ŵ − L1 L2 (float64 reference)
    t = q16.transform
    res = (np.asarray(t.smooth, np.float64)[:, None] * np.asarray(layer.kernel, np.float64)
           - np.asarray(t.lowrank_a, np.float64) @ np.asarray(t.lowrank_b, np.float64))
    s16 = np.repeat(np.asarray(q16.weight.scale, np.float64), 64, axis=0)
    np.testing.assert_array_equal(np.asarray(q16.weight.unpacked()), np.clip(np.round(res / s16), -8, 7))
    y16, y32 = np.asarray(q16(jnp.asarray(x))), np.asarray(q32(jnp.asarray(x)))
    assert np.linalg.norm(y16 - y32) <= 1e-2 * np.linalg.norm(y32)
    assert weight_bytes({"l": q16}) == weight_bytes({"l": q32}) - 2 * q32.weight.scale.size


def test_lowrank_branch_beats_w4a4_and_smoothing_on_outlier_layers():
    for seed in (0,):
        layer, x = _outlier_layer(seed)
        plain = output_error(layer, quantize_linear(layer, W4A4), x)
        smooth = search_alpha(layer, x, W4A4, rank=0)                 # smoothing + W4A4, best α
        svdq = search_alpha(layer, x, W4A4, rank=32, iters=1)        # smoothing + rank 32 + W4A4, best α
        svdq_05 = output_error(layer, svdquant_layer(layer, W4A4, act_absmax=np.abs(x).max(0), alpha=0.5,
                                                    rank=32, iters=1), x)
        print(f"seed {seed}: output SSE plain W4A4 {plain:.4g}, smoothing(α={smooth.alpha}) {smooth.error:.4g}, "
              f"SVDQuant(α={svdq.alpha}) {svdq.error:.4g}, SVDQuant(α=0.5) {svdq_05:.4g}")
        assert smooth.error < 0.5 * plain
        assert svdq.error <= 0.8 * smooth.error and svdq.error <= 0.8 * plain
        assert svdq_05 <= 0.8 * smooth.error  # also at a fixed α, against smoothing's best α


def test_rank_zero_is_smoothing_plus_w4a4():
    layer, x = _outlier_layer(3, cin=128, cout=64, n=32)
    am = np.abs(x).max(0)
    q0 = svdquant_layer(layer, W4A4, act_absmax=am, alpha=0.5, rank=0, iters=2)
    ref = quantize_linear(smooth_layer(layer, smoothing_factors(am, layer.kernel, 0.5)), W4A4)
    assert q0.transform.lowrank_a is None and q0.transform.lowrank_b is None
    np.testing.assert_array_equal(np.asarray(q0.weight.codes), np.asarray(ref.weight.codes))
    np.testing.assert_array_equal(np.asarray(q0.transform.smooth), np.asarray(ref.transform.smooth))
    np.testing.assert_array_equal(np.asarray(q0(jnp.asarray(x))), np.asarray(ref(jnp.asarray(x))))


def test_refinement_never_increases_weight_error():
    layer, x = _outlier_layer(4, cin=128, cout=128)
    w = smooth_layer(layer, smoothing_factors(np.abs(x).max(0), layer.kernel, 0.6)).kernel
    spec = W4A4.weight
    errs = [weight_error(w, svd_split(w, 16, quant_spec=spec, iters=k, factor_dtype=jnp.float16), spec)
            for k in range(5)]
    print("weight error ‖Ŵ − (L1L2 + Q(R))‖ by refinement rounds:", [f"{e:.5g}" for e in errs])
    assert all(b <= a for a, b in zip(errs, errs[1:]))
    assert errs[-1] < errs[0]


def test_search_alpha_returns_argmin_of_evaluated_errors():
    layer, x = _outlier_layer(5, cin=64, cout=64, n=64)
    alphas = (0.2, 0.4, 0.6, 0.8)
    res = search_alpha(layer, x, W4A4, alphas=alphas, rank=8, iters=1)
    am = np.abs(x).max(0)
    indep = [output_error(layer, svdquant_layer(layer, W4A4, act_absmax=am, alpha=a, rank=8, iters=1), x)
             for a in alphas]
    np.testing.assert_allclose(res.errors, indep, rtol=1e-9)
    assert res.alpha == alphas[int(np.argmin(indep))] and res.error == min(indep)
    assert len(set(np.round(indep, 6))) > 1  # the grid actually discriminates


def test_variant_specs_and_group_fallback():
    w8a8 = svdquant_config(8, 8, 64)
    assert w8a8.weight == QuantSpec(bits=8, granularity="channel") and w8a8.act == QuantSpec(bits=8, granularity="token")
    w4a8 = svdquant_config(4, 8, 64)
    assert w4a8.weight.granularity == "group" and w4a8.act.granularity == "token" and w4a8.pack
    fit = W4A4.fit(96, 64)
    assert fit.weight.granularity == "channel" and fit.act.granularity == "token"
    assert W4A4.fit(128, 64) == W4A4 and not W4A4.fit(128, 63).pack
    per_token = svdquant_config(4, 4, 64, act_group_size=None)
    assert per_token.act == QuantSpec(bits=4, granularity="token") and per_token.weight == W4A4.weight


def test_svdquant_rules_select_by_role():
    """The paper's precision defaults as role rules: 16-bit embeddings / final / time embedding /
    cross-attention K,V; W4A16 adaLN; the full treatment everywhere else."""
    from jaxdq.quant.rules import config_of

    rules = svdquant_rules()
    roles = {"e": "embedding", "f": "final", "t": "time-embedding", "kv": "cross-attn:kv", "q": "cross-attn",
             "ada": "adaLN", "qkv": "self-attn", "fc": "ffn", "tmp": "temporal-attn", "o": "other"}
    cfg = config_of(rules, roles)
    for path in ("e", "f", "t", "kv"):
        assert cfg(path) is None, path
    assert cfg("ada") == svdquant_config(4, None, 64) and cfg("ada").act is None and cfg("ada").pack
    for path in ("q", "qkv", "fc", "tmp", "o"):
        assert cfg(path) == W4A4, path
    assert config_of(svdquant_rules(weight_bits=8, act_bits=8), roles)("fc") == svdquant_config(8, 8, 64)


@pytest.fixture(scope="module")
def dit():
    from jaxdq.calibrate import collect_step_stats
    from jaxdq.models.default import load_default
    from jaxdq.models.dit import DiT, layer_roles

    cfg, params = load_default()
    module = DiT(cfg)
    rng = np.random.default_rng(0)
    s, b = 2, 4
    steps = {"x": jnp.asarray(rng.normal(size=(s, b, 1, 16, 16)), jnp.float32),
             "t": jnp.asarray(rng.integers(0, 1000, (s, b))), "y": jnp.asarray(rng.integers(0, 10, (s, b)))}
    per_step = collect_step_stats(module.apply, params, steps, samples=True)  # [S, ...] leaves + samples
    # what collect_act_stats returns (pool_stats of collect_step_stats), without stored tokens
    strip = lambda n: ({k: v for k, v in n.items() if k != "samples"} if "absmax" in n
                       else {k: strip(v) for k, v in n.items()})
    pooled = strip(pool_stats(per_step))
    return module, params, pooled, per_step, layer_roles(cfg)


def test_recipe_on_default_dit(dit):
    module, params, pooled, per_step, roles = dit
    # absmax-only stats (collect_act_stats): fixed α = 0.5 everywhere
    report = {}
    q = svdquant(params, pooled, roles=roles, rank=32, iters=1, report=report)
    assert report and all(v["alpha"] == 0.5 and "error" not in v for v in report.values())
    # per-step stats with stored tokens, as a calibrate() result, pooled: α searched per layer
    report_s = {}
    alphas = (0.4, 0.6, 0.8)
    q_s = svdquant(params, pool_stats({"t": np.arange(2), "cond": per_step}), roles=roles, rank=32, iters=1,
                   alphas=alphas, report=report_s)
    assert set(report_s) == set(report) and all(v["alpha"] in alphas and "error" in v
                                                for v in report_s.values())

    layers = dict(iter_layers(q))
    for path in ("x_embedder/proj", "final_layer/linear", "t_embedder/linear_1", "t_embedder/linear_2"):
        assert isinstance(layers[path], FloatLinear), path  # kept float
    ada = layers["blocks_2/adaLN_modulation"]
    assert isinstance(ada, QLinear)
    assert ada.act is None and ada.transform.lowrank_a is None and ada.weight.spec.bits == 4  # W4A16
    n_svdq = 0
    for path, ql in layers.items():
        if not isinstance(ql, QLinear) or ql.act is None:
            continue
        c_in, c_out = get_path(params, path)["kernel"].shape
        w, t = ql.weight, ql.transform
        assert w.packed and w.codes.dtype == jnp.uint8 and w.codes.shape == (c_in, c_out // 2)
        assert w.spec == QuantSpec(bits=4, granularity="group", group_size=64)
        assert ql.act.spec == QuantSpec(bits=4, granularity="group", group_size=64) and not ql.act.static
        assert t.lowrank_a.shape == (c_in, 32) and t.lowrank_b.shape == (32, c_out)
        assert t.lowrank_a.dtype == jnp.float16 and t.smooth.shape == (c_in,) and t.rotation is None
        n_svdq += 1
    assert n_svdq == 24  # 6 blocks × (qkv, proj, fc1, fc2)

    # same W4A4 config and rules, no smoothing / low-rank
    plain = quantize_params(params, svdquant_rules(), roles=roles)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 1, 16, 16)), jnp.float32)
    t, y = jnp.asarray([10, 300, 600, 900]), jnp.asarray([0, 3, 7, 10])
    run = lambda p: np.asarray(module.apply({"params": p}, x, t, y), np.float64)
    ref = run(params)
    rel = lambda p: float(np.sum((run(p) - ref) ** 2) / np.sum(ref ** 2))
    e_svdq, e_search, e_plain = rel(q), rel(q_s), rel(plain)
    fb, sb, pb = weight_bytes(params), weight_bytes(q), weight_bytes(plain)
    print(f"default DiT rel. output SSE: SVDQuant W4A4 α=0.5 {e_svdq:.4g}, α searched {e_search:.4g}, "
          f"plain W4A4 {e_plain:.4g}; linear weight bytes float32 {fb}, SVDQuant {sb}, plain W4A4 {pb}")
    assert e_svdq <= 0.5 * e_plain and e_search <= 0.5 * e_plain
    # bytes: the low-rank factors (float16) and smoothing vectors on top of the plain W4A4 storage
    lr = sum(2 * (l.transform.lowrank_a.size + l.transform.lowrank_b.size) + 4 * l.transform.smooth.size
             for _, l in iter_layers(q) if isinstance(l, QLinear) and l.transform.lowrank_a is not None)
    assert sb == pb + lr and sb < fb / 3


def test_checkpoint_roundtrip_keeps_lowrank_factors(tmp_path):
    from jaxdq import checkpoint

    layer, x = _outlier_layer(6, cin=128, cout=64, n=8)
    q = svdquant_layer(layer, W4A4, act_absmax=np.abs(x).max(0), alpha=0.5, rank=8, iters=1)
    checkpoint.save(str(tmp_path / "ck"), {"l": q}, metadata={"method": "svdquant"})
    q2 = checkpoint.load(str(tmp_path / "ck"))[0]["l"]
    assert isinstance(q2, QLinear)
    assert (q2.transform.lowrank_a.dtype == jnp.float16 and q2.weight.spec == q.weight.spec
            and q2.act.spec == q.act.spec and q2.weight.packed and q2.weight.layout == q.weight.layout)
    pieces = lambda l: {"codes": l.weight.codes, "scale": l.weight.scale, "smooth": l.transform.smooth,
                        "lowrank_a": l.transform.lowrank_a, "lowrank_b": l.transform.lowrank_b, "bias": l.bias}
    for f, a in pieces(q).items():
        b = pieces(q2)[f]
        assert b.dtype == a.dtype, f
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    np.testing.assert_array_equal(np.asarray(q2(jnp.asarray(x))), np.asarray(q(jnp.asarray(x))))
