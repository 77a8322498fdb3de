"""DiT in Flax: named configs, parameter count, structure, conditioning (no torch needed).

Numerical parity with diffusers / the original layout is in test_converters.py.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.models.dit import (DIT_CONFIGS, DiT, DiTConfig, dit_config, init_dit, layer_roles, pos_embed_2d,
                              timestep_embedding)
from jaxdq.nn import ACT_STATS, ROLES, Linear

TINY = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                 num_classes=10)


def _count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def _shapes(cfg: DiTConfig):
    return jax.eval_shape(lambda k: init_dit(cfg, k), jax.random.PRNGKey(0))


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg: DiTConfig, params, x, t, y, force_drop_ids=None):
    # jitted: eager Flax on CPU compiles op by op (seconds even for TINY)
    return DiT(cfg).apply({"params": params}, x, t, y, force_drop_ids)


def _random_params(cfg: DiTConfig, seed: int = 0, std: float = 0.1):
    """Params with every entry N(0, std²) (none zero, unlike DiT's adaLN-Zero init), so tests can fail."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), jnp.float32), _shapes(cfg))


def _inputs(cfg: DiTConfig, n: int = 4, seed: int = 0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(k1, (n, cfg.in_channels, cfg.input_size, cfg.input_size))
    t = jnp.arange(n) * 250
    y = jnp.arange(n) % (cfg.num_classes + 1)
    return x, t, y


# ---------------------------------------------------------------------------------- configs


def test_named_configs_match_paper():
    sizes = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    assert set(DIT_CONFIGS) == {f"DiT-{s}/{p}" for s in sizes for p in (2, 4, 8)}
    for s, (d, depth, heads) in sizes.items():
        for p in (2, 4, 8):
            cfg = dit_config(f"DiT-{s}/{p}")
            assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size) == (d, depth, heads, p)


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_every_named_config_builds(name):
    cfg = dit_config(name)
    x = jnp.zeros((2, 4, 32, 32), jnp.float32)
    i = jnp.zeros((2,), jnp.int32)
    # one abstract trace gives both the params and the output, allocating nothing
    out, variables = jax.eval_shape(lambda k: DiT(cfg).init_with_output(k, x, i, i), jax.random.PRNGKey(0))
    shapes = variables["params"]
    assert shapes["x_embedder"]["proj"]["kernel"].shape == (4 * cfg.patch_size ** 2, cfg.hidden_size)
    assert f"blocks_{cfg.depth - 1}" in shapes and f"blocks_{cfg.depth}" not in shapes
    assert out.shape == (2, 8, 32, 32) and out.dtype == jnp.float32


def test_dit_xl2_parameter_count():
    # Paper / DiT train.py count: 675,129,632 = sum(p.numel() for p in model.parameters()),
    # which includes the frozen pos_embed nn.Parameter [1, 256, 1152]; here pos_embed is a
    # computed constant, so the learnable count is 294,912 lower.
    n = _count(_shapes(dit_config("DiT-XL/2")))
    assert n == 674_834_720
    assert n + 256 * 1152 == 675_129_632


def test_unknown_config_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown DiT config 'DiT-M/2'.*DiT-S/2.*DiT-XL/8"):
        dit_config("DiT-M/2")


def test_overrides_and_validation():
    cfg = dit_config("DiT-S/4", num_classes=10, learn_sigma=False, input_size=16)
    assert (cfg.num_classes, cfg.out_channels, cfg.input_size, cfg.hidden_size) == (10, 4, 16, 384)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiTConfig(hidden_size=32, num_heads=3)


# ---------------------------------------------------------------------------------- structure


def test_param_tree_and_roles():
    for shared in (True, False):
        cfg = dataclasses.replace(TINY, shared_embedder=shared)
        params = _shapes(cfg)
        assert ("t_embedder" in params) == shared and ("t_embedder" in params["blocks_1"]) != shared
        assert params["blocks_0"]["attn"]["qkv"]["kernel"].shape == (32, 96)
        assert params["final_layer"]["linear"]["kernel"].shape == (32, 2 * 2 * 8)
        assert "pos_embed" not in params
        # the role every Linear is created with, read off the running model
        seen = {}

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, Linear) and context.method_name == "__call__":
                seen["/".join(context.module.scope.path)] = context.module.role
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            jax.eval_shape(lambda p: DiT(cfg).apply({"params": p}, *_inputs(cfg, 1)), params)
        assert seen == layer_roles(cfg)
        assert set(seen.values()) <= set(ROLES)
        linear_paths = {"/".join(k.key for k in path[:-1])
                        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
                        if path[-1].key == "kernel"}
        assert linear_paths == set(seen)


def test_adaln_zero_init_and_nonzero_after_perturbation():
    cfg = dataclasses.replace(TINY, depth=1)  # init_dit compiles one RNG call per param: keep it small
    x, t, y = _inputs(cfg)
    params = init_dit(cfg, jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(_shapes(cfg))
    out = _apply(cfg, params, x, t, y)
    assert out.shape == (4, 8, 8, 8) and out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out))) == 0.0  # zero-initialized final layer
    assert float(jnp.max(jnp.abs(params["blocks_0"]["adaLN_modulation"]["kernel"]))) == 0.0
    assert float(jnp.std(params["blocks_0"]["attn"]["qkv"]["kernel"])) > 0.05  # xavier
    out = _apply(TINY, _random_params(TINY), *_inputs(TINY))
    assert float(jnp.min(jnp.std(out, axis=(1, 2, 3)))) > 1e-2


def test_bfloat16_input_stays_bfloat16():
    x, t, y = _inputs(TINY)
    for shared in (True, False):
        cfg = dataclasses.replace(TINY, shared_embedder=shared)
        out = jax.eval_shape(lambda p: DiT(cfg).apply({"params": p}, x.astype(jnp.bfloat16), t, y), _shapes(cfg))
        assert out.dtype == jnp.bfloat16


def test_learn_sigma_false_output_channels():
    cfg = dataclasses.replace(TINY, learn_sigma=False)
    out = _apply(cfg, _random_params(cfg), *_inputs(cfg))
    assert out.shape == (4, 4, 8, 8)


def test_conditioning_null_class_and_force_drop():
    params = _random_params(TINY)
    assert params["y_embedder"]["embedding_table"].shape == (TINY.num_classes + 1, 32)
    x, t, _ = _inputs(TINY)
    y = jnp.array([1, 2, 3, 4])
    null = jnp.full_like(y, TINY.num_classes)
    # one batch (one compile): labels | null class | labels with the even rows force-dropped
    tile = lambda a: jnp.concatenate([a, a, a])
    drop = jnp.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0])
    out = _apply(TINY, params, tile(x), tile(t), jnp.concatenate([y, null, y]), drop)
    cond, uncond, dropped = out[:4], out[4:8], out[8:]
    assert float(jnp.max(jnp.abs(cond - uncond))) > 1e-3
    np.testing.assert_allclose(dropped[0::2], uncond[0::2], atol=1e-6)
    np.testing.assert_allclose(dropped[1::2], cond[1::2], atol=1e-6)


def test_shared_equals_unshared_with_identical_embedders():
    shared = _random_params(TINY)
    unshared = {k: v for k, v in shared.items() if k not in ("t_embedder", "y_embedder")}
    for i in range(TINY.depth):
        unshared[f"blocks_{i}"] = dict(shared[f"blocks_{i}"], t_embedder=shared["t_embedder"],
                                       y_embedder=shared["y_embedder"])
    x, t, y = _inputs(TINY)
    unshared_cfg = dataclasses.replace(TINY, shared_embedder=False)
    a = _apply(TINY, shared, x, t, y)
    b = _apply(unshared_cfg, unshared, x, t, y)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # a different embedder in block 1 only changes the output
    unshared["blocks_1"] = dict(unshared["blocks_1"], y_embedder={
        "embedding_table": shared["y_embedder"]["embedding_table"] + 0.1})
    c = _apply(unshared_cfg, unshared, x, t, y)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_act_stats_collected_for_every_linear():
    params = _shapes(TINY)
    _, state = jax.eval_shape(lambda p: DiT(TINY).apply({"params": p}, *_inputs(TINY), mutable=[ACT_STATS]),
                              params)
    paths = {"/".join(k.key for k in path[:-1]) for path, _ in
             jax.tree_util.tree_flatten_with_path(state[ACT_STATS])[0]}
    assert paths == set(layer_roles(TINY))


# ---------------------------------------------------------------------------------- fixed embeddings


def _original_pos_embed(embed_dim, grid_size):
    """facebookresearch/DiT models.get_2d_sincos_pos_embed, verbatim in numpy."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_pos_embed_matches_original():
    for dim, g in ((32, 4), (1152, 16)):
        np.testing.assert_allclose(pos_embed_2d(dim, g, g), _original_pos_embed(dim, g), atol=1e-6)


def test_timestep_embedding_formula():
    t = np.array([0.0, 1.0, 37.0, 999.0])
    # int and float timesteps are the same timesteps
    np.testing.assert_array_equal(timestep_embedding(jnp.asarray(t)), timestep_embedding(jnp.asarray(t, jnp.int32)))
    for shift in (0, 1):
        half = 128
        freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - shift))
        ref = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
        np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), 256, shift), ref, atol=2e-4)
