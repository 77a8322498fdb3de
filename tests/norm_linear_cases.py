"""Tiny DiT / PixArt / FLUX models and quantized param trees for the norm-fused linear tests.

Shared by ``tests/test_norm_quantize.py`` and ``tests/data/make_norm_linear_fixture.py``
(which wrote ``tests/data/norm_linear_fixture.npz`` from the model code *before* the
models called :func:`jaxdq.norm_linear.norm_linear`, so the reference policy is checked
against the pre-change outputs to float rounding).  Only long-standing APIs are used here
(module constructors, ``init``-free random params from NumPy, the recipes' transforms),
so the generator runs on either side of the change.

Every model is 128 wide (the kernels need K, N multiples of 128) with token counts that
are multiples of 16 per sample (the fused norm kernel's row blocks stay in one sample).
Params are drawn by NumPy from the models' ``eval_shape`` trees, not by ``init``, so the
fixture does not depend on Flax's initializers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MODELS = ("dit", "pixart", "flux")
VARIANTS = ("float", "dynamic-w8a8", "quarot-w8a8", "smooth-lowrank-w8a8", "dynamic-w4a8")


def _random_params(shapes, seed: int):
    """NumPy-drawn float32 params for an ``eval_shape`` tree: kernels N(0, 1/fan_in),
    biases N(0, 0.02²), tables / norm scales N(1 or 0, 0.1²)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        if name == "kernel":
            v = rng.normal(size=shape) / np.sqrt(shape[0])
        elif name == "scale":  # RMSNorm
            v = 1.0 + 0.1 * rng.normal(size=shape)
        elif name == "bias":
            v = 0.02 * rng.normal(size=shape)
        else:  # scale_shift_table, embedding_table
            v = 0.1 * rng.normal(size=shape)
        return jnp.asarray(v, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def build(model: str, dtype=jnp.float32):
    """``(apply(params, policy) -> output, float params, roles)`` of a tiny ``model``; the
    inputs are fixed inside ``apply`` (NumPy seed 1; float inputs cast to ``dtype``, which
    sets the models' activation dtype)."""
    from jaxdq import backend

    rng = np.random.default_rng(1)
    if model == "dit":
        from jaxdq.models.dit import DiT, DiTConfig, layer_roles

        cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=4,
                        num_classes=10)
        module = DiT(cfg)
        x = jnp.asarray(rng.normal(size=(2, 4, 8, 8)), jnp.float32)  # 16 tokens per image
        args = (x, jnp.asarray([10, 700]), jnp.asarray([3, 10]))
        init_args = (x[:1], jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
    elif model == "pixart":
        from jaxdq.models.pixart import PixArt, PixArtConfig, layer_roles

        cfg = PixArtConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=8, hidden_size=128, depth=2,
                           num_heads=4, caption_channels=32)
        module = PixArt(cfg)
        x = jnp.asarray(rng.normal(size=(2, 4, 8, 8)), jnp.float32)
        ctx = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32)
        mask = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3])
        args = (x, jnp.asarray([10, 700]), ctx, mask)
        init_args = (x[:1], jnp.zeros((1,)), ctx[:1])
    elif model == "flux":
        from jaxdq.models.flux import Flux, FluxConfig, image_ids, layer_roles, pack_latents, text_ids

        cfg = FluxConfig(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                         axes_dims_rope=(16, 24, 24), guidance_embeds=True)
        module = Flux(cfg)
        img = pack_latents(jnp.asarray(rng.normal(size=(2, 4, 8, 8)), jnp.float32))  # 16 image tokens
        txt = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.float32)  # 16 text tokens
        pooled = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)
        args = (img, txt, pooled, jnp.asarray([0.25, 0.9]), jnp.asarray(image_ids(8, 8)), jnp.asarray(text_ids(16)),
                jnp.asarray([3.5, 1.0]))
        init_args = tuple(a[:1] if i in (0, 1, 2, 3, 6) else a for i, a in enumerate(args))
    else:
        raise ValueError(model)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_args)["params"])
    params = _random_params(shapes, seed={"dit": 10, "pixart": 11, "flux": 12}[model])

    args = tuple(a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) and a.ndim > 1 else a for a in args)

    def apply(p, pol=backend.REFERENCE):
        return jax.jit(lambda q: module.apply({"params": backend.bind(q, pol)}, *args))(p)

    return apply, params, layer_roles(cfg)


def quantized(params, roles, variant: str):
    """``params`` quantized by ``variant`` (:data:`VARIANTS`), spelled out here (not through
    the recipe registry, whose recipes may change) so the fixture keeps its meaning:
    per-channel weights, dynamic per-token activations, embeddings/final float; ``quarot``:
    the block Hadamard of the largest power-of-two block; ``smooth-lowrank``: smoothing
    α = 0.5 from NumPy-drawn statistics, then a rank-8 branch."""
    from jaxdq.quant.hadamard import BlockHadamard
    from jaxdq.quant.layers import iter_layers
    from jaxdq.quant.quantizer import QuantSpec
    from jaxdq.quant.rules import LayerQuant, Rule, keep_float, quantize_params, selected
    from jaxdq.quant.transforms import lowrank_layer, rotate_params, smooth_params, transform_params

    if variant == "float":
        return params
    w_bits = 4 if variant == "dynamic-w4a8" else 8
    cfg = LayerQuant(weight=QuantSpec(bits=w_bits, granularity="channel"),
                     act=QuantSpec(bits=8, granularity="token"), pack=w_bits == 4)
    rules = [keep_float(), Rule(cfg)]
    sel = selected(rules, roles)
    if variant in ("dynamic-w8a8", "dynamic-w4a8"):
        return quantize_params(params, rules, roles=roles)
    if variant == "quarot-w8a8":
        return quantize_params(rotate_params(params, sel, BlockHadamard.for_width), rules, roles=roles)
    assert variant == "smooth-lowrank-w8a8", variant
    rng = np.random.default_rng(5)
    stats: dict = {}
    for path, layer in iter_layers(params):
        node = stats
        for k in path.split("/"):
            node = node.setdefault(k, {})
        node["absmax"] = jnp.asarray(np.exp(rng.normal(size=layer.in_features)), jnp.float32)
    sm = smooth_params(params, stats, 0.5, sel)
    lr = transform_params(sm, lambda p, l: lowrank_layer(l, 8), sel)
    return quantize_params(lr, rules, roles=roles)
