"""The FullHadamard rotation node: x·H_n with the full-width Hadamard of hadamard_orders, its weight
folds, kernel block, float equivalence inside layers and recipes, checkpoints."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq import checkpoint
from jaxdq.quant.hadamard import (BlockHadamard, FullHadamard, full_hadamard_transpose, hadamard_matrix,
                                  rotation_for)
from jaxdq.quant.hadamard_orders import hadamard_matrix_full
from jaxdq.quant.layers import FloatLinear, QLinear, get_path, iter_layers
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import LayerQuant, quantize_linear
from jaxdq.quant.transforms import rotate_layer, smooth_layer

WIDTHS = [12, 72, 320, 384, 1152, 3072, 128]


@pytest.mark.parametrize("n", WIDTHS)
def test_apply_and_weight_folds_equal_the_dense_matrix(n):
    rng = np.random.default_rng(n)
    h = hadamard_matrix_full(n)  # float64 [n, n], orthogonal
    rot = FullHadamard.for_width(n)
    x = rng.normal(size=(3, n))
    w = rng.normal(size=(n, 7))
    tol = 3e-5 * math.sqrt(n)
    np.testing.assert_allclose(np.asarray(rot.apply(jnp.asarray(x, jnp.float32)), np.float64), x @ h, atol=tol)
    np.testing.assert_allclose(np.asarray(rot.rotate_weight(jnp.asarray(w, jnp.float32)), np.float64), h.T @ w,
                               atol=tol)
    np.testing.assert_allclose(np.asarray(rot.unrotate_weight(jnp.asarray(w, jnp.float32)), np.float64), h @ w,
                               atol=tol)
    np.testing.assert_allclose(np.asarray(full_hadamard_transpose(jnp.asarray(x, jnp.float32)), np.float64),
                               x @ h.T, atol=tol)
    # x H · Hᵀ W = x W: the rotated layer computes the same product
    got = np.asarray(rot.apply(jnp.asarray(x, jnp.float32)) @ rot.rotate_weight(jnp.asarray(w, jnp.float32)))
    np.testing.assert_allclose(got, x @ w, atol=tol * np.abs(w).max() * 4)


def test_non_symmetric_order_needs_the_transpose():
    """Paley I orders (12 = 11 + 1) are not symmetric: H W ≠ Hᵀ W, so unrotate is not rotate."""
    h = hadamard_matrix_full(12)
    assert not np.allclose(h, h.T)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(12, 3)), jnp.float32)
    rot = FullHadamard(12)
    assert not np.allclose(np.asarray(rot.rotate_weight(w)), np.asarray(rot.unrotate_weight(w)), atol=1e-3)
    np.testing.assert_allclose(np.asarray(rot.unrotate_weight(rot.rotate_weight(w))), np.asarray(w), atol=1e-5)


def test_kernel_block_and_power_of_two_equals_block_hadamard():
    assert FullHadamard(1152).kernel_block == 0 and FullHadamard(3072).kernel_block == 0
    assert FullHadamard(512).kernel_block == 512
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 256)), jnp.float32)
    np.testing.assert_allclose(np.asarray(FullHadamard(256).apply(x)), np.asarray(BlockHadamard(256).apply(x)),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(FullHadamard(256).apply(x)), np.asarray(x) @ hadamard_matrix(256),
                               atol=1e-5)


def test_rotation_for_every_zoo_width_and_fallback():
    for n in (64, 72, 320, 384, 768, 1152, 1536, 2304, 3072, 4608, 6912, 12288, 15360):
        assert rotation_for(n) == FullHadamard(n)
        assert rotation_for(n, "block") == BlockHadamard.for_width(n)
    assert rotation_for(15) == BlockHadamard(1)  # odd: no Hadamard of that order
    assert rotation_for(6) == BlockHadamard(2)
    with pytest.raises(ValueError, match="rotation kind"):
        rotation_for(128, "dense")
    with pytest.raises(ValueError, match="15"):
        FullHadamard.for_width(15)
    with pytest.raises(ValueError, match="width 12"):
        FullHadamard(12).apply(jnp.ones((2, 24)))


@pytest.mark.parametrize("n", [72, 1152])
def test_layer_transforms_stay_float_equivalent(n):
    """rotate then smooth, and smooth then rotate: the layer computes x W + b (unrotate is used when
    a smoothing is folded in after the rotation)."""
    rng = np.random.default_rng(n + 3)
    w = jnp.asarray(rng.normal(size=(n, 16)) / math.sqrt(n), jnp.float32)
    b = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
    x = rng.normal(size=(5, n)).astype(np.float32)
    x[:, 3] *= 50.0
    ref = x.astype(np.float64) @ np.asarray(w, np.float64) + np.asarray(b)
    lam = jnp.asarray(rng.uniform(0.5, 4.0, size=(n,)), jnp.float32)
    layer = FloatLinear(kernel=w, bias=b)
    for built in (smooth_layer(rotate_layer(layer, FullHadamard(n)), lam),
                  rotate_layer(smooth_layer(layer, lam), FullHadamard(n))):
        assert built.transform.rotation == FullHadamard(n)
        np.testing.assert_allclose(np.asarray(built(jnp.asarray(x)), np.float64), ref, atol=2e-4 * np.abs(ref).max())
        np.testing.assert_allclose(np.asarray(built.effective_kernel()), np.asarray(w), atol=2e-5)


def test_full_width_rotation_lowers_a4_error_of_a_rotated_layer():
    """With one ×60 outlier channel at width 1152, the full-width rotation spreads it over all 1152
    channels: the W8A4 layer's output error is below the block-128 rotation's."""
    n = 1152
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(n, 64)) / math.sqrt(n), jnp.float32)
    x = rng.normal(size=(256, n)).astype(np.float32)
    x[:, 700] *= 60.0
    ref = x @ np.asarray(w)
    cfg = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=QuantSpec(bits=4, granularity="token"))
    err = {}
    for name, rot in (("full", FullHadamard(n)), ("block", BlockHadamard(128))):
        q = quantize_linear(rotate_layer(FloatLinear(kernel=w), rot), cfg)
        err[name] = float(np.mean((np.asarray(q(jnp.asarray(x))) - ref) ** 2) / np.mean(ref ** 2))
    assert err["full"] < 0.6 * err["block"], err


def test_checkpoint_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    layer = rotate_layer(FloatLinear(kernel=jnp.asarray(rng.normal(size=(72, 8)), jnp.float32)), FullHadamard(72))
    q = quantize_linear(layer, LayerQuant(weight=QuantSpec(bits=8, granularity="channel"),
                                          act=QuantSpec(bits=8, granularity="token")))
    path = checkpoint.save(tmp_path / "ck", {"a": q}, metadata={"method": "t", "bits": "W8A8"})
    back, meta = checkpoint.load(path)
    assert meta["nodes"]["a/transform/rotation"] == {"type": "FullHadamard", "static": {"width": 72}, "fields": {}}
    assert isinstance(back["a"], QLinear) and back["a"].transform.rotation == FullHadamard(72)
    x = jnp.asarray(rng.normal(size=(3, 72)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(back["a"](x)), np.asarray(q(x)))


def test_quarot_and_vidit_q_recipes_rotate_full_width_on_a_non_power_of_two_model():
    """A PixArt-layout model of width 96 (= 12·8): quarot / vidit-q use FullHadamard(96) on every
    rotated layer (the MLP's 384 = 12·32 too); the -block variants BlockHadamard(32); the float model's
    function is unchanged by the balancing."""
    from jaxdq.models.pixart import PixArt, PixArtConfig, example_inputs, layer_roles
    from jaxdq.quant import recipes

    cfg = PixArtConfig(sample_size=8, patch_size=2, in_channels=1, out_channels=2, hidden_size=96, depth=1,
                       num_heads=4, caption_channels=24, max_text_tokens=4)
    inputs = example_inputs(cfg)
    params = PixArt(cfg).init(jax.random.PRNGKey(0), *inputs)["params"]
    roles = layer_roles(cfg)
    ctx = recipes.Context(roles=roles)
    q, _ = recipes.get_recipe("quarot-w8a8").build(params, ctx)
    rots = {p: l.transform.rotation for p, l in iter_layers(q) if isinstance(l, QLinear)}
    assert rots and all(isinstance(r, FullHadamard) and r.width == get_path(q, p).in_features
                        for p, r in rots.items())
    assert rots["blocks_0/ff/fc2"] == FullHadamard(384)
    qb, _ = recipes.get_recipe("quarot-block-w8a8").build(params, ctx)
    assert get_path(qb, "blocks_0/ff/fc2").transform.rotation == BlockHadamard(128)
    assert get_path(qb, "blocks_0/attn1/qkv").transform.rotation == BlockHadamard(32)
