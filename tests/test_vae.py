"""Flax AutoencoderKL vs diffusers: encode / decode parity at a small random config,
converter strictness and legacy attention names, the SD VAE's key layout."""
import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="VAE parity tests need PyTorch")
diffusers = pytest.importorskip("diffusers", reason="VAE parity tests need diffusers")
from _torch_init import randomize_  # noqa: E402

from converters.dit import ConversionError  # noqa: E402
from converters.unet import expected_keys  # noqa: E402
from converters.vae import convert_vae  # noqa: E402
from jaxdq.models.vae import (SD_VAE, VAE_CONFIGS, VAEConfig, layer_roles, vae_decode, vae_encode,  # noqa: E402
                              vae_param_shapes)

TOL = 1e-4
SIZE = 16


@functools.lru_cache(maxsize=None)
def vae_model():
    torch.manual_seed(0)
    m = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=SIZE)
    return randomize_(m, 5)


def numpy_sd(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def converted():
    model = vae_model()
    return convert_vae(numpy_sd(model), dict(model.config))


def test_encode_parity_with_diffusers():
    model = vae_model()
    cfg, params = converted()
    assert (cfg.block_out_channels, cfg.norm_num_groups, cfg.scaling_factor) == ((32, 64), 8, 0.18215)
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        dist = model.encode(x).latent_dist
    mean, logvar = vae_encode(params, jnp.asarray(x.numpy()), cfg)
    assert mean.shape == logvar.shape == (4, 4, SIZE // 2, SIZE // 2)
    dm = float(np.max(np.abs(np.asarray(mean) - dist.mean.numpy())))
    dl = float(np.max(np.abs(np.asarray(logvar) - dist.logvar.numpy())))
    print(f"VAE encode max |Δ| vs diffusers: mean {dm:.2e}, logvar {dl:.2e} (mean std {dist.mean.std():.2f})")
    assert dist.mean.std() > 0.1 and dist.logvar.std() > 0.1
    assert dm <= TOL and dl <= TOL


def test_decode_parity_with_diffusers():
    model = vae_model()
    cfg, params = converted()
    z = torch.randn(4, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.decode(z).sample.numpy()
    out = np.asarray(vae_decode(params, jnp.asarray(z.numpy()), cfg))
    assert out.shape == (4, 3, SIZE, SIZE)
    delta = float(np.max(np.abs(out - ref)))
    print(f"VAE decode max |Δ| vs diffusers: {delta:.2e} (output std {ref.std():.2f})")
    assert ref.std() > 0.1
    assert delta <= TOL


def test_legacy_attention_names_convert_identically():
    model = vae_model()
    sd = numpy_sd(model)
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{names[m.group(1)]}.", k): v
              for k, v in sd.items()}
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    # the original LDM autoencoder's attention projections are 1x1 convs [out, in, 1, 1]
    w = legacy["decoder.mid_block.attentions.0.value.weight"]
    legacy["decoder.mid_block.attentions.0.value.weight"] = w[:, :, None, None]
    assert "decoder.mid_block.attentions.0.key.bias" in legacy
    _, a = convert_vae(sd, dict(model.config))
    _, b = convert_vae(legacy, dict(model.config))
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (_, u), (_, v) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_conversion_error_names_every_bad_key():
    model = vae_model()
    sd = numpy_sd(model)
    sd.pop("decoder.up_blocks.0.upsamplers.0.conv.bias")
    sd["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)  # a 1x1 conv
    with pytest.raises(ConversionError) as e:
        convert_vae(sd, dict(model.config))
    msg = str(e.value)
    assert "missing key decoder.up_blocks.0.upsamplers.0.conv.bias" in msg
    assert "mis-shaped key quant_conv.weight: expected (8, 8, 1, 1), got (8, 8, 3, 3)" in msg
    assert "AutoencoderKL" in msg.splitlines()[0]


def test_sd_vae_key_layout_matches_diffusers():
    conf = {k: v for k, v in VAE_CONFIGS["sd-vae"].items() if not k.startswith("_")}
    with torch.device("meta"):
        model = diffusers.AutoencoderKL(**conf)
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert VAEConfig.from_diffusers(dict(model.config)) == SD_VAE
    assert VAEConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(SD_VAE)))) == SD_VAE
    assert expected_keys(vae_param_shapes(SD_VAE)) == ref
    assert sum(int(np.prod(s)) for s in ref.values()) == 83_653_863
    roles = layer_roles(SD_VAE)
    linears = {p: r for p, r in roles.items() if not p.endswith(("conv", "conv1", "conv2", "conv_shortcut",
                                                                   "conv_in", "conv_out", "quant_conv"))}
    assert linears == {f"{part}/mid_block/attentions_0/{n}": "self-attn"
                       for part in ("encoder", "decoder") for n in ("to_q", "to_k", "to_v", "to_out_0")}
    convs = {p: r for p, r in roles.items() if p not in linears}
    assert len(convs) == sum(k.endswith(".weight") and len(v) == 4 for k, v in ref.items())
    assert set(convs.values()) == {"other"}  # the VAE's convs: no recipe's conv rule selects them


def test_unsupported_vae_config_is_refused():
    with pytest.raises(ValueError, match="norm_type='spatial'"):
        VAEConfig.from_diffusers(dict(VAE_CONFIGS["sd-vae"], norm_type="spatial"))
