"""Streaming activation statistics equal the statistics of all activations kept in NumPy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.calibrate import collect_act_stats
from jaxdq.nn import Linear


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x, s):
        h = jnp.tanh(Linear(12, name="fc1")(x * s[:, None, None]))
        return Linear(5, name="fc2")(h)


def test_stats_match_numpy_over_steps():
    model = TwoLayer()
    rng = np.random.default_rng(0)
    steps, b, n, c = 6, 2, 3, 7
    xs = rng.normal(size=(steps, b, n, c)).astype(np.float32)
    ss = rng.uniform(0.5, 4.0, size=(steps, b)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(xs[0]), jnp.asarray(ss[0]))["params"]
    stats = collect_act_stats(model.apply, params, {"x": jnp.asarray(xs), "s": jnp.asarray(ss)})
    # reference: keep every activation, reduce at the end in float64
    acts1 = xs.astype(np.float64) * ss[..., None, None]
    w1, b1 = np.asarray(params["fc1"]["kernel"], np.float64), np.asarray(params["fc1"]["bias"], np.float64)
    acts2 = np.tanh(acts1 @ w1 + b1)
    for name, a in (("fc1", acts1), ("fc2", acts2)):
        st = stats[name]
        flat = a.reshape(-1, a.shape[-1])
        np.testing.assert_allclose(st["absmax"], np.abs(flat).max(0), rtol=1e-5)
        np.testing.assert_allclose(st["min"], flat.min(), rtol=1e-5)
        np.testing.assert_allclose(st["max"], flat.max(), rtol=1e-5)
        tok = np.abs(flat).max(-1)
        np.testing.assert_allclose(st["token_absmax_max"], tok.max(), rtol=1e-5)
        np.testing.assert_allclose(st["token_absmax_min"], tok.min(), rtol=1e-5)
        np.testing.assert_allclose(st["sq_sum"], (flat ** 2).sum(), rtol=1e-4)
        assert st["count"] == flat.size
        # momentum-averaged max: the per-step maxima, averaged with momentum 0.95 in step order
        per_step = np.abs(a.reshape(steps, -1, a.shape[-1])).max(1)
        ema = per_step[0]
        for row in per_step[1:]:
            ema = 0.95 * ema + 0.05 * row
        np.testing.assert_allclose(st["absmax_ema"], ema, rtol=1e-5)
        assert not np.allclose(st["absmax_ema"], st["absmax"], rtol=1e-3)  # not the plain max
        assert st["ema_calls"] == steps


class Twice(nn.Module):
    """One Linear called twice per apply: the running EMA covers both calls."""

    @nn.compact
    def __call__(self, x):
        lin = Linear(4, name="fc")
        return lin(2.0 * x) + lin(x)


def test_momentum_max_runs_over_calls_and_steps():
    from jaxdq.calibrate import collect_step_stats, pool_stats

    model = Twice()
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(3, 2, 5)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(xs[0]))["params"]
    per = collect_step_stats(model.apply, params, {"x": jnp.asarray(xs)})
    call1, call2 = np.abs(2.0 * xs).max(1), np.abs(xs).max(1)  # [S, C]: the two calls of each step
    within = 0.95 * call1 + 0.05 * call2
    np.testing.assert_allclose(per["fc"]["absmax_ema"], within, rtol=1e-5)
    np.testing.assert_array_equal(per["fc"]["ema_calls"], [2, 2, 2])
    # pooled over the steps in the order asked (order matters, unlike max)
    want = 0.95 * within[2] + 0.05 * within[0]
    np.testing.assert_allclose(pool_stats(per, steps=[2, 0])["fc"]["absmax_ema"], want, rtol=1e-5)
    # a calibration result: per step the max over the branches, then the EMA over steps
    both = {"t": np.arange(3), "cond": per, "uncond": jax.tree_util.tree_map(lambda a: 0.5 * a, per)}
    e = within[0]
    for r in within[1:]:
        e = 0.95 * e + 0.05 * r
    np.testing.assert_allclose(pool_stats(both)["fc"]["absmax_ema"], e, rtol=1e-5)
