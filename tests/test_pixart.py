"""PixArt-α/Σ in Flax: parity with diffusers PixArtTransformer2DModel (both checkpoint layouts),
conversion strictness, param tree / roles, named configs and the real PixArt-Σ parameter count."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PixArt parity tests need PyTorch")
diffusers = pytest.importorskip("diffusers", reason="PixArt parity tests need diffusers")

from converters.dit import ConversionError  # noqa: E402
from converters.pixart import convert_pixart  # noqa: E402
from jaxdq.models.pixart import (PIXART_CONFIGS, PixArt, PixArtConfig, init_pixart, layer_roles,  # noqa: E402
                                 pixart_config)
from jaxdq.nn import ROLES, Linear  # noqa: E402

HEADS, HEAD_DIM, LAYERS, SIZE, TEXT_CH, TOKENS = 4, 18, 2, 8, 32, 8  # D = 72: divisible by 3 and 4
TOL = 1e-4

# (use_additional_conditions, interpolation_scale, latent H × W): the Σ / α-512 setting at its own
# size, and the α-1024 setting (micro-conditions, scale 2) at a non-square size (rescaled positions).
SETTINGS = {"sigma-like": (False, None, (SIZE, SIZE)), "alpha1024-like": (True, 2, (SIZE, 12))}


@functools.lru_cache(maxsize=None)
def _model(setting: str):
    """Small PixArtTransformer2DModel with every parameter (scale_shift_tables included) N(0, 0.1²)."""
    uac, scale, _ = SETTINGS[setting]
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=LAYERS,
        cross_attention_dim=HEADS * HEAD_DIM, sample_size=SIZE, patch_size=2, caption_channels=TEXT_CH,
        use_additional_conditions=uac, interpolation_scale=scale).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def _numpy_sd(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _inputs(setting: str) -> dict:
    """CFG batch of 4: two prompts, then the same latents/timesteps with 'empty prompt' embeddings;
    keep-masks as a T5 tokenizer gives them (prompt lengths 5 and 8, the empty prompt 1 token)."""
    uac, _, (h, w) = SETTINGS[setting]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, h, w, generator=g)
    t = torch.tensor([17, 803])
    cond, uncond = torch.randn(2, TOKENS, TEXT_CH, generator=g), torch.randn(1, TOKENS, TEXT_CH, generator=g)
    mask = torch.zeros(4, TOKENS)
    mask[0, :5], mask[1, :], mask[2:, :1] = 1, 1, 1
    out = dict(x=torch.cat([x, x]), t=torch.cat([t, t]), y=torch.cat([cond, uncond, uncond]), mask=mask)
    if uac:
        out["resolution"] = torch.tensor([[8.0 * h, 8.0 * w]]).repeat(4, 1)
        out["aspect_ratio"] = torch.tensor([[h / w]]).repeat(4, 1)
    return out


def _torch_out(model, inp: dict, masked: bool = True) -> np.ndarray:
    extra = {}
    if "resolution" in inp:
        extra["added_cond_kwargs"] = {"resolution": inp["resolution"], "aspect_ratio": inp["aspect_ratio"]}
    with torch.no_grad():
        return model(inp["x"], encoder_hidden_states=inp["y"], timestep=inp["t"],
                     encoder_attention_mask=inp["mask"] if masked else None, **extra).sample.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg: PixArtConfig, params, x, t, y, mask, resolution, aspect_ratio):
    return PixArt(cfg).apply({"params": params}, x, t, y, mask, resolution, aspect_ratio)


def _jax_out(cfg, params, inp: dict, masked: bool = True) -> np.ndarray:
    """masked=False keeps every token (an all-ones mask: the same compiled function as masked)."""
    j = {k: jnp.asarray(v.numpy()) for k, v in inp.items()}
    mask = j["mask"] if masked else jnp.ones_like(j["mask"])
    return np.asarray(_apply(cfg, params, j["x"], j["t"], j["y"], mask, j.get("resolution"), j.get("aspect_ratio")))


def to_original_state_dict(sd: dict, depth: int = LAYERS) -> dict:
    """diffusers PixArt keys → PixArt-alpha/sigma repo keys (q/k/v → attn.qkv, k/v → cross_attn.kv_linear)."""
    ren = {"pos_embed.proj": "x_embedder.proj", "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
           "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
           "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
           "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
           "adaln_single.linear": "t_block.1", "caption_projection.linear_1": "y_embedder.y_proj.fc1",
           "caption_projection.linear_2": "y_embedder.y_proj.fc2", "proj_out": "final_layer.linear"}
    out = {"final_layer.scale_shift_table": sd["scale_shift_table"]}
    for i in range(depth):
        s, b = f"transformer_blocks.{i}.", f"blocks.{i}."
        ren.update({s + "attn1.to_out.0": b + "attn.proj", s + "attn2.to_q": b + "cross_attn.q_linear",
                    s + "attn2.to_out.0": b + "cross_attn.proj", s + "ff.net.0.proj": b + "mlp.fc1",
                    s + "ff.net.2": b + "mlp.fc2"})
        out[b + "scale_shift_table"] = sd[s + "scale_shift_table"]
        for w in ("weight", "bias"):
            out[f"{b}attn.qkv.{w}"] = np.concatenate([sd[f"{s}attn1.to_{n}.{w}"] for n in "qkv"])
            out[f"{b}cross_attn.kv_linear.{w}"] = np.concatenate([sd[f"{s}attn2.to_{n}.{w}"] for n in "kv"])
    for src, dst in ren.items():
        for w in ("weight", "bias"):
            if f"{src}.{w}" in sd:
                out[f"{dst}.{w}"] = sd[f"{src}.{w}"]
    return out


def _leaves_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# ---------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_parity_with_diffusers_cfg_batch_with_mask(setting):
    model, inp = _model(setting), _inputs(setting)
    cfg, params = convert_pixart(_numpy_sd(model), dict(model.config))
    assert cfg.use_additional_conditions is SETTINGS[setting][0]
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.caption_channels) == (72, LAYERS, HEADS, TEXT_CH)
    for masked in (True, False):
        ref, out = _torch_out(model, inp, masked), _jax_out(cfg, params, inp, masked)
        delta = float(np.max(np.abs(out - ref)))
        print(f"PixArt {setting} {'masked' if masked else 'unmasked'}: max |Δ| vs diffusers = {delta:.2e} "
              f"(max |out| {np.max(np.abs(ref)):.2f})")
        assert out.shape == (4, 8, *SETTINGS[setting][2])
        assert delta <= TOL
    ref = _torch_out(model, inp)
    assert float(np.max(np.abs(ref[:2] - ref[2:]))) > 1e-2  # the text conditioning matters
    assert float(np.max(np.abs(ref - _torch_out(model, inp, masked=False)))) > 1e-2  # and so does the mask


def test_original_layout_gives_same_params_and_output():
    setting = "alpha1024-like"  # has every optional part (micro-conditions)
    model, inp = _model(setting), _inputs(setting)
    sd = _numpy_sd(model)
    cfg_d, params_d = convert_pixart(sd, dict(model.config))
    orig = to_original_state_dict(sd)
    orig["y_embedder.y_embedding"] = np.random.default_rng(0).normal(size=(TOKENS, TEXT_CH)).astype(np.float32)
    cfg_o, params_o = convert_pixart(orig, cfg_d)
    _leaves_equal(params_o, params_d)
    delta = float(np.max(np.abs(_jax_out(cfg_o, params_o, inp) - _torch_out(model, inp))))
    print(f"PixArt original layout: max |Δ| vs diffusers = {delta:.2e}")
    assert delta <= TOL
    # shapes alone: micro-conditioning seen from the csize/ar keys; sample_size must be given
    cfg_i, _ = convert_pixart(orig, sample_size=SIZE, num_heads=HEADS, interpolation_scale=2)
    assert cfg_i == cfg_d
    with pytest.raises(ConversionError, match="sample_size .* cannot be inferred"):
        convert_pixart(orig, num_heads=HEADS)


def test_diffusers_folder_round_trip(tmp_path):
    """save_pretrained folder → load_state_dict (carries config.json) → same config and params."""
    from converters import load_state_dict

    model = _model("alpha1024-like")
    cfg, params = convert_pixart(_numpy_sd(model), dict(model.config))
    model.save_pretrained(tmp_path)
    cfg_f, params_f = convert_pixart(load_state_dict(tmp_path))
    assert cfg_f == cfg
    _leaves_equal(params_f, params)


def test_original_fixed_pos_embed_buffer_is_checked():
    model = _model("sigma-like")
    cfg, params = convert_pixart(_numpy_sd(model), dict(model.config))
    orig = to_original_state_dict(_numpy_sd(model))
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    g = SIZE // 2
    orig["pos_embed"] = get_2d_sincos_pos_embed(72, g, base_size=g).float()[None].numpy()
    cfg_i, params_i = convert_pixart(orig, num_heads=HEADS)  # sample_size read off the buffer
    assert cfg_i == cfg
    _leaves_equal(params_i, params)
    orig["pos_embed"] = orig["pos_embed"] * 1.5
    with pytest.raises(ConversionError, match="pos_embed is not the 2D sin-cos"):
        convert_pixart(orig, cfg)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_missing_misshaped_unexpected_keys_named_together(layout):
    model = _model("sigma-like")
    sd = _numpy_sd(model)
    cfg, _ = convert_pixart(sd, dict(model.config))
    if layout == "original":
        sd = to_original_state_dict(sd)
        drop, bad = "blocks.1.cross_attn.kv_linear.bias", "blocks.0.attn.qkv.weight"
    else:
        drop, bad = "transformer_blocks.1.attn2.to_k.bias", "transformer_blocks.0.attn1.to_q.weight"
    del sd[drop]
    sd[bad] = sd[bad][:, :-1]
    sd["blocks_9.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as e:
        convert_pixart(sd, cfg)
    msg = str(e.value)
    assert f"missing key {drop}" in msg and f"mis-shaped key {bad}" in msg
    assert "unexpected key blocks_9.extra.weight" in msg
    assert e.value.missing == [drop] and [m[0] for m in e.value.mismatched] == [bad]


def test_unsupported_config_json_is_refused():
    model = _model("sigma-like")
    dconf = {**model.config, "norm_elementwise_affine": True}
    with pytest.raises(ConversionError, match="norm_elementwise_affine=True"):
        convert_pixart(_numpy_sd(model), dconf)


# ---------------------------------------------------------------------------------- model only


def test_dropped_text_tokens_do_not_matter():
    setting = "sigma-like"
    cfg, params = convert_pixart(_numpy_sd(_model(setting)), dict(_model(setting).config))
    inp = _inputs(setting)
    base = _jax_out(cfg, params, inp)
    for keep, expect_change in ((False, False), (True, True)):
        changed = {**inp, "y": inp["y"].clone()}
        changed["y"][0, 6:] += 3.0  # tokens 6, 7 of prompt 0 (mask keeps 0..4)
        if keep:
            changed["mask"] = inp["mask"].clone()
            changed["mask"][0, 6:] = 1
        delta = float(np.max(np.abs(_jax_out(cfg, params, changed)[0] - base[0])))
        assert (delta > 1e-3) if expect_change else (delta < 1e-6)


def test_param_tree_and_roles():
    for uac in (False, True):
        cfg = PixArtConfig(sample_size=SIZE, hidden_size=72, depth=2, num_heads=4, caption_channels=TEXT_CH,
                           use_additional_conditions=uac)
        shapes = jax.eval_shape(lambda k: init_pixart(cfg, k), jax.random.PRNGKey(0))
        b = shapes["blocks_1"]
        assert b["attn1"]["qkv"]["kernel"].shape == (72, 216) and b["attn2"]["kv"]["kernel"].shape == (72, 144)
        assert b["scale_shift_table"].shape == (6, 72) and shapes["final_layer"]["scale_shift_table"].shape == (2, 72)
        assert shapes["caption_projection"]["fc1"]["kernel"].shape == (TEXT_CH, 72)
        assert ("resolution_embedder" in shapes["adaln_single"]) is uac
        seen = {}

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, Linear) and context.method_name == "__call__":
                seen["/".join(context.module.scope.path)] = context.module.role
            return next_fun(*args, **kwargs)

        x = jnp.zeros((1, 4, SIZE, SIZE))
        cond = (jnp.ones((1, 2)), jnp.ones((1, 1))) if uac else (None, None)
        with nn.intercept_methods(record):
            jax.eval_shape(lambda p: PixArt(cfg).apply({"params": p}, x, jnp.zeros(1), jnp.zeros((1, 3, TEXT_CH)),
                                                       None, *cond), shapes)
        assert seen == layer_roles(cfg) and set(seen.values()) <= set(ROLES)
        kernels = {"/".join(k.key for k in path[:-1]) for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]
                   if path[-1].key == "kernel"}
        assert kernels == set(seen)
        out = jax.eval_shape(lambda p: PixArt(cfg).apply({"params": p}, x.astype(jnp.bfloat16), jnp.zeros(1),
                                                         jnp.zeros((1, 3, TEXT_CH)), jnp.ones((1, 3)), *cond), shapes)
        assert out.shape == (1, 8, SIZE, SIZE) and out.dtype == jnp.bfloat16


def test_named_configs_and_config_json():
    sigma = pixart_config("PixArt-Σ-1024")
    assert sigma == pixart_config("PixArt-sigma-1024")
    assert (sigma.hidden_size, sigma.depth, sigma.num_heads, sigma.patch_size, sigma.in_channels,
            sigma.out_channels, sigma.caption_channels, sigma.max_text_tokens) == (1152, 28, 16, 2, 4, 8, 4096, 300)
    assert pixart_config("PixArt-α-1024").use_additional_conditions and not sigma.use_additional_conditions
    assert pixart_config("PixArt-alpha-512").pe_scale == 1.0 and sigma.pe_scale == 2.0
    assert {c["max_text_tokens"] for n, c in PIXART_CONFIGS.items() if "alpha" in n} == {120}
    # the released PixArt-XL-2-1024-MS transformer config.json (Transformer2DModel era): diffusers'
    # defaults give micro-conditions and interpolation scale 2 from sample_size 128
    alpha_json = {"_class_name": "Transformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
                  "attention_head_dim": 72, "attention_type": "default", "caption_channels": 4096,
                  "cross_attention_dim": 1152, "double_self_attention": False, "in_channels": 4,
                  "norm_elementwise_affine": False, "norm_eps": 1e-6, "norm_type": "ada_norm_single",
                  "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28,
                  "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 128}
    assert PixArtConfig.from_diffusers(alpha_json, max_text_tokens=120) == pixart_config("PixArt-alpha-1024")
    with pytest.raises(ValueError, match="unknown PixArt config"):
        pixart_config("PixArt-delta")


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_pixart_sigma_parameter_count_matches_diffusers():
    cfg = pixart_config("PixArt-Σ-1024")
    ours = _count(jax.eval_shape(lambda k: init_pixart(cfg, k), jax.random.PRNGKey(0)))
    try:
        with torch.device("meta"):
            ref = diffusers.PixArtTransformer2DModel(
                num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                cross_attention_dim=1152, sample_size=128, patch_size=2, caption_channels=4096,
                use_additional_conditions=False, interpolation_scale=2)
    except Exception as err:  # pragma: no cover - old torch without device contexts
        pytest.skip(f"cannot build diffusers PixArt on the meta device: {err}")
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"PixArt-Σ-1024 parameters: jaxdq {ours:,}, diffusers {n_ref:,}")
    assert ours == n_ref
