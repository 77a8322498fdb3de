"""Every calibrating recipe on every model family through the command line.

For PixArt, Latte, FLUX and UNet2D the test writes a tiny random diffusers checkpoint itself
(``save_pretrained``), converts it (``jaxdq convert``), quantizes it with each calibrating recipe
(``jaxdq quantize``: naive-pertensor, per-step-static, rtn, qdiffusion and tfmq-dm — the last two
with BRECQ/TIAR reconstruction at 2 iterations: on the transformers the reconstruction unit is each
``blocks_i`` / ``transformer_blocks_i`` module, :data:`jaxdq.quant.reconstruct.BLOCK_RE` — smoothquant,
vidit-q, vidit-q-mp, svdquant),
samples from the result (``jaxdq sample``), and checks the precision rules by role: the first and
last layers (roles ``embedding``/``final``) stay float everywhere; SVDQuant keeps the embedders,
time embedding and cross-attention K/V float and quantizes adaLN weight-only.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch builds the tiny diffusers checkpoints")
diffusers = pytest.importorskip("diffusers", reason="diffusers builds the tiny diffusers checkpoints")

from _torch_init import randomize_, tiny_diffusers  # noqa: E402
from jaxdq.cli import main  # noqa: E402
from jaxdq.models.sources import load_model  # noqa: E402
from jaxdq.quant.layers import FloatConv, FloatLinear, QConv, QLinear, Segmented, iter_layers  # noqa: E402
from jaxdq.quant.rules import role_matches  # noqa: E402
from jaxdq.viz import read_png  # noqa: E402

#: The reconstruction recipes with tiny iteration counts (the path runs; its numbers are
#: tested in test_reconstruct.py / test_tfmq.py).  qdiffusion and tfmq-dm at the same bits
#: (W4A8): tfmq-dm's BRECQ blocks are then the very programs qdiffusion compiled (the suite's
#: time); 8-bit weights are rtn-w8a8's and the others', AdaRound's codes test_reconstruct's.
RECON = "@iters=2@per_step=1@steps_per_call=2"
RECIPES = ("naive-pertensor-w8a8", "per-step-static-w8a8", "rtn-w8a8", "qdiffusion-w4a8" + RECON,
           "tfmq-dm-w4a8" + RECON, "smoothquant-w8a8", "vidit-q-w8a8", "vidit-q-mp", "svdquant")
FAST = ["--calib-per-class", "1", "--calib-steps", "3"]
#: On the UNet, tfmq-dm runs all of qdiffusion's path (BRECQ + AdaRound, shortcut splitting)
#: and TIAR/FSC besides, so qdiffusion adds no path there and is left out (the suite's time;
#: its table on the default UNet: bench/results/compare_default_unet_h200.json).
SKIP = {"unet": {RECIPES[3]}}


def _model(family):
    return randomize_(tiny_diffusers(family), seed=1)  # every layer matters (diffusers zero-inits some)


def _check_roles(method, model):
    roles = model.roles
    layers = dict(iter_layers(model.params))
    assert set(layers) == set(roles)
    for path, layer in layers.items():
        role = roles[path]
        is_float = isinstance(layer, (FloatLinear, FloatConv))
        if isinstance(layer, (FloatConv, QConv)):  # UNet convs: quantized by the UNet PTQ recipes only
            if role_matches("embedding", role) or role_matches("final", role) or not method.startswith(
                    ("rtn-", "qdiffusion-", "tfmq-dm-", "brecq-", "naive-pertensor-", "per-step-static-")):
                assert is_float, (method, path, role)
            else:
                assert isinstance(layer, QConv) and layer.act is not None, (method, path, role)
            continue
        if role_matches("embedding", role) or role_matches("final", role):
            assert is_float, (method, path, role)
            continue
        if method == "svdquant":
            if role in ("time-embedding", "cross-attn:kv"):
                assert is_float, (path, role)
            elif role == "adaLN":
                assert isinstance(layer, QLinear) and layer.act is None and layer.weight.spec.bits == 4, path
            else:
                assert isinstance(layer, QLinear) and layer.act.spec.bits == 4, (path, role)
                assert layer.transform.smooth is not None
            continue
        if method == "vidit-q-mp":
            assert isinstance(layer, (QLinear, Segmented)), (path, role)
            continue
        assert isinstance(layer, QLinear) and layer.act is not None and layer.act.spec.bits == 8, (method, path)
        if method == "per-step-static-w8a8":
            assert layer.act.t is not None and layer.act.scale.shape == layer.act.t.shape
        if method.startswith(("rtn-", "qdiffusion-")):  # one range over all steps
            assert layer.act.static and layer.act.t is None and layer.weight.spec.granularity == "channel"
        if method.startswith("tfmq-dm-"):  # FSC: per-timestep ranges on the temporal information block only
            assert layer.weight.spec.bits == 4 and (layer.act.t is not None) == (role == "time-embedding"), path
        if method == "naive-pertensor-w8a8":
            assert layer.act.static and layer.weight.spec.granularity == "tensor"
        if method == "vidit-q-w8a8":
            assert layer.transform.smooth is not None and layer.transform.rotation is not None


@pytest.mark.parametrize("family", ["pixart", "latte", "flux", "unet"])
def test_every_calibrating_recipe_quantizes_and_samples(family, tmp_path, capsys):
    folder = str(tmp_path / "hf")
    _model(family).save_pretrained(folder)
    ckpt = str(tmp_path / "float")
    assert main(["convert", "--model", family, folder, "--out", ckpt]) == 0
    float_model = load_model(ckpt)
    roles = float_model.roles
    if family in ("pixart", "latte"):  # the recipes' role rules see the text path
        assert any(r == "cross-attn:kv" for r in roles.values())
    stats = str(tmp_path / "calib.npz")  # one calibration serves every recipe (what each needs is checked)
    assert main(["calibrate", "--model", ckpt, "--out", stats, *FAST]) == 0
    for method in (m for m in RECIPES if m not in SKIP.get(family, ())):
        out = str(tmp_path / method)
        assert main(["quantize", "--method", method, "--model", ckpt, "--out", out, "--calib", stats]) == 0, method
        q = load_model(out)
        assert q.metadata["method"] == method and q.arch == family
        _check_roles(method, q)
        png = str(tmp_path / f"{method}.png")
        assert main(["sample", "--model", out, "--out", png, "--per-class", "1", "--steps", "2",
                     "--classes", "0,1"]) == 0, method
        assert read_png(png).shape[0] > 0
    err = capsys.readouterr().err
    if family in ("pixart", "latte", "flux"):  # no captions given: said so, once per command
        assert "random" in err and "--captions" in err
    else:
        assert "random" not in err


def test_latent_samples_are_labelled_as_latents(tmp_path):
    folder = str(tmp_path / "hf")
    _model("pixart").save_pretrained(folder)
    ckpt = str(tmp_path / "float")
    assert main(["convert", "--model", "pixart", folder, "--out", ckpt]) == 0
    png = str(tmp_path / "s.png")
    assert main(["sample", "--model", ckpt, "--out", png, "--per-class", "2", "--steps", "2",
                 "--classes", "0"]) == 0
    img = read_png(png)
    assert img.ndim == 3 and img.shape[-1] == 3  # channels 0-2 of 4 shown as RGB, with a title saying so
    title_band = img[:20]
    assert (title_band < 128).any()  # dark title text above the grid


def test_text_families_read_caption_files(tmp_path):
    """Caption embeddings from an .npz (states + masks) drive the text-conditioned sampler; a file
    without 'states' is one clear line."""
    folder = str(tmp_path / "hf")
    _model("pixart").save_pretrained(folder)
    ckpt = str(tmp_path / "float")
    assert main(["convert", "--model", "pixart", folder, "--out", ckpt]) == 0
    rng = np.random.default_rng(0)
    caps = str(tmp_path / "caps.npz")
    np.savez(caps, states=rng.normal(size=(2, 5, 24)).astype(np.float32), mask=np.ones((2, 5), np.int32),
             captions=np.array(["a cat", "a dog"]))
    png = str(tmp_path / "s.png")
    assert main(["sample", "--model", ckpt, "--out", png, "--per-class", "1", "--steps", "2",
                 "--captions", caps]) == 0
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, mask=np.ones((2, 5)))
    assert main(["sample", "--model", ckpt, "--out", str(tmp_path / "t.png"), "--captions", bad]) == 2
    assert not os.path.exists(tmp_path / "t.png")


def test_compare_and_demo_on_a_latent_family_decode_through_a_vae(tmp_path):
    """``jaxdq compare``/``demo`` on a converted PixArt checkpoint: with ``--vae`` the samples are
    decoded (3-channel images scored and shown), without it the PNG says it shows latents."""
    import json

    folder = str(tmp_path / "hf")
    _model("pixart").save_pretrained(folder)
    vae = tiny_diffusers("vae")
    vae.save_pretrained(str(tmp_path / "hf_vae"))
    ckpt, vae_ckpt = str(tmp_path / "float"), str(tmp_path / "vae")
    assert main(["convert", "--model", "pixart", folder, "--out", ckpt]) == 0
    assert main(["convert", "--model", "vae", str(tmp_path / "hf_vae"), "--out", vae_ckpt]) == 0
    fast = ["--per-class", "1", "--steps", "2", "--classes", "0,1", "--calib-per-class", "1"]
    out = tmp_path / "cmp"
    assert main(["compare", "--model", ckpt, "--vae", vae_ckpt, "--methods", "vidit-q-w8a8,w4a8", "--out", str(out),
                 *fast]) == 0
    res = json.load(open(out / "compare.json"))
    assert [r["method"] for r in res["results"]] == ["float", "vidit-q-w8a8", "w4a8"]
    assert res["settings"]["family"] == "pixart" and all(r["psnr_db"] is not None for r in res["results"][1:])
    assert not any("latents" in n for n in res["notes"])
    img = read_png(str(out / "compare.png"))
    assert img.ndim == 3 and img.shape[-1] == 3
    out2 = tmp_path / "demo"
    assert main(["demo", "--model", ckpt, "--methods", "w8a8", "--out", str(out2), *fast]) == 0
    assert any("latents" in n for n in json.load(open(out2 / "compare.json"))["notes"])
