"""What 8-bit attention costs on top of the quantized linears (issue 19, item 2's quality target:
within 1 dB PSNR vs float of the linear-only W8A8 model).

Joins ``jaxdq compare --attention IMPL`` runs with the linear-only table of the same settings
(same seeds, noise, calibration: the float rows are identical, which is checked) and writes, per
attention implementation and method, PSNR vs float with and without it and the per-seed deltas::

    python bench/attention_8bit_quality.py --base bench/results/compare_default_seeds.json \\
        --runs bench/results/compare_default_sage8.json bench/results/compare_default_int8qk.json \\
        --out bench/results/attention_8bit_default.json

The runs come from ``python bench/compare_chunks.py --chunks 1 --model default --methods
dynamic-w8a8,vidit-q-w8a8,rtn-w8a8 --out DIR -- --seeds 0,1,2 --per-class 2 --steps 25
--calib-per-class 2 --attention sage8`` (their commands are in each file).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def join(base: dict, runs: list[dict]) -> list[dict]:
    by = {r["method"]: r for r in base["results"]}
    rows = []
    for run in runs:
        if run["results"][0].get("per_seed") != base["results"][0].get("per_seed"):
            raise ValueError("the float rows differ: not the same settings / noise")
        same = {k: v for k, v in run["settings"].items() if k != "attention"}
        if same != base["settings"]:
            raise ValueError("different settings")
        for r in run["results"][1:]:
            o = by[r["method"]]
            d = np.subtract(r["per_seed"]["psnr_db"], o["per_seed"]["psnr_db"])
            rows.append({"attention": run["settings"]["attention"], "method": r["method"],
                         "psnr_db": r["psnr_db"], "ci95": r["ci95"]["psnr_db"],
                         "linear_only_psnr_db": o["psnr_db"], "linear_only_ci95": o["ci95"]["psnr_db"],
                         "delta_db_mean": round(float(d.mean()), 2), "delta_db_per_seed": [round(float(x), 2) for x in d],
                         "command": run.get("command", "")})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    rows = join(json.load(open(a.base)), [json.load(open(p)) for p in a.runs])
    json.dump({"command": "python bench/attention_8bit_quality.py " + " ".join(sys.argv[1:]), "base": a.base,
               "rows": rows}, open(a.out, "w"), indent=1)
    for r in rows:
        print(r["attention"], r["method"], r["psnr_db"], r["linear_only_psnr_db"], r["delta_db_mean"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
