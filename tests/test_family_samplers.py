"""Jitted family samplers (jaxdq.sampling.families) on tiny random models: guidance algebra, CFG=1
reduces to the conditional sampler, quantized params run through the same sampler close to float,
and every family's batch / sampler / one-call inputs fit together."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.quant.recipes import Context, get_recipe
from jaxdq.sampling import linear_schedule, sample
from jaxdq.sampling.families import Request, get_family, guided


def _w8a8(params, roles):
    return get_recipe("dynamic-w8a8").build(params, Context(roles=roles))[0]


def _randomize(init, seed=0, std=0.05):
    """Random params of the tree ``init()`` would make, drawn by NumPy from its shapes
    (``jax.eval_shape``: nothing compiled): kernels N(0, 1/fan_in), norm scales 1,
    embeddings N(0, 1), everything else 0, each plus ``std`` noise (no zero-init layer)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", "")
        base = (rng.normal(size=leaf.shape) / np.sqrt(max(1, int(np.prod(leaf.shape[:-1])))) if name == "kernel"
                else rng.normal(size=leaf.shape) if name == "embedding" else 1.0 if name == "scale" else 0.0)
        return jnp.asarray(base + std * rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(init))


def test_text_cfg_algebra():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)

    def apply(x, t, s):  # output 2C channels: ε depends on the text, the rest too
        e = x * (1 + s.mean(axis=(1, 2)))[:, None, None] + t[:, None, None] * 1e-3
        return jnp.concatenate([e, 2 * e], axis=1)

    apply_kw = lambda x, t, s: apply(x, t, s)  # noqa: E731

    x = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    c, u = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32), jnp.zeros((2, 5, 7))
    t = jnp.asarray([10, 10])
    out = guided(apply_kw, {"s": c}, {"s": u}, 3.0, out_channels=3)(x, t)
    ec, eu = apply(x, t, c), apply(x, t, u)
    np.testing.assert_allclose(np.asarray(out[:, :3]), np.asarray(eu[:, :3] + 3.0 * (ec[:, :3] - eu[:, :3])),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out[:, 3:]), np.asarray(ec[:, 3:]), rtol=1e-6)
    del w
    # scale 1 (a Python number) and no uncond are the conditional call itself
    np.testing.assert_array_equal(np.asarray(guided(apply_kw, {"s": c}, {"s": u}, 1)(x, t)), np.asarray(ec))
    np.testing.assert_array_equal(np.asarray(guided(apply_kw, {"s": c}, None, 3.0)(x, t)), np.asarray(ec))


@pytest.fixture(scope="module")
def pixart():
    from jaxdq.models.pixart import PixArtConfig, init_pixart

    cfg = PixArtConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=8, hidden_size=32, depth=2,
                       num_heads=2, caption_channels=16, use_additional_conditions=False)
    return cfg, _randomize(lambda: init_pixart(cfg, jax.random.PRNGKey(0)))


def _pixart_cond(s, m):
    return {"encoder_hidden_states": s, "encoder_attention_mask": m}


def test_pixart_sampler_cfg1_is_conditional_sampling_and_quantized_runs(pixart):
    from jaxdq.models.pixart import PixArt, layer_roles

    cfg, params = pixart
    fam = get_family("pixart")
    x_T = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 8, 8))
    s = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 16))
    m = jnp.ones((2, 6), jnp.int32).at[1, 4:].set(0)
    ns, nm = jnp.zeros_like(s), jnp.ones_like(m)
    key = jax.random.PRNGKey(3)
    out1 = fam.sampler(cfg, num_steps=6, guidance=1.0)(params, x_T, _pixart_cond(s, m), _pixart_cond(ns, nm), key)
    cond = lambda x, t: PixArt(cfg).apply({"params": params}, x, t, s, m)  # noqa: E731
    ref = sample(cond, x_T, key, schedule=linear_schedule(), solver="dpm++2m", num_steps=6)
    # values of a few hundred: relative tolerance (float32 rounding of a different op order)
    np.testing.assert_allclose(np.asarray(out1), np.asarray(ref), rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    run = fam.sampler(cfg, num_steps=6, guidance=4.5)
    f = np.asarray(run(params, x_T, _pixart_cond(s, m), _pixart_cond(ns, nm), key))
    q = np.asarray(run(_w8a8(params, layer_roles(cfg)), x_T, _pixart_cond(s, m), _pixart_cond(ns, nm), key))
    assert not np.allclose(f, np.asarray(out1), atol=1e-3)  # guidance changes the result
    assert np.isfinite(q).all() and 0 < np.abs(q - f).max() < 0.1 * np.abs(f).max()


def _tiny_configs():
    from jaxdq.models.flux import FluxConfig
    from jaxdq.models.latte import LatteConfig
    from jaxdq.models.unet import UNetConfig

    sd = UNetConfig(model_type="UNet2DConditionModel", mid_block_type="UNetMidBlock2DCrossAttn", sample_size=8,
                    in_channels=4, out_channels=4, block_out_channels=(16, 32),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
                    cross_attention_dim=16, num_attention_heads=(4, 4), transformer_layers_per_block=(1, 1))
    dd = UNetConfig(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    layers_per_block=1, norm_num_groups=8, attention_head_dim=8)
    lc = LatteConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=8, hidden_size=32, depth=2,
                     num_heads=2, caption_channels=16, video_length=3)
    fc = FluxConfig(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=8, guidance_embeds=True,
                    axes_dims_rope=(4, 6, 6))
    return {"sd-unet": sd, "unet": dd, "latte": lc, "flux": fc}


def _init(name, cfg, key):
    from jaxdq.models.flux import init_flux
    from jaxdq.models.latte import init_latte
    from jaxdq.models.unet import init_unet

    if name == "latte":
        return _randomize(lambda: init_latte(cfg, key, frames=cfg.video_length))
    if name == "flux":
        return _randomize(lambda: init_flux(cfg, key))
    return _randomize(lambda: init_unet(cfg, key))


@pytest.mark.parametrize("name", ["sd-unet", "flux"])
def test_family_batch_sampler_and_trajectory_fit_together(name):
    """Each family's batch feeds its jitted sampler; the trajectory has one model input per step
    and replaying step 0 through model_kwargs gives the network the sampler's first input.
    (UNet2D, Latte, PixArt and FLUX also run end to end through the CLI in test_every_family.py;
    SD is only here, FLUX here too for its packed-latent trajectory.)"""
    from jaxdq.sampling.families import trajectory_kwargs

    cfg = _tiny_configs()[name]
    key = jax.random.PRNGKey(0)
    params = _init(name, cfg, key)
    fam = get_family(name)
    if name == "flux":
        fam_batch = fam.batch(cfg, Request(per_class=1, seed=0))
        assert fam_batch.uncond is None and fam_batch.notes  # random T5/CLIP states, said so
    else:
        fam_batch = fam.batch(cfg, Request(per_class=1, seed=0))
    run = fam.sampler(cfg, num_steps=2, return_trajectory=True)
    x0, traj = run(params, fam_batch.x_T, fam_batch.cond, fam_batch.uncond, key)
    assert x0.shape == fam_batch.x_T.shape and np.isfinite(np.asarray(x0)).all()
    assert traj["x"].shape == (2,) + fam_batch.x_T.shape and traj["t"].shape == (2,)
    np.testing.assert_array_equal(np.asarray(traj["x"][0]), np.asarray(fam_batch.x_T))
    kw = trajectory_kwargs(fam, cfg, traj, fam.call_cond(fam_batch.cond, None))
    assert all(np.shape(v)[0] == 2 for v in jax.tree_util.tree_leaves(kw))
    step0 = jax.tree_util.tree_map(lambda a: a[0], kw)
    out = jax.jit(fam.module(cfg).apply)({"params": params}, **step0)  # one compile, not one per op
    assert np.isfinite(np.asarray(out)).all()
