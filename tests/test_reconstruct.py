"""AdaRound / BRECQ reconstruction (jaxdq.quant.reconstruct, issue 15) on a toy network whose
block output is recomputed in float64 NumPy: zero iterations are round-to-nearest exactly,
reconstruction lowers the block's output error below round-to-nearest by a stated margin,
it is deterministic from a seed, and the regulariser / schedule have the papers' numbers."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.calibrate.blocks import BlockCapture, CalibSet
from jaxdq.nn import Linear
from jaxdq.quant import reconstruct as R
from jaxdq.quant.layers import QLinear, QWeight, get_path
from jaxdq.quant.quantizer import QuantSpec

D, L, C, H = 48, 6, 16, 32
WSPEC = QuantSpec(bits=3, granularity="channel")


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Linear(C, role="ffn", name="fc2")(jnp.tanh(Linear(H, role="ffn", name="fc1")(x)))


class _Pair(nn.Module):
    """A block returning a tuple (as attention modules may): capture keeps the pytree."""

    @nn.compact
    def __call__(self, x):
        return Linear(C, name="a")(x), Linear(C, name="b")(x)


class _Toy(nn.Module):
    @nn.compact
    def __call__(self, x, t):
        h = x + _Block(name="blocks_0")(x)
        a, b = _Pair(name="blocks_1")(h)
        return a * b + t[:, None, None] * 0.0


def _setup():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(D, L, C)).astype(np.float32)
    params = _Toy().init(jax.random.PRNGKey(0), jnp.asarray(x[:1]), jnp.zeros((1,)))["params"]
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    net = lambda p, x, t: _Toy().apply({"params": p}, x, t)  # noqa: E731
    data = CalibSet(x=x, t=np.zeros((D,), np.int32), cond={}, branch=np.zeros((D,), np.int32),
                    step=np.zeros((D,), np.int32), timesteps=np.zeros((1,), np.int32))
    q = jax.tree_util.tree_map(lambda v: v, params)
    for blk, names in (("blocks_0", ("fc1", "fc2")), ("blocks_1", ("a", "b"))):
        for n in names:
            d = params[blk][n]
            q[blk][n] = QLinear(weight=QWeight.from_kernel(d["kernel"], WSPEC), act=None, bias=d["bias"])
    return net, params, q, data


def _np_block(x, w1, b1, w2, b2):
    x = np.asarray(x, np.float64)
    return np.tanh(x @ np.asarray(w1, np.float64) + b1) @ np.asarray(w2, np.float64) + b2


def _block_err(params, decided, x):
    """float64 mean over calls and positions of Σ_channels (f_q(x) − f(x))² of blocks_0."""
    p = params["blocks_0"]
    ref = _np_block(x, p["fc1"]["kernel"], p["fc1"]["bias"], p["fc2"]["kernel"], p["fc2"]["bias"])
    w1 = np.asarray(decided["blocks_0/fc1"].dequantize())
    w2 = np.asarray(decided["blocks_0/fc2"].dequantize())
    out = _np_block(x, w1, p["fc1"]["bias"], w2, p["fc2"]["bias"])
    return float(np.mean(np.sum((out - ref) ** 2, -1)))


def test_rectified_sigmoid_regulariser_and_schedule_have_the_papers_numbers():
    v = jnp.asarray([-20.0, -1.0, 0.0, 0.5, 20.0])
    s = 1 / (1 + np.exp(-np.asarray(v, np.float64)))
    h = np.clip(s * 1.2 - 0.1, 0, 1)
    np.testing.assert_allclose(np.asarray(R.rectified_sigmoid(v)), h, rtol=1e-6)
    np.testing.assert_allclose(float(R.rounding_regularizer(v, 3.0)), np.sum(1 - np.abs(2 * h - 1) ** 3), rtol=1e-5)
    cfg = R.ReconConfig(iters=100)
    assert float(R.beta_and_weight(0, cfg)[1]) == 0.0 and float(R.beta_and_weight(19, cfg)[1]) == 0.0
    beta, lam = R.beta_and_weight(20, cfg)
    assert float(lam) == pytest.approx(0.01) and float(beta) == pytest.approx(20.0)
    assert float(R.beta_and_weight(100, cfg)[0]) == pytest.approx(2.0)
    assert float(R.beta_and_weight(60, cfg)[0]) == pytest.approx(11.0)


def test_adaround_with_zero_iterations_is_round_to_nearest():
    rng = np.random.default_rng(4)
    k = jnp.asarray(rng.normal(size=(24, 10)).astype(np.float32))
    for spec, pack in ((QuantSpec(bits=4, granularity="channel"), True), (QuantSpec(bits=8, granularity="channel"),
                                                                        False),
                       (QuantSpec(bits=4, symmetric=False, granularity="channel"), False)):
        rtn = QWeight.from_kernel(k, spec, pack=pack)
        ada, v0 = R.AdaRound.init(k, rtn)
        np.testing.assert_array_equal(np.asarray(ada.hard(v0).codes), np.asarray(rtn.codes))
        np.testing.assert_array_equal(np.asarray(ada.hard_kernel(v0)), np.asarray(rtn.dequantize()))
    net, params, q, data = _setup()
    decided = R.reconstruct_blocks(net, params, q, data, R.ReconConfig(iters=0))
    assert set(decided) == {"blocks_0/fc1", "blocks_0/fc2", "blocks_1/a", "blocks_1/b"}
    for p, w in decided.items():
        np.testing.assert_array_equal(np.asarray(w.codes), np.asarray(get_path(q, p).weight.codes))


def test_block_reconstruction_lowers_the_block_output_error_below_round_to_nearest():
    """W3 per-channel weights: BRECQ + AdaRound (400 iterations) at most 0.7× RTN's block
    output MSE, measured in float64 NumPy on the calibration calls."""
    net, params, q, data = _setup()
    cfg = R.ReconConfig(iters=400, batch=16, lr=1e-2, steps_per_call=200, seed=3)
    report: dict = {}
    decided = R.reconstruct_blocks(net, params, q, data, cfg, report=report)
    rtn = {p: get_path(q, p).weight for p in decided}
    e_rtn, e_rec = _block_err(params, rtn, data.x), _block_err(params, decided, data.x)
    assert report["blocks_0"]["rtn_loss"] == pytest.approx(e_rtn, rel=1e-3)
    assert report["blocks_0"]["loss"] == pytest.approx(e_rec, rel=1e-3)
    assert e_rec < 0.7 * e_rtn, (e_rec, e_rtn)
    assert report["blocks_1"]["loss"] < report["blocks_1"]["rtn_loss"]  # the tuple-output block too
    # deterministic from the seed
    again = R.reconstruct_blocks(net, params, q, data, cfg)
    for p in decided:
        np.testing.assert_array_equal(np.asarray(again[p].codes), np.asarray(decided[p].codes))


def test_capture_keeps_pytree_outputs_and_fisher_weights():
    net, params, q, data = _setup()
    cap = BlockCapture(net, ["blocks_0", "blocks_1"], chunk=20)  # 48 calls: the last chunk wraps
    got = cap.run(params, data, inputs=["blocks_0"], outputs=["blocks_0", "blocks_1"], fisher=["blocks_1"],
                  reference=R.float_view(q))
    p = params["blocks_0"]
    np.testing.assert_allclose(got["blocks_0"].args[0], data.x)
    np.testing.assert_allclose(got["blocks_0"].output,
                               _np_block(data.x, p["fc1"]["kernel"], p["fc1"]["bias"], p["fc2"]["kernel"],
                                         p["fc2"]["bias"]), rtol=1e-4, atol=1e-4)
    a, b = got["blocks_1"].output
    assert a.shape == b.shape == (D, L, C)
    ga, gb = got["blocks_1"].grad  # d‖ε − ε_ref‖² / d a = 2 (ε − ε_ref) · b
    eps = np.asarray(net(params, jnp.asarray(data.x), jnp.zeros((D,))))
    ref = np.asarray(net(R.float_view(q), jnp.asarray(data.x), jnp.zeros((D,))))
    np.testing.assert_allclose(ga, 2 * (eps - ref) * b, rtol=1e-3, atol=1e-4 * np.abs(ga).max())
    np.testing.assert_allclose(gb, 2 * (eps - ref) * a, rtol=1e-3, atol=1e-4 * np.abs(gb).max())


class _Video(nn.Module):
    """Latte's layout: ``x [N, F, T, C]``; a spatial block on frames folded into the batch
    (``[N·F, T, C]``, row ``n·F + f``) and a temporal block on patches folded in
    (``[N·T, F, C]``, row ``n·T + t``), the latter mixing the frames of one call."""

    @nn.compact
    def __call__(self, x, t):
        n, f, p, c = x.shape
        h = _Block(name="blocks_0")(x.reshape(n * f, p, c)).reshape(n, f, p, c)
        tt = h.transpose(0, 2, 1, 3).reshape(n * p, f, c)
        tt = _Block(name="temporal_blocks_0")(tt - jnp.mean(tt, axis=1, keepdims=True))
        return tt.reshape(n, p, f, c).transpose(0, 2, 1, 3) + t[:, None, None, None] * 0.0


def test_capture_splits_calls_of_blocks_that_see_a_reshaped_batch():
    """A block called on ``[N·F, T, C]`` / ``[N·T, F, C]`` (frames / patches folded into its
    batch, as Latte's): the capture keeps each call's own rows ``[D, F, T, C]`` /
    ``[D, T, F, C]`` (chunks of 5 over 12 calls, the last one wrapping), the outputs match a
    float64 NumPy recomputation per call, and reconstruction's round-to-nearest loss is the
    NumPy block error (inputs paired with their own targets)."""
    rng = np.random.default_rng(5)
    n_calls, f, p = 12, 3, 4
    x = rng.normal(size=(n_calls, f, p, C)).astype(np.float32)
    params = _Video().init(jax.random.PRNGKey(0), jnp.asarray(x[:1]), jnp.zeros((1,)))["params"]
    net = lambda prm, x, t: _Video().apply({"params": prm}, x, t)  # noqa: E731
    data = CalibSet(x=x, t=np.zeros((n_calls,), np.int32), cond={}, branch=np.zeros((n_calls,), np.int32),
                    step=np.zeros((n_calls,), np.int32), timesteps=np.zeros((1,), np.int32))
    cap = BlockCapture(net, ["blocks_0", "temporal_blocks_0"], chunk=5)
    got = cap.run(params, data, inputs=["blocks_0", "temporal_blocks_0"], outputs=["blocks_0", "temporal_blocks_0"])
    blk = lambda name, v: _np_block(v, *(params[name][l][k] for l in ("fc1", "fc2") for k in ("kernel", "bias")))  # noqa: E731
    h = blk("blocks_0", x)  # [D, F, T, C]
    tt = h.transpose(0, 2, 1, 3)
    tt = tt - tt.mean(axis=2, keepdims=True)  # [D, T, F, C]
    assert got["blocks_0"].args[0].shape == (n_calls, f, p, C)
    assert got["temporal_blocks_0"].args[0].shape == (n_calls, p, f, C)
    np.testing.assert_allclose(got["blocks_0"].args[0], x)
    np.testing.assert_allclose(got["blocks_0"].output, h, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["temporal_blocks_0"].args[0], tt, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["temporal_blocks_0"].output, blk("temporal_blocks_0", tt), rtol=1e-4, atol=1e-4)

    q = jax.tree_util.tree_map(lambda v: v, params)
    for b in ("blocks_0", "temporal_blocks_0"):
        for name in ("fc1", "fc2"):
            d = params[b][name]
            q[b][name] = QLinear(weight=QWeight.from_kernel(d["kernel"], WSPEC), act=None, bias=d["bias"])
    report: dict = {}
    R.reconstruct_blocks(net, params, q, data, R.ReconConfig(iters=0, chunk=5, inputs="float"), report=report)
    wq = {name: np.asarray(q["blocks_0"][name].weight.dequantize()) for name in ("fc1", "fc2")}
    out = _np_block(x, wq["fc1"], params["blocks_0"]["fc1"]["bias"], wq["fc2"], params["blocks_0"]["fc2"]["bias"])
    assert report["blocks_0"]["rtn_loss"] == pytest.approx(float(np.mean(np.sum((out - h) ** 2, -1))), rel=1e-3)
    assert report["temporal_blocks_0"]["rtn_loss"] > 0
