"""`jaxdq convert --model FAMILY PATH` on diffusers folders written by save_pretrained (tiny random models):
the reloaded checkpoint holds exactly the converter's params, and bad checkpoints fail naming the keys."""
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed to build the reference checkpoints")
diffusers = pytest.importorskip("diffusers", reason="diffusers is needed to build the reference checkpoints")

from _torch_init import tiny_diffusers  # noqa: E402
from jaxdq.cli import main  # noqa: E402
from jaxdq.models.sources import load_model  # noqa: E402


def _convert_fn(family):
    import converters

    return {"pixart": converters.convert_pixart, "latte": converters.convert_latte, "unet": converters.convert_unet,
            "sd-unet": converters.convert_unet, "vae": converters.convert_vae, "flux": converters.convert_flux}[family]


@pytest.mark.parametrize("family", ["pixart", "latte", "unet", "sd-unet", "vae", "flux"])
def test_convert_cli_round_trip(family, tmp_path, capsys):
    from converters import load_state_dict

    folder = str(tmp_path / "hf")
    tiny_diffusers(family).save_pretrained(folder)
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
    tiny_diffusers("unet").save_pretrained(folder)
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
