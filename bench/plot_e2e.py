"""Where a sampling step's time goes: one stacked horizontal bar per (model, method) from bench_e2e's profile.

    python bench/plot_e2e.py bench/results/e2e_h100.json bench/results/e2e_h100.png

One panel per model, each with its own axis in ms (the models differ ~100× in step time).
A bar's length is the measured median step time; its segments are the profile's categories
(quantize kernel, integer GEMM kernel, XLA GEMMs — attention's among them — and everything
else), each the category's share of the profiled kernel time, scaled to that step time.
"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CATEGORIES = (("quantize_kernel", "quantize kernel", "#e68c1e"), ("int_gemm_kernel", "integer GEMM kernel", "#28a03c"),
              ("xla_gemm", "XLA GEMMs (incl. attention)", "#3264c8"), ("other", "other", "#aaaaaa"))
METHOD_ORDER = ("bf16", "w8a8-xla", "w8a8", "w4a8", "svdquant-w4a4", "svdquant-w4a4-unfused")


def _method_key(method: str):
    return (METHOD_ORDER.index(method), method) if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def plot(rows: list[dict], title: str | None = None) -> plt.Figure:
    """``rows``: bench_e2e rows with ``profile_ms`` and ``step_ms_median``; one subplot per model."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    counts = [sum(r["model"] == m for r in rows) for m in models]
    fig, axes = plt.subplots(len(models), 1, figsize=(9, 1.1 + 0.42 * sum(counts) + 0.5 * len(models)),
                             gridspec_kw={"height_ratios": counts}, squeeze=False)
    for ax, mdl in zip(axes[:, 0], models):
        mine = sorted((r for r in rows if r["model"] == mdl), key=lambda r: _method_key(r["method"]))
        y = np.arange(len(mine))
        left = np.zeros(len(mine))
        for key, label, color in CATEGORIES:
            widths = np.array([r["step_ms_median"] * r["profile_ms"].get(key, 0.0)
                               / (sum(r["profile_ms"].values()) or 1.0) for r in mine])
            ax.barh(y, widths, left=left, color=color, label=label, height=0.62, edgecolor="white", linewidth=0.5)
            left += widths
        longest = max(r["step_ms_median"] for r in mine)
        for yi, r in zip(y, mine):
            ax.text(r["step_ms_median"] + 0.01 * longest, yi, f"{r['step_ms_median']:.1f} ms",
                    va="center", ha="left", fontsize=8.5)
        ax.set_yticks(y, [r["method"] for r in mine])
        ax.invert_yaxis()  # first method on top
        ax.set_xlim(0, longest * 1.16)
        ax.set_title(mdl, loc="left", fontsize=10, fontweight="bold")
        ax.set_xlabel("step time (ms)", fontsize=8.5)
        ax.tick_params(labelsize=8.5)
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(CATEGORIES), fontsize=8.5, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    if title:
        fig.suptitle(title, y=1.04, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig


def render(rows: list[dict]) -> np.ndarray:
    """The plot as an RGB uint8 ``[H, W, 3]`` array."""
    fig = plot(rows)
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.exit("usage: python bench/plot_e2e.py RESULTS.json OUT.png")
    src, dst = argv
    with open(src) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if "profile_ms" in r]
    if not rows:
        sys.exit(f"{src}: no rows with a profile_ms breakdown")
    meta = data.get("meta", {})
    title = " · ".join(str(meta[k]) for k in ("device", "jax") if k in meta) or None
    fig = plot(rows, title=title)
    fig.savefig(dst, dpi=150, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
