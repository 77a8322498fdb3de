"""compare over several noise seeds: each seed's row equals a one-seed comparison from that seed
(same calibration), and the row's mean / 95% interval are the Student-t ones of those values."""
import numpy as np
import pytest

from jaxdq.compare import SEED_METRICS, run_compare
from jaxdq.models.sources import LoadedModel

T975_2 = 4.302652729911275  # Student t quantile 0.975, 2 degrees of freedom (tables)


def _tiny():
    import jax

    from jaxdq.models.dit import DiTConfig, init_dit

    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    rng = np.random.default_rng(0)  # every array random (the init's zero final layer would make PSNR inf)
    params = jax.tree_util.tree_map(lambda a: (0.3 * rng.standard_normal(np.shape(a))).astype(np.float32),
                                    init_dit(cfg, jax.random.PRNGKey(0)))
    return LoadedModel(cfg, params, {"arch": "dit"})


def test_seeds_rows_are_the_per_seed_comparisons_and_their_intervals():
    model = _tiny()
    kw = dict(per_class=1, classes=(1, 2, 3), num_steps=2, progress=False, model=model, calib_per_class=1)
    multi = run_compare("tiny", ("rtn-w4a8", "w8a8"), seeds=(0, 5, 9), **kw)
    assert multi["settings"]["seeds"] == [0, 5, 9]
    # the calibration of a multi-seed run is seeds[0]'s: a one-seed run from s uses s + 1000, so
    # the rtn row (static ranges) is compared only for seed 0; w8a8 (dynamic) needs none
    singles = {s: run_compare("tiny", ("w8a8",), seed=s, **kw)["results"] for s in (5, 9)}
    singles[0] = run_compare("tiny", ("rtn-w4a8", "w8a8"), seed=0, **kw)["results"]
    by = {r["method"]: r for r in multi["results"]}
    for s_i, s in enumerate((0, 5, 9)):
        for r1 in singles[s]:
            for k in ("psnr_db", "ssim"):
                if r1[k] is not None:
                    assert by[r1["method"]]["per_seed"][k][s_i] == r1[k], (r1["method"], s, k)
    for name in ("rtn-w4a8", "w8a8"):
        row = by[name]
        assert set(row["ci95"]) == {k for k in SEED_METRICS if k in row["per_seed"]} and "psnr_db" in row["ci95"]
        v = np.asarray(row["per_seed"]["psnr_db"], np.float64)
        assert len(v) == 3 and np.ptp(v) > 0  # different noise, different scores
        assert row["psnr_db"] == pytest.approx(v.mean(), abs=0.006)
        assert row["ci95"]["psnr_db"] == pytest.approx(T975_2 * v.std(ddof=1) / np.sqrt(3), abs=6e-4)
    assert by["w8a8"]["psnr_db"] > by["rtn-w4a8"]["psnr_db"]
    with pytest.raises(ValueError, match="distinct"):
        run_compare("tiny", ("w8a8",), seeds=(1, 1), **kw)


def test_keep_going_leaves_a_failing_method_out():
    from jaxdq.quant import recipes

    def boom(params, ctx):
        raise RuntimeError("boom")

    recipes.RECIPES["_test-boom"] = recipes.Recipe("_test-boom", "W8A8", "fails", boom)
    try:
        kw = dict(per_class=1, classes=(1, 2), num_steps=2, progress=False, model=_tiny())
        with pytest.raises(RuntimeError):
            run_compare("tiny", ("_test-boom", "w8a8"), **kw)
        res = run_compare("tiny", ("_test-boom", "w8a8"), keep_going=True, **kw)
        assert [r["method"] for r in res["results"]] == ["float", "w8a8"]
        assert any("_test-boom failed" in n and "boom" in n for n in res["notes"])
    finally:
        del recipes.RECIPES["_test-boom"]


def test_a_stopped_comparison_keeps_its_finished_rows(tmp_path):
    """compare reports every finished row (the CLI writes compare.partial.json), so a run that
    is stopped part way — here by a failing method — keeps what it finished; the final write
    replaces the partial file."""
    import json

    from jaxdq import outputs
    from jaxdq.quant import recipes

    def boom(params, ctx):
        raise RuntimeError("boom")

    recipes.RECIPES["_test-boom"] = recipes.Recipe("_test-boom", "W8A8", "fails", boom)
    seen = []
    out = str(tmp_path / "cmp")

    def on_row(partial):
        seen.append([r["method"] for r in partial["results"]])
        outputs.write_partial_compare(out, partial)
    try:
        kw = dict(per_class=1, classes=(1, 2), num_steps=2, progress=False, model=_tiny())
        with pytest.raises(RuntimeError):
            run_compare("tiny", ("w8a8", "_test-boom"), on_row=on_row, **kw)
    finally:
        del recipes.RECIPES["_test-boom"]
    assert seen == [["float"], ["float", "w8a8"]]
    kept = json.load(open(tmp_path / "cmp" / outputs.PARTIAL_COMPARE))
    assert kept["partial"] and [r["method"] for r in kept["results"]] == ["float", "w8a8"]
    assert kept["results"][1]["psnr_db"] > 0 and kept["settings"]["per_class"] == 1
    assert kept["results"][1]["compression_vs_fp32"] > 1  # the rows are complete table rows
    outputs.check_output_dir(out)  # a directory holding a partial comparison may be reused
    res = run_compare("tiny", ("w8a8",), on_row=on_row, **kw)
    outputs.write_compare(out, res)
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["compare.json", "compare.md", "compare.png"]
