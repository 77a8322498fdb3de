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
