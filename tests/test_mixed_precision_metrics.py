"""Metric-decoupled mixed precision ranks each group by its own metric of generated samples.

Each test measures, independently of jaxdq.quant.mixed_precision (the family's own sampler, the
classifier margins and frame consistencies computed here), every candidate layer's sensitivity by
the group's metric, by the sample MSE and by FD-digits (the spatial group's quality metric), picks
budgets at which ranking the group by its metric and ranking it by the MSE, or by the quality
metric, promote different layers, and checks that mixed_precision promotes exactly the layers the
paper's pairing selects.  Ranking the conditioning or temporal group by the MSE or by the quality
metric instead fails these tests.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.calibrate import pool_stats
from jaxdq.data import ink_crop
from jaxdq.metrics import frechet_distance, load_digits_classifier, temporal_consistency
from jaxdq.models.sources import load_model
from jaxdq.quant import mixed_precision as mp
from jaxdq.quant.layers import FloatLinear, Segmented, iter_layers, map_layers
from jaxdq.quant.quantizer import QuantSpec, fake_quant
from jaxdq.quant.recipes import dynamic_cfg, vidit_q_balance
from jaxdq.quant.rules import selected
from jaxdq.quant.recipes import _rules  # the recipes' own selection: first/last layers float
from jaxdq.quantize import calibration
from jaxdq.sampling.families import Request

CLASSIFIER = load_digits_classifier()


def _deq(kernel, bits):
    return fake_quant(jnp.asarray(kernel, jnp.float32), QuantSpec(bits=bits, granularity="channel"), kind="weight")


def _frames(x):
    """Samples → the classifier's 16×16 views ([N·F, 1, 16, 16]) and the frames per sample."""
    if x.ndim == 5:
        f = x.shape[2]
        x = x.transpose(0, 2, 1, 3, 4).reshape(-1, *x.shape[1:2], *x.shape[3:])
    else:
        f = 1
    return (x if x.shape[-1] == 16 else ink_crop(x)), f


def _margins(x, labels):
    imgs, f = _frames(x)
    lg = np.asarray(CLASSIFIER.logits(imgs), np.float64)
    y = np.repeat(labels, f)
    target = lg[np.arange(len(y)), y]
    lg[np.arange(len(y)), y] = -np.inf
    return target - lg.max(1)


def _consistency(x):
    imgs, f = _frames(x)
    feats = np.asarray(CLASSIFIER(imgs), np.float64).reshape(x.shape[0], f, -1)
    return np.array([temporal_consistency(feats[i:i + 1]) for i in range(x.shape[0])])


def _setup(name, role_pick, classes, calib_steps=3):
    """The float model, a small calibration and the recipe's channel balancing applied to the
    candidate layers (balancing is float-equivalent, so the other layers are left as they are)."""
    model = load_model(name)
    calib = calibration(model, ["vidit-q-w8a8"], request=Request(classes=classes[:2], per_class=1, seed=1234),
                        num_steps=calib_steps)
    sel = selected(_rules(dynamic_cfg(8, 8)), model.roles)
    bal = vidit_q_balance(model.params, pool_stats(calib), lambda p: sel(p) and role_pick(p, model.roles.get(p)))
    return model, calib, bal


def _independent(model, bal, paths, group_of, metric, *, classes, per_class, steps, seed):
    """Per-layer {metric, mse} and per-group MSE measured with the family's sampler."""
    fam, cfg = model.family, model.config
    batch = fam.batch(cfg, Request(classes=classes, per_class=per_class, seed=seed))
    run = fam.sampler(cfg, num_steps=steps)
    key = jax.random.PRNGKey(seed + 1)
    layers = dict(iter_layers(bal))
    high = {p: _deq(layers[p].kernel, 8) for p in paths}
    low = {p: _deq(layers[p].kernel, 4) for p in paths}

    def sample(low_set):
        tree = map_layers(bal, lambda p, l: l.replace(kernel=low[p] if p in low_set else high[p]) if p in high else l)
        return np.asarray(run(tree, batch.x_T, batch.cond, batch.uncond, key), np.float64)

    ref = sample(set())
    ref_f = np.asarray(CLASSIFIER(_frames(ref)[0]), np.float64)
    ref_m = _margins(ref, batch.labels)
    ref_tc = _consistency(ref) if ref.ndim == 5 else None
    sens = {}
    for p in paths:
        x = sample({p})
        s = {"mse": float(np.mean((x - ref) ** 2)),
             "quality": max(float(frechet_distance(np.asarray(CLASSIFIER(_frames(x)[0]), np.float64), ref_f)), 0.0)}
        if metric == "alignment":
            s["alignment"] = float(np.mean(np.maximum(ref_m - _margins(x, batch.labels), 0.0)))
        else:
            s["temporal"] = float(np.mean(np.abs(_consistency(x) - ref_tc)))
        sens[p] = s
    gmse = {}
    for g in set(group_of.values()):
        x = sample({p for p in paths if group_of[p] == g})
        gmse[g] = float(np.mean((x - ref) ** 2))
    return sens, gmse


def _check(name, role_pick, metric, group, *, classes, per_class, steps, seed=7):
    model, calib, bal = _setup(name, role_pick, classes)
    paths = [p for p, l in iter_layers(bal) if isinstance(l, FloatLinear) and role_pick(p, model.roles.get(p))]
    cond = mp.conditioning_in_adaln(model.roles)
    groups = {p: mp.group_of(model.roles[p], cond) for p in paths}
    assert group in groups.values()
    sens, gmse = _independent(model, bal, paths, groups, metric, classes=classes, per_class=per_class,
                              steps=steps, seed=seed)
    sizes = {p: int(np.prod(dict(iter_layers(bal))[p].kernel.shape)) for p in paths}
    pairing = {"conditioning": "alignment", "spatial": "quality", "temporal": "temporal"}  # the paper's
    own = {p: sens[p][metric if groups[p] == group else pairing[groups[p]]] for p in paths}
    # the mutations: the group ranked by the sample MSE, or by the spatial group's quality metric
    swapped = {m: {p: sens[p][m] if groups[p] == group else own[p] for p in paths} for m in ("mse", "quality")}
    grid = [float(b) for b in np.linspace(4.2, 7.8, 37)]
    alloc = lambda rank, b: mp.allocate(sizes, groups, gmse, rank, b)[0]  # noqa: E731
    tells = {m: [b for b in grid if alloc(own, b) != alloc(r, b)] for m, r in swapped.items()}
    for m, bs in tells.items():
        assert bs, f"{group}: ranking by {metric} and by {m} agree at every budget (vacuous test)"
    both = [b for b in tells["mse"] if b in tells["quality"]]
    budgets = both[:1] or [tells["mse"][0], tells["quality"][0]]  # one budget telling both apart, else two
    for budget in budgets:
        want = alloc(own, budget)
        q, rep = mp.mixed_precision(bal, calib, roles=model.roles, select=lambda p: p in sizes, model=model,
                                    layer_config=lambda b: dynamic_cfg(b, 8), budget_bits=budget, steps=steps,
                                    per_class=per_class, classes=classes, seed=seed, per_segment=False)
        got = rep["segments"][0]["sensitivity"]
        for p in paths:  # the recipe measured what this test measured
            np.testing.assert_allclose(got[p]["mse"], sens[p]["mse"], rtol=1e-3, atol=1e-9)
            np.testing.assert_allclose(got[p]["quality"], sens[p]["quality"], rtol=1e-3, atol=1e-6)
            np.testing.assert_allclose(got[p][metric], sens[p][metric], rtol=1e-3, atol=1e-7)
        assert rep["group_metric"][group] == metric
        assert set(rep["static"]["promoted"]) == want, (budget, sorted(want), rep["static"]["promoted"])
        bits = {p: l.weight.spec.bits for p, l in iter_layers(q) if p in sizes}
        assert {p for p, b in bits.items() if b == 8} == want
    return rep


def test_dit_conditioning_group_is_ranked_by_class_alignment():
    """Class-conditional DiT: adaLN and the time embedding carry the class → the conditioning group,
    ranked by the classifier's margin for the conditioning class."""
    pick = lambda p, r: r in ("adaLN", "time-embedding") or p in ("blocks_0/mlp/fc2", "blocks_5/attn/qkv")  # noqa: E731
    rep = _check("default", pick, "alignment", "conditioning", classes=tuple(range(10)), per_class=1, steps=4)
    assert rep["conditioning_in_adaln"] and rep["groups"]["blocks_2/adaLN_modulation"] == "conditioning"


def test_text_model_cross_attention_is_ranked_by_prompt_alignment():
    pick = lambda p, r: (r or "").startswith("cross-attn") or p == "blocks_0/ff/fc1"  # noqa: E731
    rep = _check("default-text", pick, "alignment", "conditioning", classes=tuple(range(10)), per_class=1, steps=4)
    assert not rep["conditioning_in_adaln"]


def test_video_temporal_attention_is_ranked_by_temporal_consistency():
    pick = lambda p, r: r == "temporal-attn" or p == "blocks_0/ff/fc2"  # noqa: E731
    rep = _check("default-video", pick, "temporal", "temporal", classes=(3, 7), per_class=1, steps=4)
    assert rep["metric_kinds"]["temporal"] == "frame-feature consistency change"


def test_candidate_sampler_swaps_only_inside_its_segment():
    """The low-bit kernel applied in segment k only equals the family sampler on a Segmented layer
    whose segment-k variant is the low-bit one; other segments and all steps differ."""
    model = load_model("default")
    fam, cfg = model.family, model.config
    batch = fam.batch(cfg, Request(classes=(1, 4), per_class=1, seed=3))
    path = "blocks_1/mlp/fc1"
    layer = dict(iter_layers(model.params))[path]
    lo = layer.replace(kernel=_deq(layer.kernel, 2))
    bounds = (750, 500, 250)
    run = mp.candidate_sampler(fam, cfg, bounds, steps=8)
    key = jax.random.PRNGKey(4)
    outs = {}
    for seg in (-1, 0, 2):
        outs[seg] = np.asarray(run(model.params, {path: lo.kernel}, {path: jnp.asarray(True)}, jnp.int32(seg),
                                   batch.x_T, batch.cond, batch.uncond, key))
    plain = fam.sampler(cfg, num_steps=8)
    for seg in (0, 2):
        index = tuple(int(k == seg) for k in range(4))
        tree = map_layers(model.params, lambda p, l: Segmented(variants=(l, lo), index=index, bounds=bounds)
                          if p == path else l)
        np.testing.assert_allclose(outs[seg], np.asarray(plain(tree, batch.x_T, batch.cond, batch.uncond, key)),
                                   atol=1e-5)
    allsteps = map_layers(model.params, lambda p, l: lo if p == path else l)
    np.testing.assert_allclose(outs[-1], np.asarray(plain(allsteps, batch.x_T, batch.cond, batch.uncond, key)),
                               atol=1e-5)
    assert not np.allclose(outs[0], outs[2], atol=1e-4)


def test_scorer_metrics_on_known_perturbations():
    """The scorer's quality is FD-digits against the reference samples, alignment a margin loss
    (0 for an unchanged sample), temporal 0 for images."""
    from jaxdq.metrics.features import load_digits_16

    imgs, labels = load_digits_16()
    ref = imgs[:12]
    s = mp.SampleScorer(ref, labels[:12], CLASSIFIER)
    same = s(ref)
    assert same["mse"] == 0 and same["alignment"] == 0 and same["quality"] < 1e-6 and same["temporal"] == 0
    other = s(imgs[12:24])
    assert other["quality"] == pytest.approx(frechet_distance(CLASSIFIER(imgs[12:24]), CLASSIFIER(ref)), rel=1e-6)
    assert other["alignment"] > 0
