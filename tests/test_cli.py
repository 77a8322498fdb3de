"""The main job and the CLI on the shipped default model (small settings to stay fast)."""
import json
import re
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdq.cli import main
from jaxdq.viz import read_png

FAST = ["--classes", "0,1,7", "--per-class", "2", "--steps", "10"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), *FAST]) == 0
    return out


def test_demo_writes_table_png_and_quantization_helps(demo_out):
    res = json.load(open(demo_out / "compare.json"))
    rows = {r["method"]: r for r in res["results"]}
    assert list(rows) == ["float", "w8a8", "w4a8", "naive"]
    assert rows["w8a8"]["bits"] == "W8A8" and rows["naive"]["bits"] == "W8A8"
    fp = rows["float"]["weight_bytes"]
    # int8 linears + float first/last layers, embeddings and scales: between 3x and 4x smaller than fp32
    assert 3.0 < fp / rows["w8a8"]["weight_bytes"] < 4.0
    assert rows["w4a8"]["weight_bytes"] < rows["w8a8"]["weight_bytes"]
    # per-token dynamic W8A8 stays close to float; naive static per-tensor is worse
    assert rows["w8a8"]["psnr_db"] > 25.0
    assert rows["w8a8"]["psnr_db"] > rows["naive"]["psnr_db"]
    img = read_png(str(demo_out / "compare.png"))
    assert img.ndim == 2 and img.shape[0] > 4 * 32  # grey digits; a labelled row per method
    assert "| w8a8 |" in open(demo_out / "compare.md").read()


def test_export_load_sample_without_float_weights(tmp_path, capsys):
    ckpt = tmp_path / "w8a8"
    assert main(["quantize", "--method", "w8a8", "--out", str(ckpt)]) == 0
    from jaxdq.models.sources import load_model
    from jaxdq.quantize import quantize_model
    from jaxdq.sampling.families import Request

    loaded = load_model(str(ckpt))
    assert loaded.metadata["method"] == "dynamic-w8a8" and loaded.metadata["jaxdq_version"]
    direct = quantize_model(load_model("default"), "w8a8").params
    b = loaded.family.batch(loaded.config, Request(classes=(3,), per_class=2, seed=0))
    run = loaded.family.sampler(loaded.config, num_steps=5)
    a = run(loaded.params, b.x_T, b.cond, b.uncond, jax.random.PRNGKey(0))
    b = run(direct, b.x_T, b.cond, b.uncond, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    png = tmp_path / "s.png"
    assert main(["sample", "--model", str(ckpt), "--out", str(png), "--classes", "3", "--per-class", "2",
                 "--steps", "5"]) == 0
    assert read_png(str(png)).shape[0] > 0
    assert main(["load", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert '"method": "dynamic-w8a8"' in out and "W8A8" in out


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["sample", "--classes", "42"], "classes must be in [0, 10)"),
    (["demo", "--methods", "w3a3"], "unknown method"),
    (["quantize", "--method", "bogus", "--out", "x"], "unknown method 'bogus'"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_give_one_line(argv, needle):
    r = subprocess.run([sys.executable, "-m", "jaxdq.cli", *argv], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip() and "WARNING" not in l]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_quantized_metadata_names_bits_of_every_method():
    from jaxdq.models.sources import load_model
    from jaxdq.quant.recipes import get_recipe, method_names
    from jaxdq.quantize import quantize_model

    labels = {m: get_recipe(m).bits for m in method_names()}
    assert labels["naive"] == "W8A8" and labels["vidit-q-w4a8"] == "W4A8" and labels["vidit-q-mp"] == "W4/8A8"
    assert all(re.fullmatch(r"W[0-9/]+A\d+", v) for v in labels.values()), labels
    m = quantize_model(load_model("default"), "w4a16", progress=False)
    assert m.metadata["method"] == "w4a16" and m.metadata["bits"] == "W4A16"
