"""Where a sampling step's time goes: one stacked bar per (model, method) from bench_e2e's profile.

    python bench/plot_e2e.py bench/results/e2e_h100.json bench/results/e2e_h100.png

Bars are scaled per model (the longest step of that model fills the width); segments are
the profile's categories: quantize kernel, integer GEMM kernel, XLA GEMMs (attention's
among them), everything else.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdq.viz import text_image, write_png  # noqa: E402

CATEGORIES = (("quantize_kernel", (230, 140, 30)), ("int_gemm_kernel", (40, 160, 60)),
              ("xla_gemm", (50, 100, 200)), ("other", (170, 170, 170)))
METHOD_ORDER = ("bf16", "w8a8-xla", "w8a8", "w4a8", "svdquant-w4a4", "svdquant-w4a4-unfused")
LABEL_W, BAR_W, ROW_H, SCALE = 330, 620, 22, 2


def _paste(canvas, img, y, x):
    h, w = img.shape[:2]
    w = min(w, canvas.shape[1] - x)
    canvas[y:y + h, x:x + w] = img[:, :w]


def render(rows: list[dict]) -> np.ndarray:
    """``rows``: bench_e2e rows with ``profile_ms``; returns an RGB uint8 image."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [("legend", None)]
    for mdl in models:
        lines.append(("title", mdl))
        mine = [r for r in rows if r["model"] == mdl]
        lines += [("bar", r) for r in sorted(mine, key=lambda r: METHOD_ORDER.index(r["method"]))]
    height = ROW_H * len(lines) + 10
    canvas = np.full((height, LABEL_W + BAR_W + 150, 3), 255, np.uint8)
    for i, (kind, item) in enumerate(lines):
        y = 5 + i * ROW_H
        if kind == "legend":
            x = 4
            for name, color in CATEGORIES:
                canvas[y + 2:y + 14, x:x + 14] = color
                label = text_image(name.replace("_", " "), scale=SCALE)
                _paste(canvas, label, y, x + 18)
                x += 18 + label.shape[1] + 16
        elif kind == "title":
            _paste(canvas, text_image(item, scale=SCALE), y + 4, 4)
        else:
            r = item
            longest = max(q["step_ms_median"] for q in rows if q["model"] == r["model"])
            _paste(canvas, text_image(f"  {r['method']}", scale=SCALE), y, 4)
            prof = r.get("profile_ms", {})
            total = sum(prof.values()) or 1.0
            x = LABEL_W
            for name, color in CATEGORIES:
                # the profile's kernel times, scaled to the measured step time
                w = int(round(BAR_W * r["step_ms_median"] / longest * prof.get(name, 0.0) / total))
                canvas[y + 1:y + 15, x:x + w] = color
                x += w
            _paste(canvas, text_image(f"{r['step_ms_median']:.1f} ms", scale=SCALE), y, x + 6)
    return canvas


def main():
    src, dst = sys.argv[1], sys.argv[2]
    rows = [r for r in json.load(open(src))["rows"] if "profile_ms" in r]
    write_png(dst, render(rows))


if __name__ == "__main__":
    main()
