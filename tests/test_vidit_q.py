"""ViDiT-Q pieces and the baselines on the shipped default DiT: defining properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.calibrate import calibrate, load_stats, pool_stats, save_stats
from jaxdq.models.sources import load_model, save_model
from jaxdq.quant import mixed_precision as mp
from jaxdq.quant.hadamard import FullHadamard
from jaxdq.quant.layers import FloatLinear, QLinear, get_path, iter_layers
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.recipes import Context, get_recipe, vidit_q_balance
from jaxdq.quant.rules import LayerQuant, Rule, keep_float, quantize_linear, selected
from jaxdq.quant.timestep import Segmented, at_segment, at_timestep, segment_bounds, segment_of, timestep_aware
from jaxdq.quantize import quantize_model
from jaxdq.sampling.families import Request


@pytest.fixture(scope="module")
def model():
    return load_model("default")


@pytest.fixture(scope="module")
def calib(model):
    batch = model.family.batch(model.config, Request(classes=(1, 7), per_class=2, seed=1234))
    return calibrate(model, batch, num_steps=8, keep_inputs=True)


def _sampler(model, classes, per_class, seed, steps=8):
    b = model.family.batch(model.config, Request(classes=tuple(classes), per_class=per_class, seed=seed))
    run = model.family.sampler(model.config, num_steps=steps)
    return lambda params, key: run(params, b.x_T, b.cond, b.uncond, key)


def test_calibration_is_per_step_and_per_branch(model, calib, tmp_path):
    # replay one step of the cond branch by hand and compare its statistics
    st = calib["cond"]["blocks_2"]["mlp"]["fc1"]
    assert st["absmax"].shape == (8, model.config.hidden_size)
    x, y = calib["inputs"]["x"], calib["inputs"]["cond"]["y"]
    k = 5
    _, acts = model.module.apply({"params": model.params}, jnp.asarray(x[k]), jnp.full((4,), calib["t"][k]),
                                 jnp.asarray(y), mutable=["act_stats"])
    ref = acts["act_stats"]["blocks_2"]["mlp"]["fc1"]
    np.testing.assert_allclose(st["absmax"][k], ref["absmax"], rtol=1e-5)
    np.testing.assert_allclose(st["max"][k], ref["max"], rtol=1e-5)
    # the uncond branch sees the null class: different statistics
    un = calib["uncond"]["blocks_2"]["mlp"]["fc1"]
    assert not np.allclose(un["absmax"][k], st["absmax"][k])
    # pooling = max over steps and branches; save/load is lossless
    pooled = pool_stats(calib)["blocks_2"]["mlp"]["fc1"]
    np.testing.assert_array_equal(pooled["absmax"], np.maximum(st["absmax"].max(0), un["absmax"].max(0)))
    assert pooled["count"] == st["count"].sum() + un["count"].sum()
    path = save_stats(str(tmp_path / "calib"), calib)
    back = load_stats(path)
    np.testing.assert_array_equal(back["uncond"]["blocks_0"]["attn"]["qkv"]["sq_sum"],
                                  calib["uncond"]["blocks_0"]["attn"]["qkv"]["sq_sum"])
    np.testing.assert_array_equal(back["t"], calib["t"])


def test_channel_balancing_leaves_the_float_model_unchanged(model, calib):
    sel = selected([keep_float(), Rule(LayerQuant(weight=QuantSpec(bits=8, granularity="channel"),
                                                  act=QuantSpec(bits=8, granularity="token")))], model.roles)
    bal = vidit_q_balance(model.params, pool_stats(calib), sel)
    layer = get_path(bal, "blocks_3/mlp/fc2")
    assert isinstance(layer, FloatLinear) and layer.transform.smooth is not None
    assert layer.transform.rotation == FullHadamard(512)
    # the smoothing reads the momentum-averaged maximum with α = 0.3 (ViDiT-Q's released configs)
    st = pool_stats(calib)["blocks_3"]["mlp"]["fc2"]
    w = np.asarray(model.params["blocks_3"]["mlp"]["fc2"]["kernel"])
    want = np.maximum(st["absmax_ema"], 1e-5) ** 0.3 / np.maximum(np.abs(w).max(1), 1e-5) ** 0.7
    np.testing.assert_allclose(np.asarray(layer.transform.smooth), want, rtol=1e-4)
    assert isinstance(get_path(bal, "x_embedder/proj"), dict)  # first layer untouched
    b = model.family.batch(model.config, Request(classes=(0, 5), per_class=2, seed=3))
    x, y = b.x_T, b.cond["y"]
    t = jnp.asarray([900, 900, 10, 10])
    ref = model.module.apply({"params": model.params}, x, t, y)
    out = model.module.apply({"params": bal}, x, t, y)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-4)


def test_dynamic_activation_quant_recomputes_its_range_per_call():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
    cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=QuantSpec(bits=8, granularity="token"))
    q = quantize_linear(FloatLinear(kernel=w), cfg)
    a = jnp.asarray(rng.normal(size=(3, 32)), jnp.float32)
    # scaling the input by 100 scales the output by exactly 100: the range follows the tensor
    np.testing.assert_allclose(np.asarray(q(100.0 * a)), 100.0 * np.asarray(q(a)), rtol=1e-4, atol=1e-3)
    # a token's result does not depend on the other tokens in the call
    big = jnp.concatenate([a, 1e3 * jnp.asarray(rng.normal(size=(2, 32)), jnp.float32)])
    np.testing.assert_allclose(np.asarray(q(big)[:3]), np.asarray(q(a)), rtol=1e-6)
    # whereas a static range is fixed at calibration
    qs = quantize_linear(FloatLinear(kernel=w), LayerQuant(weight=cfg.weight, act=QuantSpec(bits=8, granularity="tensor"),
                                                   act_static=True), act_stats={"min": -1.0, "max": 1.0})
    assert not np.allclose(np.asarray(qs(100.0 * a)), 100.0 * np.asarray(qs(a)), rtol=1e-3)


def test_allocation_meets_the_bit_budget_exactly():
    rng = np.random.default_rng(1)
    paths = [f"l{i}" for i in range(12)]
    sizes = {p: int(rng.integers(100, 5000)) for p in paths}
    groups = {p: list(mp.GROUPS)[i % 3] for i, p in enumerate(paths)}
    gmse = {g: float(rng.random()) for g in mp.GROUPS}
    rank = {p: float(rng.random()) for p in paths}
    total = sum(sizes.values())
    for budget in (4.0, 5.0, 6.5, 8.0):
        chosen, acct = mp.allocate(sizes, groups, gmse, rank, budget)
        used = sum(8 * sizes[p] if p in chosen else 4 * sizes[p] for p in paths)
        assert used == acct["used"] <= budget * total
        # nothing left out would still fit
        assert all(used + 4 * sizes[p] > budget * total for p in paths if p not in chosen)
    assert mp.allocate(sizes, groups, gmse, rank, 8.0)[0] == set(paths)
    assert mp.allocate(sizes, groups, gmse, rank, 4.0)[0] == set()
    with pytest.raises(ValueError):
        mp.allocate(sizes, groups, gmse, rank, 3.0)


def test_allocation_shares_by_group_mse_and_ranks_inside_each_group():
    """Two groups of four equal layers; the budget buys four promotions: group a (MSE 3) gets three,
    b (MSE 1) one, each its own top-ranked; swapping the MSEs swaps the shares."""
    paths = [f"{g}{i}" for g in "ab" for i in range(4)]
    sizes = dict.fromkeys(paths, 100)
    groups = {p: p[0] for p in paths}
    rank = {"a0": 0.1, "a1": 0.9, "a2": 0.5, "a3": 0.7, "b0": 0.2, "b1": 0.1, "b2": 0.8, "b3": 0.3}
    chosen, acct = mp.allocate(sizes, groups, {"a": 3.0, "b": 1.0}, rank, 6.0)
    assert chosen == {"a1", "a3", "a2", "b2"}
    assert acct["groups"]["a"]["share"] == pytest.approx(3 * acct["groups"]["b"]["share"])
    chosen, _ = mp.allocate(sizes, groups, {"a": 1.0, "b": 3.0}, rank, 6.0)
    assert chosen == {"a1", "b2", "b3", "b0"}


def test_groups_follow_the_conditioning_path():
    dit = {"blocks_0/adaLN_modulation": "adaLN", "blocks_0/attn/qkv": "self-attn", "t/linear_1": "time-embedding"}
    assert mp.conditioning_in_adaln(dit)
    assert [mp.group_of(r, True) for r in dit.values()] == ["conditioning", "spatial", "conditioning"]
    pixart = dict(dit, **{"blocks_0/attn2/kv": "cross-attn:kv", "tb/attn1/qkv": "temporal-attn"})
    assert not mp.conditioning_in_adaln(pixart)
    assert [mp.group_of(r, False) for r in pixart.values()] == ["spatial", "spatial", "spatial", "conditioning",
                                                                 "temporal"]


def test_segments_switch_inside_jit():
    bounds = segment_bounds([999, 800, 600, 400, 200, 0], 3)
    assert [int(segment_of(t, bounds)) for t in (999, 800, 600, 400, 200, 0)] == [0, 0, 1, 1, 2, 2]
    w = jnp.eye(4)
    lo = FloatLinear(kernel=w)
    hi = FloatLinear(kernel=2 * w)
    params = {"l": Segmented(variants=(lo, hi), index=(0, 1, 0), bounds=bounds)}
    assert at_segment(params, 1)["l"]["kernel"] is hi.kernel
    f = jax.jit(timestep_aware(lambda p, x, t: x @ p["l"]["kernel"], params))
    x = jnp.ones((2, 4))
    for t, scale in ((999, 1.0), (400, 2.0), (0, 1.0)):
        np.testing.assert_allclose(np.asarray(f(x, jnp.full((2,), t))), scale * np.ones((2, 4)))


def test_per_step_static_uses_each_timesteps_own_range(model, calib):
    q, _ = get_recipe("per-step-static-w8a8").build(model.params, Context(roles=model.roles, calib=calib))
    node: QLinear = get_path(q, "blocks_1/attn/qkv")
    assert node.act.scale.shape == (8,) and node.act.t.shape == (8,)
    k = 3
    st = pool_stats(calib, steps=[k])["blocks_1"]["attn"]["qkv"]
    expect = (max(st["max"], 0) - min(st["min"], 0)) / 255
    resolved = at_timestep(q, jnp.asarray(calib["t"][k]))
    np.testing.assert_allclose(float(get_path(resolved, "blocks_1/attn/qkv").act.scale), expect, rtol=1e-5)
    with pytest.raises(ValueError, match="at_timestep"):
        node(jnp.ones((2, node.in_features)))


def test_mixed_precision_model_samples_under_jit_and_respects_budget(model, calib):
    m = quantize_model(model, "vidit-q-mp", calib=calib, progress=False, budget_bits=5.0, steps=4, per_class=1,
                       classes=(2, 5))
    segs = m.metadata["report"]["segments"]
    assert len(segs) == 4 and all(s["avg_bits"] <= 5.0 for s in segs)
    assert any(isinstance(l, Segmented) for _, l in iter_layers(m.params))
    run = _sampler(model, [2, 3], 1, 0)
    out = np.asarray(run(m.params, jax.random.PRNGKey(1)))
    ref = np.asarray(run(model.params, jax.random.PRNGKey(1)))
    assert np.isfinite(out).all() and 0 < np.abs(out - ref).mean() < 0.5


def test_mixed_precision_and_per_timestep_checkpoints_round_trip(model, calib, tmp_path):
    run = _sampler(model, [4], 2, 0)
    for method, kw in (("vidit-q-mp", dict(budget_bits=5.0, steps=4, per_class=1, classes=(2, 5))),
                       ("per-step-static-w8a8", {})):
        m = quantize_model(model, method, calib=calib, progress=False, **kw)
        path = save_model(str(tmp_path / method), m)
        back = load_model(path)
        assert back.metadata["method"] == method
        a = np.asarray(run(m.params, jax.random.PRNGKey(0)))
        b = np.asarray(run(back.params, jax.random.PRNGKey(0)))
        np.testing.assert_array_equal(a, b)


def test_static_mixed_precision_has_one_width_per_layer_within_budget(model, calib):
    m = quantize_model(model, "vidit-q-mp-static", calib=calib, progress=False, budget_bits=5.0,
                       steps=4, per_class=1, classes=(2, 5))
    assert not any(isinstance(l, Segmented) for _, l in iter_layers(m.params))
    rep = m.metadata["report"]["static"]
    sizes = {p: l.in_features * l.out_features for p, l in iter_layers(m.params) if isinstance(l, QLinear)}
    bits = {p: get_path(m.params, p).weight.spec.bits for p in sizes}
    avg = sum(bits[p] * sizes[p] for p in sizes) / sum(sizes.values())
    assert avg == pytest.approx(rep["avg_bits"]) and avg <= 5.0 and set(bits.values()) == {4, 8}
    assert sorted(p for p in sizes if bits[p] == 8) == rep["promoted"]
