"""Flax UNet2DModel / UNet2DConditionModel vs diffusers: parity at small random configs,
converter strictness, legacy attention names, role tags, the released configs' key layout."""
import dataclasses
import functools
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="UNet parity tests need PyTorch")
diffusers = pytest.importorskip("diffusers", reason="UNet parity tests need diffusers")
from _torch_init import randomize_  # noqa: E402

from converters.dit import ConversionError  # noqa: E402
from converters.unet import convert_unet, expected_keys  # noqa: E402
from jaxdq.models.unet import (TIME_EMBEDDING_PATTERN, UNET_CONFIGS, UNet, UNetConfig, layer_roles,  # noqa: E402
                               unet_config, unet_param_shapes)
from jaxdq.nn import Conv, Linear  # noqa: E402

TOL = 1e-4
SIZE, TOKENS, CROSS = 16, 8, 32
TIMESTEPS = [3, 250, 640, 999]  # one per sample of the batch of 4


def numpy_sd(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def ddpm_model():
    torch.manual_seed(0)
    m = diffusers.UNet2DModel(
        sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8, norm_eps=1e-6, attention_head_dim=16, downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1.5)
    return randomize_(m, 1)


@functools.lru_cache(maxsize=None)
def sd_model(linear: bool):
    torch.manual_seed(0)
    m = diffusers.UNet2DConditionModel(
        sample_size=SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=CROSS, attention_head_dim=4,
        use_linear_projection=linear, transformer_layers_per_block=2 if linear else 1)
    return randomize_(m, 2 + linear)


def cfg_batch(channels: int):
    """Batch 4: two noise samples twice (conditional, then unconditional text states), 4 timesteps."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, channels, SIZE, SIZE, generator=g)
    cond = torch.randn(2, TOKENS, CROSS, generator=g)
    uncond = torch.randn(1, TOKENS, CROSS, generator=g).expand(2, -1, -1)
    return torch.cat([x, x]), torch.tensor(TIMESTEPS), torch.cat([cond, uncond])


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg: UNetConfig, params, x, t, ctx):
    return UNet(cfg).apply({"params": params}, x, t, ctx)


def jax_out(cfg, params, x, t, ctx=None):
    to_j = lambda a: None if a is None else jnp.asarray(a.numpy())  # noqa: E731
    return np.asarray(_apply(cfg, params, to_j(x), to_j(t), to_j(ctx)))


# ---------------------------------------------------------------------------------- parity


def test_unet2d_parity_with_diffusers():
    model = ddpm_model()
    cfg, params = convert_unet(numpy_sd(model), dict(model.config))
    assert cfg.model_type == "UNet2DModel" and cfg.attention_head_dim == 16
    x, t, _ = cfg_batch(3)
    with torch.no_grad():
        ref = model(x, t).sample.numpy()
    out = jax_out(cfg, params, x, t)
    delta = float(np.max(np.abs(out - ref)))
    print(f"UNet2DModel max |Δ| vs diffusers: {delta:.2e} (output std {ref.std():.2f})")
    assert ref.std() > 0.1
    assert delta <= TOL
    # same noise, different timesteps: the time embedding matters
    assert float(np.max(np.abs(ref[:2] - ref[2:]))) > 1e-2


@pytest.mark.parametrize("linear", [False, True], ids=["conv-proj", "linear-proj-2-layers"])
def test_unet2d_condition_parity_with_diffusers(linear):
    model = sd_model(linear)
    cfg, params = convert_unet(numpy_sd(model), dict(model.config))
    assert cfg.num_attention_heads == (4, 4) and cfg.use_linear_projection is linear
    x, t, ctx = cfg_batch(4)
    with torch.no_grad():
        ref = model(x, t, encoder_hidden_states=ctx).sample.numpy()
    out = jax_out(cfg, params, x, t, ctx)
    delta = float(np.max(np.abs(out - ref)))
    print(f"UNet2DConditionModel ({'linear' if linear else 'conv'} proj) max |Δ| vs diffusers: {delta:.2e} "
          f"(output std {ref.std():.2f})")
    assert ref.std() > 0.1
    assert delta <= TOL
    # the text states matter
    assert float(np.max(np.abs(jax_out(cfg, params, x, t, torch.zeros_like(ctx)) - out))) > 1e-2
    kernel = params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"]
    assert kernel.ndim == (2 if linear else 4)


# ---------------------------------------------------------------------------------- converter


def test_legacy_attention_names_convert_identically():
    model = ddpm_model()
    sd = numpy_sd(model)
    legacy = {}
    for k, v in sd.items():
        k2 = re.sub(r"\.to_q\.", ".query.", k)
        k2 = re.sub(r"\.to_k\.", ".key.", k2)
        k2 = re.sub(r"\.to_v\.", ".value.", k2)
        k2 = re.sub(r"\.to_out\.0\.", ".proj_attn.", k2)
        legacy[k2] = v
    assert "mid_block.attentions.0.proj_attn.weight" in legacy and "down_blocks.1.attentions.0.query.bias" in legacy
    _, a = convert_unet(sd, dict(model.config))
    _, b = convert_unet(legacy, dict(model.config))
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (_, u), (_, v) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_conversion_error_names_every_bad_key():
    model = sd_model(False)
    sd = numpy_sd(model)
    sd.pop("down_blocks.0.resnets.0.time_emb_proj.bias")
    k_bad = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    sd[k_bad] = np.zeros((32, 7), np.float32)  # in-features should be cross_attention_dim = 32
    sd["down_blocks.0.resnets.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as e:
        convert_unet(sd, dict(model.config))
    msg = str(e.value)
    assert "missing key down_blocks.0.resnets.0.time_emb_proj.bias" in msg
    assert f"mis-shaped key {k_bad}: expected (32, 32), got (32, 7)" in msg
    assert "unexpected key down_blocks.0.resnets.0.extra.weight" in msg
    assert "UNet2DConditionModel" in msg.splitlines()[0]
    assert e.value.missing == ["down_blocks.0.resnets.0.time_emb_proj.bias"]


def test_unsupported_config_is_refused():
    conf = dict(UNET_CONFIGS["sd-1.5"], addition_embed_type="text_time", resnet_time_scale_shift="scale_shift")
    with pytest.raises(ValueError, match="resnet_time_scale_shift=.scale_shift.*addition_embed_type=.text_time."):
        UNetConfig.from_diffusers(conf)
    with pytest.raises(ConversionError, match="config is needed"):
        convert_unet(numpy_sd(ddpm_model()))


# ---------------------------------------------------------------------------------- roles


def _called_roles(cfg, params, *args) -> dict:
    """``{path: role}`` of every Linear and Conv the forward pass calls."""
    seen = {}

    def record(next_fun, args_, kwargs, context):
        if isinstance(context.module, (Linear, Conv)):
            seen["/".join(context.module.path)] = context.module.role
        return next_fun(*args_, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: UNet(cfg).apply({"params": p}, *args), params)  # trace only
    return seen


def test_layer_roles_match_the_modules_and_select_temporal_layers():
    model = sd_model(True)
    cfg, params = convert_unet(numpy_sd(model), dict(model.config))
    x = jnp.zeros((1, 4, 8, 8))
    called = _called_roles(cfg, params, x, jnp.array([1]), jnp.zeros((1, 3, CROSS)))
    assert layer_roles(cfg) == called == layer_roles(params)
    temporal = {p for p in called if re.search(TIME_EMBEDDING_PATTERN, p)}
    assert temporal == {p for p, r in called.items() if r == "time-embedding"}
    n_resnets = sum(k.endswith("time_emb_proj.weight") for k in model.state_dict())
    assert len(temporal) == 2 + n_resnets == 2 + 2 + 2 + 2 * 2  # timestep MLP + down + mid + up resnets
    assert called["down_blocks_0/attentions_0/transformer_blocks_1/attn2/to_k"] == "cross-attn:kv"  # reads text
    assert called["down_blocks_0/attentions_0/transformer_blocks_1/attn2/to_q"] == "cross-attn"
    assert called["up_blocks_1/attentions_1/transformer_blocks_0/attn1/to_out_0"] == "self-attn"
    assert called["mid_block/attentions_0/transformer_blocks_0/ff/net_0/proj"] == "ffn"
    assert called["down_blocks_0/attentions_0/proj_in"] == "other"
    # convs: first and last kept for the float rule, the rest selectable by role "conv"
    assert called["conv_in"] == "embedding" and called["conv_out"] == "final"
    assert called["down_blocks_0/resnets_0/conv1"] == "conv" and called["up_blocks_1/resnets_0/conv2"] == "conv"
    assert called["up_blocks_1/resnets_0/conv_shortcut"] == "conv:shortcut"
    assert called["down_blocks_0/downsamplers_0/conv"] == "conv:resample"
    assert called["up_blocks_0/upsamplers_0/conv"] == "conv:resample"


def test_unet2d_roles():
    cfg = UNetConfig.from_diffusers(dict(ddpm_model().config))
    roles = layer_roles(cfg)
    assert roles["down_blocks_1/attentions_0/to_q"] == "self-attn"
    assert roles["mid_block/resnets_1/time_emb_proj"] == "time-embedding"
    assert roles["conv_in"] == "embedding" and roles["conv_out"] == "final"
    assert set(roles.values()) == {"self-attn", "time-embedding", "embedding", "final", "conv", "conv:shortcut",
                                   "conv:resample"}


# ---------------------------------------------------------------------------------- released configs


@pytest.mark.parametrize("name,cls,n_params", [("ddpm-cifar10-32", "UNet2DModel", 35_746_307),
                                               ("sd-1.5", "UNet2DConditionModel", 859_520_964)])
def test_released_config_key_layout_matches_diffusers(name, cls, n_params):
    """Every key and shape of the real model (built on torch's meta device: no memory)."""
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**{k: v for k, v in UNET_CONFIGS[name].items() if not k.startswith("_")})
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cfg = unet_config(name)
    assert UNetConfig.from_diffusers(dict(model.config)) == cfg  # the full config, defaults included
    assert UNetConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg  # checkpoint metadata
    assert expected_keys(unet_param_shapes(cfg)) == ref
    assert sum(int(np.prod(s)) for s in ref.values()) == n_params
