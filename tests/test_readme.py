"""The README cannot go stale: its generated tables equal what the committed JSON renders, and its
library example runs and writes a checkpoint that ``jaxdq load`` reads."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def test_generated_tables_match_the_committed_json():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import readme_tables

    text = open(README).read()
    marks = list(readme_tables.MARK.finditer(text))
    assert len(marks) >= 2, "the README's main-job and compare tables are generated"
    for m in marks:
        assert m[3] == readme_tables.render(m[1], m[2]), f"stale table {m[1]} {m[2]}: run bench/readme_tables.py"


def test_library_example_runs_and_its_checkpoint_loads(tmp_path):
    text = open(README).read()
    block = re.search(r"<!-- example: library -->\n```python\n(.*?)```", text, re.S)
    assert block, "README has the library example"
    code = block[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = re.search(r'save_model\("([^"]+)"', code)[1]
    r = subprocess.run([sys.executable, "-m", "jaxdq.cli", "load", ckpt], cwd=tmp_path, capture_output=True,
                       text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"bits": "W4/8A8"' in r.stdout and "W4A16" in r.stdout and "W8A8" in r.stdout


T975_2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (tables)


def _row(method, bits, psnr_seeds):
    v = np.asarray(psnr_seeds, np.float64)
    half = T975_2 * v.std(ddof=1) / np.sqrt(3)
    return {"method": method, "bits": bits, "psnr_db": round(float(v.mean()), 2), "ssim": None,
            "fd_vs_float": None, "class_agreement": None, "weight_bytes": 10, "compression_vs_fp32": 1.0,
            "ci95": {"psnr_db": round(float(half), 3)}, "per_seed": {"psnr_db": list(psnr_seeds)}}


def test_intervals_are_shown_and_orderings_stated_only_where_they_separate():
    """mean_ci95 is the Student-t interval; the table shows ``mean ± half``; the generated ordering
    names as 'separated below' exactly the methods whose interval lies below the best one's."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import readme_tables
    from jaxdq.compare import mean_ci95

    m, h = mean_ci95([40.0, 41.0, 42.5])
    v = np.array([40.0, 41.0, 42.5])
    assert m == pytest.approx(v.mean()) and h == pytest.approx(T975_2 * v.std(ddof=1) / np.sqrt(3), rel=1e-9)
    assert mean_ci95([3.0])[1] is None
    seeds = {"a": [40.0, 40.4, 39.9], "b": [39.6, 40.3, 39.8], "c": [38.0, 38.2, 37.9], "d": [39.0, 41.0, 35.0],
             "e": [30.0, 30.1, 30.3]}
    rows = [{"method": "float", "bits": "W32A32", "psnr_db": None, "ssim": None, "fd_vs_float": None,
             "class_agreement": None, "weight_bytes": 40, "compression_vs_fp32": 1.0}]
    rows += [_row(k, "W8A8", s) for k, s in seeds.items() if k != "e"] + [_row("e", "W4A8", seeds["e"])]
    d = {"settings": {"seeds": [0, 1, 2]}, "results": rows}
    table = readme_tables.RENDERERS["compare"](d)
    assert f"| a | W8A8 | {rows[1]['psnr_db']:.2f} ± {rows[1]['ci95']['psnr_db']:.2f} |" in table
    assert "over 3 noise seeds" in table
    text = readme_tables.RENDERERS["compare-order"](d)
    line = next(ln for ln in text.splitlines() if "W8A8, PSNR" in ln)
    lo = {k: np.mean(s) - T975_2 * np.std(s, ddof=1) / np.sqrt(3) for k, s in seeds.items()}
    hi = {k: np.mean(s) + T975_2 * np.std(s, ddof=1) / np.sqrt(3) for k, s in seeds.items()}
    best = max("abcd", key=lambda k: np.mean(seeds[k]))
    below = {k for k in "abcd" if lo[best] > hi[k]}
    assert below == {"c"}  # the fixture: b and d overlap the best's interval, c does not
    assert line.startswith(f"- **W8A8, PSNR**: best mean {best} ")
    stated_below = line.split("separated from it and worse: ")[1]
    stated_top = line.split("not separated from it: ")[1].split(";")[0]
    assert {k for k in "abcd" if f"{k} (" in stated_below} == below
    assert set(stated_top.split(", ")) == set("abcd") - below - {best}
    assert "W4A8, PSNR" not in text  # one method at W4A8: nothing to order
    single = {"settings": {"seeds": [0]}, "results": [dict(r, ci95={}) for r in rows]}
    assert "no ordering" in readme_tables.RENDERERS["compare-order"](single)


def test_rows_of_a_later_run_join_a_table_only_when_they_compare(tmp_path):
    """bench/compare_chunks.py --merge-into: a later run's rows are added when its settings and
    float row are the base table's; a different run is refused (its rows would not compare)."""
    import json

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import compare_chunks

    settings = {"model": "default", "seeds": [0, 1, 2], "steps": 25}
    flt = {"method": "float", "per_seed": {"fd_vs_data": [1.0, 2.0, 3.0]}}
    base = {"settings": settings, "results": [flt, {"method": "a"}],
            "notes": ["n1", compare_chunks.MISSING + "b, c", compare_chunks.MISSING + "b"], "command": "c0"}
    extra = {"settings": settings, "results": [flt, {"method": "a"}, {"method": "b"}], "notes": ["n2"],
             "command": "c1"}
    bp, ep = tmp_path / "base.json", tmp_path / "extra.json"
    bp.write_text(json.dumps(base))
    ep.write_text(json.dumps(extra))
    merged = compare_chunks.merge_into(str(bp), str(ep))
    assert [r["method"] for r in merged["results"]] == ["float", "a", "b"]  # "a" kept from the base
    assert merged["added_rows"] == [{"methods": ["b"], "command": "c1"}]
    assert merged["notes"] == ["n1", compare_chunks.MISSING + "c", "n2"]  # "b" has its row now
    assert json.loads(bp.read_text()) == merged
    for bad in ({"settings": dict(settings, steps=50)},
                {"results": [{"method": "float", "per_seed": {"fd_vs_data": [1.0, 2.0, 9.0]}}, {"method": "c"}]}):
        ep.write_text(json.dumps(dict(extra, **bad)))
        with pytest.raises(ValueError):
            compare_chunks.merge_into(str(bp), str(ep))


def test_step_tables_compare_each_row_with_the_bf16_row_of_its_own_run():
    """The ``steps`` renderer divides by the jaxdq bf16 step of the same ``session`` (never another
    run's), shows a failed row's error, and says whether a row was timed alone."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import readme_tables

    rows = [{"quant": "bf16", "step_ms_median": 10.0, "step_ms_min": 9.0, "session": "a"},
            {"quant": "bf16", "step_ms_median": 20.0, "step_ms_min": 19.0, "session": "b",
             "quiet_gpu": {"all_ready": True}},
            {"quant": "w8a8", "step_ms_median": 25.0, "step_ms_min": 24.0, "session": "b",
             "quiet_gpu": {"all_ready": False}},
            {"framework": "pytorch", "mode": "compile", "step_ms_median": 16.0, "step_ms_min": 15.0, "session": "b"},
            {"framework": "pytorch", "mode": "torchao-int8", "error": "RuntimeError: too small", "session": "b"}]
    lines = readme_tables._steps(rows).splitlines()
    assert "| b | jaxdq w8a8 | 25.00 | 24.00 | 0.80× |" in lines[4]
    assert "| b | PyTorch compile | 16.00 | 15.00 | 1.25× |" in lines[5]
    assert "no (a process was still compiling)" in lines[4] and lines[3].endswith("| yes |")
    assert "failed: RuntimeError: too small" in lines[6]


def test_attention_kernel_table_divides_by_cudnn_of_the_same_shape():
    """The ``attention-kernel`` renderer: each int8 row's speed is cuDNN's time of its own shape over
    its time, the fastest kernel tuning is named, failed variants (no ``ms``) are left out; the
    ``steps`` label names a row's attention implementation."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import readme_tables

    base = {"B": 2, "Tq": 256, "Tk": 256, "H": 4, "d": 72, "masked": False}
    rows = [dict(base, shape="s", variant="cudnn_bf16", ms=0.010, rel_err_vs_f32=0.002),
            dict(base, shape="s", variant="int8qk_bkv128", ms=0.020, rel_err_vs_f32=0.0125),
            dict(base, shape="s", variant="int8qk_kernel_bkv128_pp_s2", ms=0.0125, rel_err_vs_f32=0.0124),
            dict(base, shape="s", variant="int8qk_kernel_bkv64_pp_s2", ms=0.008, rel_err_vs_f32=0.0124),
            dict(base, shape="s", variant="int8qk_kernel_bkv192_pp_s2", error="ValueError: smem"),
            dict(base, shape="t", variant="cudnn_bf16", ms=0.040, rel_err_vs_f32=0.002),
            dict(base, shape="t", variant="int8qk_kernel_bkv128_pp_s2", ms=0.020, rel_err_vs_f32=0.0124)]
    lines = readme_tables._attention_kernel({"rows": rows}).splitlines()
    assert lines[2] == ("| s 2×256×256×4×72 | 10.0 | 20.0 (0.50×) | 12.5 (0.80×) | 8.0 (1.25×) `bkv64_pp_s2` "
                        "| 0.0020 / 0.0125 |")
    assert lines[3].startswith("| t 2×256×256×4×72 | 40.0 | — | 20.0 (2.00×) | 20.0 (2.00×) `bkv128_pp_s2` |")
    assert readme_tables._label({"method": "w8a8", "attention": "int8qk"}) == "jaxdq w8a8, int8qk attention"
