"""`jaxdq convert --model FAMILY PATH` on diffusers folders written by save_pretrained (tiny random models):
the reloaded checkpoint holds exactly the converter's params, and bad checkpoints fail naming the keys."""
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed to build the reference checkpoints")
diffusers = pytest.importorskip("diffusers", reason="diffusers is needed to build the reference checkpoints")

from jaxdq.cli import main  # noqa: E402
from jaxdq.pipeline import load_model  # noqa: E402


def _tiny(family):
    torch.manual_seed(0)
    if family == "pixart":
        return diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                  out_channels=8, num_layers=1, cross_attention_dim=32,
                                                  sample_size=8, patch_size=2, caption_channels=24,
                                                  use_additional_conditions=False)
    if family == "latte":
        return diffusers.LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                 out_channels=8, num_layers=1, cross_attention_dim=32,
                                                 sample_size=8, patch_size=2, caption_channels=24, video_length=2,
                                                 norm_type="ada_norm_single", activation_fn="gelu-approximate",
                                                 attention_bias=True, norm_elementwise_affine=False)
    if family == "unet":
        return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                     norm_num_groups=8, attention_head_dim=8)
    if family == "sd-unet":
        return diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                              norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4)
    if family == "vae":
        return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                       down_block_types=("DownEncoderBlock2D",) * 2,
                                       up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                       norm_num_groups=8, layers_per_block=1)
    if family == "flux":
        return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                                pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    raise AssertionError(family)


def _convert_fn(family):
    import converters

    return {"pixart": converters.convert_pixart, "latte": converters.convert_latte, "unet": converters.convert_unet,
            "sd-unet": converters.convert_unet, "vae": converters.convert_vae, "flux": converters.convert_flux}[family]


@pytest.mark.parametrize("family", ["pixart", "latte", "unet", "sd-unet", "vae", "flux"])
def test_convert_cli_round_trip(family, tmp_path, capsys):
    from converters import load_state_dict

    folder = str(tmp_path / "hf")
    _tiny(family).save_pretrained(folder)
    out = str(tmp_path / "ckpt")
    assert main(["convert", "--model", family, folder, "--out", out]) == 0
    assert "converted" in capsys.readouterr().out
    model = load_model(out)
    assert model.arch == family
    _, ref = _convert_fn(family)(load_state_dict(folder))
    got, want = jax.tree_util.tree_leaves_with_path(model.params), jax.tree_util.tree_leaves_with_path(ref)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (p, a), (_, b) in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))


def test_convert_cli_names_missing_keys_and_wrong_family(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    folder = str(tmp_path / "hf")
    _tiny("unet").save_pretrained(folder)
    # the UNet2DModel checkpoint is not an SD UNet
    assert main(["convert", "--model", "sd-unet", folder, "--out", str(tmp_path / "x")]) == 2
    assert "--model unet" in capsys.readouterr().err
    f = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    sd = load_file(f)
    dropped = "down_blocks.0.resnets.0.time_emb_proj.weight"
    del sd[dropped]
    save_file(sd, f)
    assert main(["convert", "--model", "unet", folder, "--out", str(tmp_path / "y")]) == 2
    assert dropped in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["convert", "--model", "nope", folder, "--out", str(tmp_path / "z")])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
