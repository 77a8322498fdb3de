"""TFMQ-DM on the default UNet (issue 15): the temporal information block depends on t (and
the class) only, FSC's ranges are the per-timestep min-max of the exact activations, TIAR
lowers the temporal-feature error below BRECQ's, and a tfmq recipe survives an orbax
round trip."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.calibrate.blocks import calibration_set
from jaxdq.models.sources import load_model, save_model
from jaxdq.quant import reconstruct as R
from jaxdq.quant import tfmq
from jaxdq.quant.layers import QConv, QLinear, get_path, iter_layers
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.recipes import Context, ptq_cfg, rtn_params
from jaxdq.quant.timestep import at_timestep
from jaxdq.quantize import calibration, quantize_model
from jaxdq.sampling.families import Request


@pytest.fixture(scope="module")
def setup():
    model = load_model("default-unet")
    calib = calibration(model, ["tfmq-dm-w4a8"], request=Request(classes=(1, 4, 7), per_class=1, seed=11),
                        num_steps=5)
    data = calibration_set(calib, per_step=2, seed=0)
    net = model.family.eps_fn(model.config)
    return model, calib, data, net


def _captured(net, params, x, t, cond, paths, inputs=False):
    rec = {}

    def icpt(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        p = "/".join(ctx.module.path)
        if ctx.method_name == "__call__" and p in paths:
            rec[p] = args[0] if inputs else out
        return out

    with nn.intercept_methods(icpt):
        net(params, x, t, **cond)
    return rec


def test_the_temporal_information_block_has_zero_derivative_wrt_x_t(setup):
    model, _, data, net = setup
    tib = tfmq.tib_paths(model.roles)
    outs = tfmq.tib_outputs(model.roles)
    assert "time_embedding/linear_1" in tib and "time_embedding/linear_2" in tib
    assert outs and all(p.endswith("time_emb_proj") for p in outs) and set(outs) <= set(tib)
    call = data.take(np.arange(2))
    for params in (model.params, rtn_params(model.params, Context(roles=model.roles, calib=setup[1]),
                                            ptq_cfg(4, 8))):
        @jax.jit  # one compile, not one per op
        def feats(x):
            rec = _captured(net, params, x, call["t"], call["cond"], set(outs))
            return jnp.concatenate([rec[p].reshape(x.shape[0], -1) for p in outs], -1)

        f, vjp = jax.vjp(feats, call["x"])
        (g,) = vjp(jnp.ones_like(f))
        assert float(jnp.abs(f).max()) > 0 and float(jnp.abs(g).max()) == 0.0
        # the features at x_t = 0 (what TIAR trains on) are those at any x_t
        zero = jax.jit(tfmq.TemporalCapture(net, outs, data.x.shape[1:]))(params, call["t"], call["cond"])
        np.testing.assert_allclose(np.concatenate([zero[p] for p in outs], -1), np.asarray(f), rtol=1e-6,
                                   atol=1e-6)
    # a layer that does see x_t has a non-zero derivative (the check can fail)
    (g_x,) = jax.vjp(jax.jit(lambda x: _captured(net, model.params, x, call["t"], call["cond"],
                                                 {"down_blocks_0/resnets_0/conv1"})["down_blocks_0/resnets_0/conv1"]),
                     call["x"])[1](jnp.ones((2, 16, 16, 32)))
    assert float(jnp.abs(g_x).max()) > 0


def test_fsc_ranges_are_the_per_timestep_min_max(setup):
    model, _, data, net = setup
    ts = tfmq.temporal_set(data)
    tib = tfmq.tib_paths(model.roles)
    pairs = {(int(b),) + tuple(np.asarray(v[i]).tobytes() for v in data.cond.values())
             for i, b in enumerate(data.branch)}
    assert ts.size == len(data.timesteps) * len(pairs)  # every step × every distinct (branch, condition)
    assert set(ts.branch.tolist()) == {0, 1}  # the null-condition (CFG) calls kept apart
    ranges = tfmq.fsc_ranges(net, model.params, ts, tib)
    rng = np.random.default_rng(0)
    tib_inputs = jax.jit(lambda x, t, cond: _captured(net, model.params, x, t, cond, set(tib), inputs=True))
    for k, t in enumerate(data.timesteps):
        # every condition of the calibration at t, with a random x_t (the range does not see it)
        idx = np.nonzero(ts.step == k)[0]
        cond = {n: jnp.asarray(v[idx]) for n, v in ts.cond.items()}
        x = jnp.asarray(rng.normal(size=(len(idx),) + data.x.shape[1:]).astype(np.float32))
        rec = tib_inputs(x, jnp.full((len(idx),), t), cond)  # one compile: every step has the same pairs
        for p in tib:
            a = np.asarray(rec[p], np.float64)
            assert ranges[p][0][k] == pytest.approx(a.min(), rel=1e-5, abs=1e-6), (p, k)
            assert ranges[p][1][k] == pytest.approx(a.max(), rel=1e-5, abs=1e-6), (p, k)
    spec = QuantSpec(bits=8, symmetric=False, granularity="tensor")
    q = rtn_params(model.params, Context(roles=model.roles, calib=setup[1]), ptq_cfg(8, 8))
    q = tfmq.apply_fsc(q, ranges, ts.timesteps, spec)
    p = "time_embedding/linear_2"
    for k, t in enumerate(ts.timesteps):
        act = get_path(at_timestep(q, jnp.asarray(t)), p).act
        lo, hi = min(ranges[p][0][k], 0.0), max(ranges[p][1][k], 0.0)
        assert float(act.scale) == pytest.approx((hi - lo) / 255, rel=1e-5)
    assert get_path(q, "down_blocks_0/resnets_0/conv1").act.t is None  # FSC is for the TIB alone


def test_tiar_lowers_the_temporal_feature_error_below_brecq(setup):
    """W4 weights on the TIB: TIAR (its own objective Σ_i ‖emb − ê‖², all pairs) against
    BRECQ's treatment of the same layers (each resnet's block-output loss, the time
    embedding layer by layer), same iterations; both against round-to-nearest."""
    model, calib, data, net = setup
    roles, fp = model.roles, model.params
    q = rtn_params(fp, Context(roles=roles, calib=calib), ptq_cfg(4, 32))
    tib = set(tfmq.tib_paths(roles))
    cfg = R.ReconConfig(iters=40, lr=1e-2, steps_per_call=40, seed=0)
    tiar = R.with_weights(q, tfmq.reconstruct_temporal(net, fp, q, data, roles, cfg))
    brecq = R.with_weights(q, R.reconstruct_blocks(net, fp, q, data, cfg, select=lambda p: p in tib))
    ts = tfmq.temporal_set(data)
    outs = tfmq.tib_outputs(roles)
    err = {name: tfmq.temporal_error(net, fp, p, ts, outs) for name, p in (("rtn", q), ("tiar", tiar),
                                                                             ("brecq", brecq))}
    assert err["tiar"]["sq_sum"] < 0.8 * err["brecq"]["sq_sum"], {k: v["sq_sum"] for k, v in err.items()}
    assert err["tiar"]["sq_sum"] < 0.8 * err["rtn"]["sq_sum"]
    # the measurement itself, against NumPy on one timestep
    k = 2
    idx = np.nonzero(ts.step == k)[0]
    t = jnp.asarray(ts.t[idx])
    cond = {n: jnp.asarray(v[idx]) for n, v in ts.cond.items()}
    x = jnp.zeros((len(idx),) + ts.x_shape)
    feats = jax.jit(lambda params: _captured(net, params, x, t, cond, set(outs)))  # the TIB alone: x is constant
    e, qq = feats(fp), feats(tiar)
    d = np.sqrt(sum(np.sum((np.asarray(e[p], np.float64) - np.asarray(qq[p])) ** 2, -1) for p in outs))
    assert err["tiar"]["l2"][k] == pytest.approx(d.mean(), rel=1e-4)


def test_tfmq_recipe_round_trips_through_the_checkpoint(setup, tmp_path):
    model, calib, _, _ = setup
    method = "tfmq-dm-w4a8@iters=4@per_step=1@steps_per_call=4"
    m = quantize_model(model, method, calib=calib, progress=False)
    rep = m.metadata["report"]
    assert {"tiar", "block_reconstruction", "fsc", "total"} <= set(rep["seconds"])
    splits = [p for p, l in iter_layers(m.params) if isinstance(l, QConv) and l.act.split is not None]
    assert splits and all(p.startswith("up_blocks") for p in splits)  # Q-Diffusion's shortcut splitting
    node = get_path(m.params, "time_embedding/linear_2")
    assert isinstance(node, QLinear) and node.act.t is not None and node.weight.spec.bits == 4
    back = load_model(save_model(str(tmp_path / "tfmq"), m))
    assert back.metadata["method"] == method
    for p in ("time_embedding/linear_2", "down_blocks_1/resnets_0/conv1", "up_blocks_0/resnets_0/conv1"):
        a, b = get_path(m.params, p), get_path(back.params, p)
        assert type(a) is type(b)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    run = model.family.sampler(model.config, num_steps=3)
    batch = model.family.batch(model.config, Request(classes=(2,), per_class=2, seed=1))
    a = np.asarray(run(m.params, batch.x_T, batch.cond, batch.uncond, jax.random.PRNGKey(0)))
    b = np.asarray(run(back.params, batch.x_T, batch.cond, batch.uncond, jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all()
