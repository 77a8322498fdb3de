"""Defining properties of the float-equivalent transforms: Hadamard math, smoothing, rotation
and the low-rank split, applied in any order, fold exactly into the one InputTransform."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.nn import linear
from jaxdq.quant.hadamard import BlockHadamard, block_hadamard, fwht, hadamard_block_size, hadamard_matrix
from jaxdq.quant.layers import FloatLinear, QLinear
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import LayerQuant, dequantize_params, quantize_linear
from jaxdq.quant.smooth import smoothing_factors
from jaxdq.quant.transforms import lowrank_layer, rotate_layer, smooth_layer


def _np_hadamard(n):
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h / np.sqrt(n)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_fwht_equals_dense_hadamard(n):
    x = np.random.default_rng(n).normal(size=(3, 5, n))
    ref = x @ _np_hadamard(n)
    np.testing.assert_allclose(hadamard_matrix(n), _np_hadamard(n), atol=1e-12)
    np.testing.assert_allclose(np.asarray(fwht(jnp.asarray(x, jnp.float32))), ref, atol=2e-5)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(jnp.ones((2, 12)))


@pytest.mark.parametrize("k,block", [(1152, 128), (96, 32), (64, 64)])
def test_block_hadamard_is_its_own_inverse_and_orthogonal(k, block):
    assert hadamard_block_size(k) == block
    x = jnp.asarray(np.random.default_rng(0).normal(size=(7, k)), jnp.float32)
    y = block_hadamard(x, block)
    np.testing.assert_allclose(np.asarray(block_hadamard(y, block)), np.asarray(x), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=1), np.linalg.norm(np.asarray(x), axis=1),
                               rtol=1e-5)
    dense = np.kron(np.eye(k // block), _np_hadamard(block))
    np.testing.assert_allclose(np.asarray(y), np.asarray(x, np.float64) @ dense, atol=2e-5)
    # the rotation node: apply = x H, rotate_weight = Hᵀ W, unrotate_weight = H W
    rot = BlockHadamard.for_width(k)
    assert rot == BlockHadamard(block) and rot.kernel_block == block
    np.testing.assert_allclose(np.asarray(rot.apply(x)), np.asarray(y))
    w = np.random.default_rng(1).normal(size=(k, 5))
    np.testing.assert_allclose(np.asarray(rot.rotate_weight(jnp.asarray(w, jnp.float32))), dense.T @ w, atol=2e-5)
    np.testing.assert_allclose(np.asarray(rot.unrotate_weight(jnp.asarray(w, jnp.float32))), dense @ w, atol=2e-5)


def _layer(rng, cin=64, cout=48, outliers=(3, 17)):
    w = rng.normal(size=(cin, cout)) * 0.1
    x = rng.normal(size=(4, 10, cin))
    x[..., list(outliers)] *= 40.0  # activation outlier channels, as after adaLN modulation
    return FloatLinear(kernel=jnp.asarray(w, jnp.float32), bias=jnp.asarray(rng.normal(size=cout), jnp.float32)), x


def test_smoothing_and_rotation_leave_float_output_unchanged():
    rng = np.random.default_rng(1)
    layer, x = _layer(rng)
    ref = x @ np.asarray(layer.kernel, np.float64) + np.asarray(layer.bias, np.float64)
    lam = smoothing_factors(np.abs(x).reshape(-1, 64).max(0), layer.kernel, 0.5)
    sm = smooth_layer(layer, lam)
    rot = rotate_layer(sm, BlockHadamard(64))
    for p in (sm, rot):
        np.testing.assert_allclose(np.asarray(linear(p, jnp.asarray(x, jnp.float32))), ref, rtol=1e-4, atol=1e-3)
    # λ follows its formula
    expect = np.abs(x).reshape(-1, 64).max(0) ** 0.5 / np.abs(np.asarray(layer.kernel)).max(1) ** 0.5
    np.testing.assert_allclose(np.asarray(lam), expect, rtol=1e-5)
    # and the quantized layer built from the transformed layer carries the transforms
    q = quantize_linear(rot, LayerQuant(weight=QuantSpec(bits=8, granularity="channel")))
    assert q.transform.rotation == BlockHadamard(64) and q.transform.smooth is not None
    back = dequantize_params({"l": q})["l"]
    eff = np.diag(1 / np.asarray(lam, np.float64)) @ _np_hadamard(64) @ np.asarray(q.weight.dequantize(), np.float64)
    np.testing.assert_allclose(np.asarray(back["kernel"]), eff, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(back["kernel"]), np.asarray(layer.kernel), atol=0.02)


def test_smoothing_then_rotation_shrinks_per_token_range_and_quant_error():
    rng = np.random.default_rng(2)
    layer, x = _layer(rng)
    xf = jnp.asarray(x, jnp.float32)
    ref = x @ np.asarray(layer.kernel, np.float64) + np.asarray(layer.bias, np.float64)
    cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=QuantSpec(bits=4, granularity="token"))
    lam = smoothing_factors(np.abs(x).reshape(-1, 64).max(0), layer.kernel, 0.5)
    sm = smooth_layer(layer, lam)
    rot = rotate_layer(sm, BlockHadamard(64))
    errs = [float(np.mean((np.asarray(quantize_linear(p, cfg)(xf)) - ref) ** 2)) for p in (layer, sm, rot)]
    assert errs[1] < 0.5 * errs[0] and errs[2] < errs[1], errs


# --------------------------------------------------------------------------- any order
# (Replaces "smooth refuses after rotation": the transforms no longer have an order
# restriction; each folds itself exactly into the InputTransform's one order.)
def _steps(lam, lam2):
    return {"smooth": lambda l: smooth_layer(l, lam), "rotate": lambda l: rotate_layer(l, BlockHadamard(16)),
            "lowrank": lambda l: lowrank_layer(l, 6), "smooth2": lambda l: smooth_layer(l, lam2)}


def _rel(a, ref):
    return float(np.linalg.norm(np.asarray(a, np.float64) - ref) / np.linalg.norm(ref))


ORDERS = ([list(p) for p in itertools.permutations(["smooth", "rotate", "lowrank"])]
          + [["smooth", "rotate", "smooth2", "lowrank"], ["lowrank", "smooth", "rotate", "smooth2"],
             ["rotate", "lowrank", "smooth", "smooth2"]])


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_every_order_of_transforms_keeps_the_float_function(order):
    rng = np.random.default_rng(7)
    layer, x = _layer(rng)
    w64, b64 = np.asarray(layer.kernel, np.float64), np.asarray(layer.bias, np.float64)
    ref = x @ w64 + b64  # float64 reference of the untransformed layer
    lam = smoothing_factors(np.abs(x).reshape(-1, 64).max(0), layer.kernel, 0.5)
    lam2 = jnp.asarray(rng.uniform(0.5, 2.0, size=64), jnp.float32)
    steps = _steps(lam, lam2)
    out = layer
    for name in order:
        out = steps[name](out)
        assert isinstance(out, FloatLinear)
        # after every step: the same function (float32 compute vs the float64 reference)
        assert _rel(out(jnp.asarray(x, jnp.float32)), ref) < 1e-5, (order, name)
        assert _rel(linear(out, jnp.asarray(x, jnp.float32)), ref) < 1e-5, (order, name)
    t = out.transform
    # every transform landed in the one InputTransform
    assert t.rotation == BlockHadamard(16) and t.rank == 6 and t.lowrank_b.shape == (6, 48)
    smooth = np.asarray(lam, np.float64) * (np.asarray(lam2, np.float64) if "smooth2" in order else 1.0)
    np.testing.assert_allclose(np.asarray(t.smooth, np.float64), smooth, rtol=1e-6)
    # the folded-out kernel is the original one
    np.testing.assert_allclose(np.asarray(out.effective_kernel(), np.float64), w64, rtol=1e-4,
                               atol=1e-5 * np.abs(w64).max())
    # the layer computes rotation(x / smooth) (W + L1 L2) + b: check the stored pieces in float64
    h = np.kron(np.eye(4), _np_hadamard(16))
    xt = (x / np.asarray(t.smooth, np.float64)) @ h
    stored = (xt @ np.asarray(out.kernel, np.float64)
              + xt @ np.asarray(t.lowrank_a, np.float64) @ np.asarray(t.lowrank_b, np.float64) + b64)
    assert _rel(stored, ref) < 1e-5


def test_one_rotation_and_one_lowrank_branch_per_layer():
    layer, _ = _layer(np.random.default_rng(3))
    rot = rotate_layer(layer)
    assert rot.transform.rotation == BlockHadamard(64)  # default: the largest power-of-two block
    with pytest.raises(ValueError, match="already rotated"):
        rotate_layer(rot)
    with pytest.raises(ValueError, match="already rotated"):
        rotate_layer(lowrank_layer(smooth_layer(rot, jnp.full(64, 2.0)), 4), BlockHadamard(8))
    lr = lowrank_layer(layer, 4)
    with pytest.raises(ValueError, match="low-rank"):
        lowrank_layer(lr, 4)
    with pytest.raises(ValueError, match="low-rank"):
        lowrank_layer(rotate_layer(smooth_layer(lr, jnp.full(64, 2.0))), 2)
    # rank 0 leaves the layer as it is (and so allows a later split)
    assert lowrank_layer(layer, 0) is layer


def test_transforms_refuse_quantized_layers():
    layer, _ = _layer(np.random.default_rng(4))
    q = quantize_linear(smooth_layer(layer, jnp.full(64, 2.0)),
                        LayerQuant(weight=QuantSpec(bits=8, granularity="channel"),
                                   act=QuantSpec(bits=8, granularity="token")))
    assert isinstance(q, QLinear)
    with pytest.raises(TypeError, match="float layers"):
        smooth_layer(q, jnp.ones(64))
    with pytest.raises(TypeError, match="float layers"):
        rotate_layer(q)
    with pytest.raises(TypeError, match="float layers"):
        lowrank_layer(q, 4)
    with pytest.raises(TypeError, match="float layer"):
        quantize_linear(q, LayerQuant(weight=QuantSpec(bits=8, granularity="channel")))


def test_params_transforms_select_layers_and_keep_the_function():
    """smooth_params (λ from pooled stats and the current effective kernel) and rotate_params
    apply to the selected float layers only; smoothed_range is ``max_j absmax_j / smooth_j``."""
    from jaxdq.quant.transforms import rotate_params, smooth_params, smoothed_range

    rng = np.random.default_rng(5)
    a, x = _layer(rng)
    b, _ = _layer(rng)
    params = {"blk": {"a": {"kernel": a.kernel, "bias": a.bias}, "b": {"kernel": b.kernel, "bias": b.bias}}}
    absmax = np.abs(x).reshape(-1, 64).max(0)
    stats = {"blk": {"a": {"absmax": absmax, "min": float(x.min()), "max": float(x.max())}}}
    sel = lambda p: p == "blk/a"  # noqa: E731
    sm = smooth_params(params, stats, 0.5, sel)
    untouched = lambda t: (set(t["blk"]["b"]) == {"kernel", "bias"}  # noqa: E731  (unselected: the same arrays)
                           and all(t["blk"]["b"][k] is params["blk"]["b"][k] for k in ("kernel", "bias")))
    assert untouched(sm)
    lam = smoothing_factors(absmax, a.kernel, 0.5)
    np.testing.assert_allclose(np.asarray(sm["blk"]["a"].transform.smooth), np.asarray(lam), rtol=1e-6)
    rot = rotate_params(sm, sel)
    assert rot["blk"]["a"].transform.rotation == BlockHadamard(64) and untouched(rot)
    ref = x @ np.asarray(a.kernel, np.float64) + np.asarray(a.bias, np.float64)
    for tree in (sm, rot):
        assert _rel(linear(tree["blk"]["a"], jnp.asarray(x, jnp.float32)), ref) < 1e-5
    # a second smoothing after the rotation reads the effective (raw-input) kernel
    sm2 = smooth_params(rot, stats, 0.5, sel)
    lam2 = smoothing_factors(absmax, rot["blk"]["a"].effective_kernel(), 0.5)
    np.testing.assert_allclose(np.asarray(sm2["blk"]["a"].transform.smooth), np.asarray(lam * lam2), rtol=1e-5)
    assert _rel(linear(sm2["blk"]["a"], jnp.asarray(x, jnp.float32)), ref) < 1e-5
    # range of the smoothed input, bounded from the raw statistics
    r = smoothed_range(stats["blk"]["a"], sm["blk"]["a"])
    m = np.max(absmax / np.asarray(lam, np.float64))
    np.testing.assert_allclose([r["min"], r["max"]], [-m, m], rtol=1e-6)
    assert np.max(np.abs(x / np.asarray(lam, np.float64))) <= m * (1 + 1e-6)
    assert smoothed_range(stats["blk"]["a"], a) is stats["blk"]["a"]
