"""The LRQ-DiT recipes through the command line on a converted model family.

PixArt (the paper's text-conditioned DiT) × the three recipes: ``jaxdq convert``
a tiny random diffusers checkpoint, ``jaxdq calibrate`` once, ``jaxdq quantize --method
lrq-dit-…`` (orbax export), reload it (typed twin-log weights and rotation nodes, ARS
report in the metadata, first/last layers float by role), ``jaxdq sample`` from the
checkpoint alone (W3A8), and ``jaxdq load`` (its bits column).  Then Latte, FLUX and UNet2D
with one recipe each (quantize, reload, typed nodes by role, one sampling step); the
default DiT is tests/test_lrq_dit.py.
"""
import pytest

torch = pytest.importorskip("torch", reason="torch builds the tiny diffusers checkpoints")
diffusers = pytest.importorskip("diffusers", reason="diffusers builds the tiny diffusers checkpoints")

from _torch_init import randomize_, tiny_diffusers  # noqa: E402
from jaxdq.cli import main  # noqa: E402
from jaxdq.models.sources import load_model  # noqa: E402
from jaxdq.quant.duquant import format_report  # noqa: E402
from jaxdq.quant.layers import FloatLinear, QLinear, iter_layers  # noqa: E402
from jaxdq.quant.rules import role_matches  # noqa: E402
from jaxdq.quant.twinlog import TwinLogWeight  # noqa: E402
from jaxdq.viz import read_png  # noqa: E402

FAMILY = "pixart"
FAST = ["--calib-per-class", "1", "--calib-steps", "3"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lrq")
    folder = str(tmp / "hf")
    randomize_(tiny_diffusers(FAMILY), seed=1).save_pretrained(folder)
    ckpt = str(tmp / "float")
    assert main(["convert", "--model", FAMILY, folder, "--out", ckpt]) == 0
    stats = str(tmp / "calib.npz")
    assert main(["calibrate", "--model", ckpt, "--out", stats, "--methods", "lrq-dit-w3a8", *FAST]) == 0
    return tmp, ckpt, stats


@pytest.mark.parametrize("method, bits", [("lrq-dit-w3a8", "W3A8"), ("lrq-dit-w4a6", "W4A6"),
                                          ("lrq-dit-w4a4", "W4A4")])
def test_lrq_recipe_through_the_cli(converted, method, bits, capsys):
    tmp, ckpt, stats = converted
    out = str(tmp / method)
    capsys.readouterr()
    assert main(["quantize", "--method", method, "--model", ckpt, "--out", out, "--calib", stats]) == 0
    assert "ARS (LRQ-DiT): " in capsys.readouterr().out                  # the report, printed
    q = load_model(out)
    assert q.metadata["method"] == method and q.metadata["bits"] == bits and q.arch == FAMILY
    rows = q.metadata["report"]["ars"]
    roles = q.roles  # (a property that rebuilds the role table on every access)
    quantized = set()
    for path, layer in iter_layers(q.params):
        role = roles[path]
        if role_matches("embedding", role) or role_matches("final", role):
            assert isinstance(layer, FloatLinear), (path, role)
            continue
        assert isinstance(layer, QLinear) and isinstance(layer.weight, TwinLogWeight), (path, role)
        assert layer.bits_label == bits and layer.transform.rotation is not None
        quantized.add(path)
    assert quantized and quantized == {r["layer"] for r in rows}
    assert any(role_matches("cross-attn", roles[p]) for p in quantized)   # the text path is quantized too
    assert "layers Hadamard" in format_report(q)
    if method == "lrq-dit-w3a8":  # sampling from the checkpoint alone (one recipe: each compiles a sampler)
        png = str(tmp / f"{method}.png")
        assert main(["sample", "--model", out, "--out", png, "--per-class", "1", "--steps", "2",
                     "--classes", "0,1"]) == 0
        assert read_png(png).shape[0] > 0
    capsys.readouterr()
    assert main(["load", out]) == 0
    assert f" {bits} " in capsys.readouterr().out


def _check_lrq(q, method, bits):
    """Typed twin-log weights + a rotation on every quantized linear, first/last float by
    role, every quantized layer in the ARS report; convs (UNet) stay float."""
    rows = q.metadata["report"]["ars"]
    roles = q.roles  # (a property that rebuilds the role table on every access: 3 s each on the UNet)
    quantized = set()
    for path, layer in iter_layers(q.params):
        role = roles.get(path)
        if not isinstance(layer, (FloatLinear, QLinear)):
            continue
        if role_matches("embedding", role) or role_matches("final", role):
            assert isinstance(layer, FloatLinear), (path, role)
            continue
        assert isinstance(layer, QLinear) and isinstance(layer.weight, TwinLogWeight), (method, path, role)
        assert layer.bits_label == bits and layer.transform.rotation is not None
        quantized.add(path)
    assert quantized and quantized == {r["layer"] for r in rows}


@pytest.mark.parametrize("family, method, bits", [("latte", "lrq-dit-w4a6", "W4A6"), ("flux", "lrq-dit-w4a4", "W4A4"),
                                                  ("unet", "lrq-dit-w3a8", "W3A8")])
def test_lrq_recipe_on_every_family(family, method, bits, tmp_path):
    """The other families (PixArt above, the default DiT in test_lrq_dit.py), one recipe
    each: convert, calibrate, quantize + orbax export, reload, one sampling step."""
    folder = str(tmp_path / "hf")
    randomize_(tiny_diffusers(family), seed=1).save_pretrained(folder)
    ckpt = str(tmp_path / "float")
    assert main(["convert", "--model", family, folder, "--out", ckpt]) == 0
    stats = str(tmp_path / "calib.npz")
    assert main(["calibrate", "--model", ckpt, "--out", stats, "--methods", method, *FAST]) == 0
    out = str(tmp_path / method)
    assert main(["quantize", "--method", method, "--model", ckpt, "--out", out, "--calib", stats]) == 0
    q = load_model(out)
    assert q.metadata["method"] == method and q.metadata["bits"] == bits and q.arch == family
    _check_lrq(q, method, bits)
    png = str(tmp_path / "s.png")
    assert main(["sample", "--model", out, "--out", png, "--per-class", "1", "--steps", "1", "--classes", "0"]) == 0
    assert read_png(png).shape[0] > 0
