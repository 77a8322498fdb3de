"""Latte (video DiT) in Flax: parity with diffusers LatteTransformer3DModel over several frames,
conversion strictness, param tree / roles (temporal-attn), Latte-1 config and parameter count."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="Latte parity tests need PyTorch")
diffusers = pytest.importorskip("diffusers", reason="Latte parity tests need diffusers")

from converters.dit import ConversionError  # noqa: E402
from converters.latte import convert_latte  # noqa: E402
from jaxdq.models.latte import Latte, LatteConfig, init_latte, latte_config, layer_roles  # noqa: E402
from jaxdq.nn import ROLES, Linear  # noqa: E402

HEADS, HEAD_DIM, LAYERS, SIZE, TEXT_CH, TOKENS, FRAMES = 4, 16, 2, 8, 32, 8, 3
TOL = 1e-4
# Latte-1's transformer settings (PixArt-α blocks), at a small size
PIXART_BLOCK = dict(attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)


@functools.lru_cache(maxsize=None)
def _model():
    """Small LatteTransformer3DModel, every parameter (scale_shift_tables included) re-drawn N(0, 0.1²)."""
    torch.manual_seed(0)
    model = diffusers.LatteTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=LAYERS,
        cross_attention_dim=HEADS * HEAD_DIM, sample_size=SIZE, patch_size=2, caption_channels=TEXT_CH,
        video_length=FRAMES, **PIXART_BLOCK).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def _numpy_sd(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _inputs() -> dict:
    """CFG batch of 4 videos of FRAMES frames: two prompts, then the same latents with 'empty prompt'
    embeddings; keep-mask with prompt lengths 5, 8 and 1 for the empty prompt."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, FRAMES, SIZE, SIZE, generator=g)
    t = torch.tensor([17, 803])
    cond, uncond = torch.randn(2, TOKENS, TEXT_CH, generator=g), torch.randn(1, TOKENS, TEXT_CH, generator=g)
    mask = torch.zeros(4, TOKENS)
    mask[0, :5], mask[1, :], mask[2:, :1] = 1, 1, 1
    return dict(x=torch.cat([x, x]), t=torch.cat([t, t]), y=torch.cat([cond, uncond, uncond]), mask=mask)


def _torch_out(model, inp, masked: bool, temporal: bool = True) -> np.ndarray:
    # diffusers Latte passes encoder_attention_mask unchanged to its per-frame blocks, so it takes
    # the additive bias form [N·F, 1, L] (its pipeline passes no mask at all).
    bias = ((1 - inp["mask"]) * -10000.0).repeat_interleave(FRAMES, 0)[:, None] if masked else None
    with torch.no_grad():
        return model(inp["x"], timestep=inp["t"], encoder_hidden_states=inp["y"], encoder_attention_mask=bias,
                     enable_temporal_attentions=temporal).sample.numpy()


@functools.partial(jax.jit, static_argnums=(0, 5))
def _apply(cfg, params, x, t, y, temporal, mask):
    return Latte(cfg).apply({"params": params}, x, t, y, mask, temporal)


def _jax_out(cfg, params, inp, masked: bool, temporal: bool = True) -> np.ndarray:
    """masked=False keeps every token (an all-ones mask: the same compiled function as masked)."""
    j = {k: jnp.asarray(v.numpy()) for k, v in inp.items()}
    mask = j["mask"] if masked else jnp.ones_like(j["mask"])
    return np.asarray(_apply(cfg, params, j["x"], j["t"], j["y"], temporal, mask))


@functools.lru_cache(maxsize=None)
def _converted():
    model = _model()
    return convert_latte(_numpy_sd(model), dict(model.config))


# ---------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("temporal", [True, False], ids=["temporal", "spatial-only"])
def test_parity_with_diffusers_cfg_batch(temporal):
    model, inp = _model(), _inputs()
    cfg, params = _converted()
    assert (cfg.hidden_size, cfg.depth, cfg.video_length, cfg.num_heads, cfg.norm_eps) == (64, LAYERS, 3, 4, 1e-6)
    for masked in (False, True):
        ref, out = _torch_out(model, inp, masked, temporal), _jax_out(cfg, params, inp, masked, temporal)
        delta = float(np.max(np.abs(out - ref)))
        print(f"Latte {'temporal' if temporal else 'spatial-only'} {'masked' if masked else 'unmasked'}: "
              f"max |Δ| vs diffusers = {delta:.2e} (max |out| {np.max(np.abs(ref)):.2f})")
        assert out.shape == (4, 8, FRAMES, SIZE, SIZE)
        assert delta <= TOL
    ref = _torch_out(model, inp, masked=True, temporal=temporal)
    assert float(np.max(np.abs(ref[:2] - ref[2:]))) > 1e-2  # the text conditioning matters
    assert float(np.max(np.abs(ref - _torch_out(model, inp, False, temporal)))) > 1e-2  # so does the mask


def test_temporal_blocks_mix_frames():
    cfg, params = _converted()
    inp = _inputs()
    changed = {**inp, "x": inp["x"].clone()}
    changed["x"][:, :, 2] += 1.0  # perturb the last frame only
    for temporal in (True, False):
        d = np.abs(_jax_out(cfg, params, changed, True, temporal) - _jax_out(cfg, params, inp, True, temporal))
        first_frame = float(np.max(d[:, :, 0]))
        assert (first_frame > 1e-3) if temporal else (first_frame < 1e-6)
        assert float(np.max(d[:, :, 2])) > 1e-3


# ---------------------------------------------------------------------------------- conversion


def test_missing_and_misshaped_keys_named_together():
    sd = _numpy_sd(_model())
    cfg, _ = _converted()
    drop, bad = "temporal_transformer_blocks.1.attn1.to_v.bias", "transformer_blocks.0.attn2.to_k.weight"
    del sd[drop]
    sd[bad] = sd[bad][:-1]
    sd["temporal_transformer_blocks.0.attn2.to_q.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_latte(sd, cfg)
    msg = str(e.value)
    assert f"missing key {drop}" in msg and f"mis-shaped key {bad}: expected (64, 64), got (63, 64)" in msg
    assert "unexpected key temporal_transformer_blocks.0.attn2.to_q.weight" in msg


def test_diffusers_folder_round_trip(tmp_path):
    from converters import load_state_dict

    cfg, params = _converted()
    _model().save_pretrained(tmp_path)
    cfg_f, params_f = convert_latte(load_state_dict(tmp_path))
    assert cfg_f == cfg
    for u, v in zip(jax.tree_util.tree_leaves(params_f), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_config_inferred_from_shapes_and_buffers():
    model = _model()
    cfg, params = _converted()
    sd = _numpy_sd(model)
    sd["temp_pos_embed"] = model.temp_pos_embed.numpy()  # non-persistent: present only if saved by hand
    cfg_i, params_i = convert_latte(sd, num_heads=HEADS, sample_size=SIZE)
    assert cfg_i == cfg
    for u, v in zip(jax.tree_util.tree_leaves(params_i), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    from jaxdq.models.latte import temporal_pos_embed

    np.testing.assert_allclose(temporal_pos_embed(64, FRAMES), sd["temp_pos_embed"][0], atol=1e-6)
    with pytest.raises(ConversionError, match="sample_size cannot be inferred"):
        convert_latte(sd, num_heads=HEADS)
    with pytest.raises(ConversionError, match="not a diffusers LatteTransformer3DModel"):
        convert_latte({k: v for k, v in sd.items() if not k.startswith("temporal")}, cfg)
    with pytest.raises(ConversionError, match="activation_fn='geglu'"):
        convert_latte(sd, {**model.config, "activation_fn": "geglu"})


# ---------------------------------------------------------------------------------- structure


def test_param_tree_and_roles():
    cfg = LatteConfig(sample_size=SIZE, hidden_size=64, depth=2, num_heads=4, caption_channels=TEXT_CH,
                      video_length=FRAMES)
    shapes = jax.eval_shape(lambda k: init_latte(cfg, k), jax.random.PRNGKey(0))
    assert "attn2" not in shapes["temporal_blocks_1"] and "attn2" in shapes["blocks_1"]
    assert shapes["temporal_blocks_0"]["scale_shift_table"].shape == (6, 64)
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            seen["/".join(context.module.scope.path)] = context.module.role
        return next_fun(*args, **kwargs)

    x = jnp.zeros((1, 4, FRAMES, SIZE, SIZE))
    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: Latte(cfg).apply({"params": p}, x, jnp.zeros(1), jnp.zeros((1, 3, TEXT_CH))),
                       shapes)
    assert seen == layer_roles(cfg) and set(seen.values()) <= set(ROLES)
    assert seen["temporal_blocks_1/attn1/qkv"] == "temporal-attn" and seen["blocks_1/attn1/qkv"] == "self-attn"
    assert seen["blocks_0/attn2/kv"] == "cross-attn:kv" and seen["blocks_0/attn2/q"] == "cross-attn"
    kernels = {"/".join(k.key for k in path[:-1]) for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]
               if path[-1].key == "kernel"}
    assert kernels == set(seen)
    out = jax.eval_shape(lambda p: Latte(cfg).apply({"params": p}, x.astype(jnp.bfloat16), jnp.zeros(1),
                                                    jnp.zeros((1, 3, TEXT_CH)), jnp.ones((1, 3))), shapes)
    assert out.shape == (1, 8, FRAMES, SIZE, SIZE) and out.dtype == jnp.bfloat16


def test_latte1_config_and_parameter_count():
    cfg = latte_config("Latte-1")
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.sample_size, cfg.video_length,
            cfg.caption_channels) == (1152, 28, 16, 64, 16, 4096)
    dconf = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                 cross_attention_dim=1152, sample_size=64, patch_size=2, caption_channels=4096, video_length=16,
                 **PIXART_BLOCK)
    assert LatteConfig.from_diffusers(dconf) == cfg
    ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda k: init_latte(cfg, k), jax.random.PRNGKey(0))))
    try:
        with torch.device("meta"):
            ref = diffusers.LatteTransformer3DModel(**dconf)
    except Exception as err:  # pragma: no cover - old torch without device contexts
        pytest.skip(f"cannot build diffusers Latte on the meta device: {err}")
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"Latte-1 parameters: jaxdq {ours:,}, diffusers {n_ref:,}")
    assert ours == n_ref
