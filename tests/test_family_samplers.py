"""Jitted family samplers on tiny random models: guidance algebra, CFG=1 reduces to the conditional
sampler, and quantized params run through the same sampler close to float."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.quant.recipes import w8a8_dynamic
from jaxdq.sampling import linear_schedule, sample
from jaxdq.sampling.families import (ddpm_unet_sampler, flux_sampler, latte_sampler, pixart_sampler, sd_sampler,
                                     text_cfg_model_fn)


def _randomize(params, seed=0, std=0.05):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [l + std * jax.random.normal(k, l.shape, l.dtype)
                                               for l, k in zip(leaves, keys)])


def test_text_cfg_algebra():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)

    def apply(x, t, s):  # output 2C channels: ε depends on the text, the rest too
        e = x * (1 + s.mean(axis=(1, 2)))[:, None, None] + t[:, None, None] * 1e-3
        return jnp.concatenate([e, 2 * e], axis=1)

    x = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    c, u = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32), jnp.zeros((2, 5, 7))
    t = jnp.asarray([10, 10])
    out = text_cfg_model_fn(apply, (c,), (u,), 3.0, out_channels=3)(x, t)
    ec, eu = apply(x, t, c), apply(x, t, u)
    np.testing.assert_allclose(np.asarray(out[:, :3]), np.asarray(eu[:, :3] + 3.0 * (ec[:, :3] - eu[:, :3])),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out[:, 3:]), np.asarray(ec[:, 3:]), rtol=1e-6)
    del w


@pytest.fixture(scope="module")
def pixart():
    from jaxdq.models.pixart import PixArtConfig, init_pixart

    cfg = PixArtConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=8, hidden_size=32, depth=2,
                       num_heads=2, caption_channels=16, use_additional_conditions=False)
    return cfg, _randomize(init_pixart(cfg, jax.random.PRNGKey(0)))


def test_pixart_sampler_cfg1_is_conditional_sampling_and_quantized_runs(pixart):
    from jaxdq.models.pixart import PixArt

    cfg, params = pixart
    x_T = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 8, 8))
    s = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 16))
    m = jnp.ones((2, 6), jnp.int32).at[1, 4:].set(0)
    ns, nm = jnp.zeros_like(s), jnp.ones_like(m)
    key = jax.random.PRNGKey(3)
    out1 = pixart_sampler(cfg, num_steps=6, cfg_scale=1.0)(params, x_T, s, m, ns, nm, key)
    cond = lambda x, t: PixArt(cfg).apply({"params": params}, x, t, s, m)  # noqa: E731
    ref = sample(cond, x_T, key, schedule=linear_schedule(), solver="dpm++2m", num_steps=6)
    np.testing.assert_allclose(np.asarray(out1), np.asarray(ref), atol=1e-4)
    run = pixart_sampler(cfg, num_steps=6, cfg_scale=4.5)
    f = np.asarray(run(params, x_T, s, m, ns, nm, key))
    q = np.asarray(run(w8a8_dynamic(params), x_T, s, m, ns, nm, key))
    assert not np.allclose(f, np.asarray(out1), atol=1e-3)  # guidance changes the result
    assert np.isfinite(q).all() and 0 < np.abs(q - f).max() < 0.1 * np.abs(f).max()


def test_sd_ddpm_latte_flux_samplers_run_jitted():
    from jaxdq.models.flux import FluxConfig, init_flux
    from jaxdq.models.latte import LatteConfig, init_latte
    from jaxdq.models.unet import UNetConfig, init_unet

    key = jax.random.PRNGKey(0)
    sd = UNetConfig(model_type="UNet2DConditionModel", mid_block_type="UNetMidBlock2DCrossAttn", sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
                    cross_attention_dim=16, num_attention_heads=(4, 4), transformer_layers_per_block=(1, 1))
    p = _randomize(init_unet(sd, key))
    st = jax.random.normal(key, (2, 5, 16))
    z = sd_sampler(sd, num_steps=2)(p, jax.random.normal(key, (2, 4, 8, 8)), st, jnp.zeros_like(st), key)
    assert z.shape == (2, 4, 8, 8) and np.isfinite(np.asarray(z)).all()

    dd = UNetConfig(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    layers_per_block=1, norm_num_groups=8, attention_head_dim=8)
    x = ddpm_unet_sampler(dd, num_steps=2)(_randomize(init_unet(dd, key)), jax.random.normal(key, (1, 3, 8, 8)), key)
    assert np.isfinite(np.asarray(x)).all()

    lc = LatteConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=8, hidden_size=32, depth=2,
                     num_heads=2, caption_channels=16, video_length=3)
    lp = _randomize(init_latte(lc, key, frames=3))
    s = jax.random.normal(key, (1, 4, 16))
    v = latte_sampler(lc, num_steps=2)(lp, jax.random.normal(key, (1, 4, 3, 8, 8)), s, jnp.ones((1, 4)),
                                       jnp.zeros_like(s), jnp.ones((1, 4)), key)
    assert v.shape == (1, 4, 3, 8, 8) and np.isfinite(np.asarray(v)).all()

    fc = FluxConfig(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=8, guidance_embeds=True,
                    axes_dims_rope=(4, 6, 6))
    fp = _randomize(init_flux(fc, key))
    lat = flux_sampler(fc, height=8, width=8, num_steps=2)(fp, jax.random.normal(key, (1, 4, 8, 8)),
                                                         jax.random.normal(key, (1, 6, 24)),
                                                         jax.random.normal(key, (1, 8)))
    assert lat.shape == (1, 4, 8, 8) and np.isfinite(np.asarray(lat)).all()
