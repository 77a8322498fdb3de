"""One comparison of quantization methods on one model, from the same noise.

:func:`run_compare` calibrates once, quantizes the float model with every method,
samples every variant from the same initial noise and labels, and scores each
against the float model's samples:

* fidelity: PSNR (pooled) and SSIM (mean per image) against the float samples;
* distribution: FD-digits, the Fréchet distance of the in-project digits
  classifier's features (an in-project proxy of FID), against the float samples
  and, for the default digits model, against the real digits data;
* alignment: class agreement, the fraction of samples the classifier assigns to
  their conditioning label (an in-project proxy of CLIPScore);
* memory: weight bytes (every array of the params tree) and compression vs FP32.

Users with real Inception/CLIP features pass their own ``extractor``
(:class:`jaxdq.metrics.FeatureExtractor`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Optional

import numpy as np

DEFAULT_METHODS = ("naive-w8a8", "qdiffusion-w8a8", "smoothquant-w8a8", "quarot-w8a8", "vidit-q-w8a8",
                   "naive-w4a8", "qdiffusion-w4a8", "smoothquant-w4a8", "quarot-w4a8", "vidit-q-w4a8",
                   "vidit-q-mp", "vidit-q-mp-static", "svdquant-w8a8", "svdquant-w4a8", "svdquant")


def run_compare(model_source: str = "default", methods: Sequence[str] = DEFAULT_METHODS, *,
                classes: Optional[Sequence[int]] = None, per_class: int = 10, solver: str = "ddim",
                num_steps: int = 50, cfg_scale: float = 4.0, seed: int = 0, calib_per_class: int = 4,
                extractor=None, out_dir: Optional[str] = None, progress: bool = True) -> dict:
    """Compare ``methods`` (and the float model) on one model; see module docstring.

    Returns ``{"settings": ..., "results": [row per method], "images": {method: [N,C,H,W]}}``;
    with ``out_dir`` also writes ``compare.md``, ``compare.json`` and ``compare.png``
    (one row of samples per method).
    """
    import jax

    from jaxdq import metrics
    from jaxdq.pipeline import calibrate, load_model, make_sampler, noise_and_labels, quantize_model, weight_bytes
    from jaxdq.quant.recipes import METHODS, method_bits, needs_calibration

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    model = load_model(model_source)
    model.require_dit("jaxdq compare")
    nc = model.config.num_classes
    classes = list(range(min(nc, 10))) if classes is None else list(classes)
    if not classes or any(not 0 <= c < nc for c in classes):
        raise ValueError(f"classes must be in [0, {nc}); got {classes}")
    is_digits = model_source == "default"
    if extractor is None and is_digits:
        extractor = metrics.load_digits_classifier()
    x_T, y = noise_and_labels(model.config, classes, per_class, seed)
    run = make_sampler(model.config, solver=solver, num_steps=num_steps, cfg_scale=cfg_scale, progress=progress)
    key = jax.random.PRNGKey(seed + 1)
    calib = None
    if any(needs_calibration(m) for m in methods):
        _log("calibrating on the float model's own trajectories")
        calib = calibrate(model, classes=classes, per_class=calib_per_class, seed=seed + 1000, solver=solver,
                          num_steps=num_steps, cfg_scale=cfg_scale, keep_inputs=any(m.startswith("vidit-q-mp") for m in methods),
                          samples=any(m.startswith("svdquant") for m in methods), progress=progress)
    real_feats = None
    if is_digits and extractor is not None:
        from jaxdq.metrics.features import load_digits_16

        real_feats = np.asarray(extractor(load_digits_16()[0]))
    rows, images = [], {}
    for name in ["float"] + list(methods):
        _log(f"[{name}] quantizing" if name != "float" else "[float] sampling")
        t0 = time.time()
        m = quantize_model(model, name, calib=calib, progress=progress)
        tq = time.time() - t0
        t0 = time.time()
        x0 = np.asarray(jax.block_until_ready(run(m.params, x_T, y, key)))
        ts = time.time() - t0
        images[name] = x0
        ref = None if name == "float" else images["float"]
        if extractor is not None:
            ev = metrics.evaluate(x0, ref, np.asarray(y), extractor=extractor)
        else:  # no feature network for this model: fidelity metrics only
            ev = {"psnr_db": None if ref is None else metrics.psnr(x0, ref),
                  "ssim": None if ref is None else float(np.mean(metrics.ssim(x0, ref))),
                  "fd": None, "class_agreement": None}
        row = {"method": name, "bits": "W32A32" if name == "float" else method_bits(name),
               "description": "float32 reference" if name == "float" else METHODS[name],
               "psnr_db": _r(ev["psnr_db"]), "ssim": _r(ev["ssim"], 4), "fd_vs_float": _r(ev["fd"], 3),
               "class_agreement": _r(ev["class_agreement"], 3),
               "weight_bytes": weight_bytes(m.params), "quantize_s": round(tq, 1), "sample_s": round(ts, 1)}
        if real_feats is not None:
            row["fd_vs_data"] = _r(metrics.frechet_distance(np.asarray(extractor(x0)), real_feats), 3)
        rows.append(row)
        _log("  " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("description", "method")))
    for r in rows:
        r["compression_vs_fp32"] = round(rows[0]["weight_bytes"] / r["weight_bytes"], 2)
    settings = {"model": model_source, "solver": solver, "steps": num_steps, "cfg": cfg_scale, "seed": seed,
                "classes": classes, "per_class": per_class, "calib_per_class": calib_per_class,
                "extractor": "digits classifier (in-project)" if is_digits else
                (type(extractor).__name__ if extractor is not None else None)}
    result = {"settings": settings, "results": rows, "images": images}
    if out_dir:
        write_outputs(result, out_dir, len(classes), per_class, model.config.input_size)
    return result


def _r(v, nd=2):
    return None if v is None else round(float(v), nd)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def markdown_table(rows: Sequence[dict]) -> str:
    has_data = any("fd_vs_data" in r for r in rows)
    head = ["method", "bits", "PSNR vs float (dB)", "SSIM", "FD vs float"]
    head += ["FD vs data"] if has_data else []
    head += ["class agreement", "weight bytes", "vs FP32"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    fmt = lambda v, f="{}": "—" if v is None else f.format(v)
    for r in rows:
        cells = [r["method"], r["bits"], fmt(r["psnr_db"], "{:.2f}"), fmt(r["ssim"], "{:.4f}"),
                 fmt(r["fd_vs_float"], "{:.3f}")]
        cells += [fmt(r.get("fd_vs_data"), "{:.3f}")] if has_data else []
        cells += [fmt(r["class_agreement"], "{:.3f}"), f"{r['weight_bytes']:,}", f"{r['compression_vs_fp32']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: str, n_classes: int, per_class: int, size: int) -> dict:
    """``compare.md`` (table), ``compare.json`` (settings + rows), ``compare.png`` (a
    labelled row of samples per method: the first sample of each class)."""
    from jaxdq.viz import grid, labeled, side_by_side, write_png

    os.makedirs(out_dir, exist_ok=True)
    rows = result["results"]
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(markdown_table(rows) + "\n")
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump({"settings": result["settings"], "results": rows}, f, indent=1)
    up = max(1, 32 // size)
    pick = [i * per_class + j for i in range(n_classes) for j in range(min(per_class, 2))]
    panels = []
    for r in rows:
        title = r["method"] + ("" if r["psnr_db"] is None else f" {r['psnr_db']:.1f}dB")
        panels.append(labeled(grid([result["images"][r["method"]][pick]], upscale=up), title))
    width = max(p.shape[1] for p in panels)
    stacked = np.concatenate([np.pad(p, ((0, 6), (0, width - p.shape[1]), (0, 0)), constant_values=255)
                              for p in panels], axis=0)
    write_png(os.path.join(out_dir, "compare.png"), side_by_side([stacked]))
    return {"md": os.path.join(out_dir, "compare.md")}
