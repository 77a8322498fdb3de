"""One comparison of quantization methods on one model, from the same noise.

:func:`run_compare` calibrates once (the union of the methods' needs), quantizes the float
model with every method, samples every variant from the same initial noise and
conditioning, and scores each against the float model's samples:

* fidelity: PSNR (pooled) and SSIM (mean per image) against the float samples;
* distribution: FD-digits, the Fréchet distance of the in-project digits classifier's
  features (an in-project proxy of FID), against the float samples and, for jaxdq's digits
  models, against the real digits data;
* alignment: class agreement, the fraction of samples the classifier assigns to their
  conditioning class or prompted digit (an in-project proxy of CLIPScore);
* memory: weight bytes (every array of the params tree) and compression vs FP32.

It runs on every model family (:mod:`jaxdq.sampling.families`).  Latent models are scored
on their decoded images when a VAE is given, else on the latents (and the PNG says so).
Users with real Inception/CLIP features pass their own ``extractor``
(:class:`jaxdq.metrics.FeatureExtractor`).  ``jaxdq demo`` is this with three methods.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Optional

import jax
import numpy as np

from jaxdq import metrics
from jaxdq.backend import REFERENCE, Policy
from jaxdq.models.sources import DEFAULT_SOURCES, LoadedModel, load_model
from jaxdq.quant.layers import nbytes
from jaxdq.quant.recipes import get_recipe
from jaxdq.quantize import calibration, quantize_model
from jaxdq.sampling.families import Request

#: The fair baselines, then ViDiT-Q's ablation (dynamic only; + smoothing; + rotation; + both =
#: vidit-q, whose smoothing uses α = 0.3 on the momentum-averaged activation maximum, momentum
#: 0.95, as ViDiT-Q's released configs: not searched), at W8A8 and W4A8; then ViDiT-Q-MP and SVDQuant.
#: Baselines: ``rtn`` = ViDiT-Q's naive baseline (per-channel W, static per-tensor min-max A, one
#: range over all steps), ``per-step-static`` (a static range per timestep), ``qdiffusion``
#: (timestep-uniform calibration, one range, BRECQ + AdaRound), ``ptq4dit-csb`` (PTQ4DiT's
#: channel balancing), ``smoothquant`` (α = 0.5).  Last the FP8 (e4m3) W8A8 pair.
DEFAULT_METHODS = tuple(f"{m}-w{w}a8" for w in (8, 4) for m in (
    "rtn", "per-step-static", "qdiffusion", "ptq4dit-csb", "smoothquant",
    "dynamic", "vidit-q-smooth-only", "quarot", "vidit-q")) + (
    "vidit-q-mp", "vidit-q-mp-static", "svdquant-w8a8", "svdquant-w4a8", "svdquant",
    "fp8-w8a8", "vidit-q-fp8-w8a8")  # FP8 (e4m3) W8A8, plain and with ViDiT-Q's balancing
#: The metrics of a row that are averaged over seeds (with a 95% interval).
SEED_METRICS = ("psnr_db", "ssim", "fd_vs_float", "fd_vs_data", "class_agreement")
DEMO_METHODS = ("w8a8", "w4a8", "naive")


def is_latent(model: LoadedModel) -> bool:
    """Whether the model's samples are latents (not 1- or 3-channel images)."""
    return model.arch == "flux" or getattr(model.config, "in_channels", 3) not in (1, 3)


def to_images(model: LoadedModel, x0: np.ndarray, vae: Optional[LoadedModel] = None) -> np.ndarray:
    """Samples as images ``[N, C, H, W]`` (video: frames ``[N·F, C, H, W]``): latents are
    decoded with ``vae`` when given, else returned as they are."""
    x0 = np.asarray(x0)
    if x0.ndim == 5:  # [N, C, F, H, W] → frames
        x0 = x0.transpose(0, 2, 1, 3, 4).reshape(-1, *x0.shape[1:2], *x0.shape[3:])
    if vae is not None and is_latent(model):
        from jaxdq.models.vae import vae_decode

        z = x0 / vae.config.scaling_factor
        x0 = np.asarray(vae_decode(vae.params, jax.numpy.asarray(z), vae.config))
    return x0


def digits_model(model_source: str, images: np.ndarray) -> bool:
    """jaxdq's own digits models, whose samples the digits classifier can score (grey 16×16
    images, or larger grey video frames, scored on the 16×16 window around the digit)."""
    return model_source in DEFAULT_SOURCES and images.shape[1] == 1 and min(images.shape[2:]) >= 16


def run_compare(model_source: str = "default", methods: Sequence[str] = DEFAULT_METHODS, *,
                classes: Optional[Sequence[int]] = None, prompts: Optional[Sequence[str]] = None,
                captions: Optional[str] = None, per_class: int = 10, solver: Optional[str] = None,
                num_steps: Optional[int] = None, cfg_scale: Optional[float] = None, seed: int = 0,
                seeds: Optional[Sequence[int]] = None, calib_per_class: int = 4, vae: Optional[str] = None,
                extractor=None,
                out_dir: Optional[str] = None, policy: Policy = REFERENCE, progress: bool = True,
                model: Optional[LoadedModel] = None, mesh=None, keep_going: bool = False,
                on_row=None, attention: Optional[str] = None) -> dict:
    """Compare ``methods`` (and the float model) on one model; see module docstring.

    ``mesh``: a ``jax.sharding.Mesh``: calibration and sampling data parallel over its
    "data" axis (:mod:`jaxdq.distributed`; the batch must divide over it), same results.

    ``seeds``: noise seeds (default ``(seed,)``).  Calibration (from ``seeds[0] + 1000``) and
    quantization run once; every method is then sampled from each seed's noise and
    conditioning and scored against the float samples of the same seed.  With several seeds a
    row's metrics (:data:`SEED_METRICS`) are the means over seeds, ``row["per_seed"][metric]``
    the values in seed order and ``row["ci95"][metric]`` the half-width of the 95% Student-t
    interval of the mean (:func:`mean_ci95`); images (and the PNG) are the first seed's.
    ``attention``: the quantized rows' attention implementation (e.g. ``"sage8"``, 8-bit
    attention; :mod:`jaxdq.models.attention`); the float row keeps the model's own, so the
    scores say what the quantized attention costs on top of the quantized linears.
    ``keep_going``: a method that raises is left out (its error in the notes) instead of
    ending the comparison.  ``on_row(partial)``: called after every finished row with
    ``{"settings", "results", "notes", "partial": True}`` (the rows so far), so a run that is
    stopped keeps what it finished (the CLI writes it as ``compare.partial.json``).

    Returns ``{"settings": ..., "results": [row per method], "images": {method: [N,C,H,W]},
    "notes": [...]}``; with ``out_dir`` also writes ``compare.md``, ``compare.json`` and
    ``compare.png`` (one row of samples per method).
    """
    for m in methods:
        get_recipe(m)  # unknown names fail before any work
    model = model or load_model(model_source)
    if model.quantized:
        raise ValueError(f"compare needs a float model; {model_source} is quantized ({model.metadata['method']})")
    fam = model.family
    seeds = (int(seed),) if seeds is None else tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one: {seeds}")
    seed = seeds[0]
    req = Request(classes=None if classes is None else tuple(classes), prompts=None if not prompts else tuple(prompts),
                  captions=captions, per_class=per_class, seed=seed)
    batch = fam.batch(model.config, req)
    extra = [(fam.batch(model.config, dataclasses.replace(req, seed=s)), jax.random.PRNGKey(s + 1)) for s in seeds[1:]]
    float_extra: list = []
    notes = list(batch.notes)
    vae_model = load_model(vae) if vae else None
    if is_latent(model) and vae_model is None:
        notes.append("samples are latents (no --vae given): scores and pictures are of the latents")
    for n in notes:
        _log("note: " + n)
    run = fam.sampler(model.config, solver=solver, num_steps=num_steps, guidance=cfg_scale, policy=policy,
                      progress=progress, mesh=mesh)
    run_q = run
    if attention is not None:
        if not hasattr(model.config, "attention"):
            raise ValueError(f"--attention: the {model.arch} family has no attention option")
        from jaxdq.models.attention import check_attention_impl

        check_attention_impl(attention)
        run_q = fam.sampler(dataclasses.replace(model.config, attention=attention), solver=solver,
                            num_steps=num_steps, guidance=cfg_scale, policy=policy, progress=progress, mesh=mesh)
    key = jax.random.PRNGKey(seed + 1)
    calib = None
    if any(m != "float" and get_recipe(m).needs.any for m in methods):
        _log("calibrating on the float model's own trajectories")
        creq = Request(classes=req.classes, prompts=req.prompts, captions=captions, per_class=calib_per_class,
                       seed=seed + 1000)
        calib = calibration(model, methods, request=creq, solver=solver, num_steps=num_steps, guidance=cfg_scale,
                            progress=progress, mesh=mesh)
    def _settings() -> dict:
        settings = {"model": model_source, "family": model.arch, "solver": solver or fam.solver,
                    "steps": num_steps or fam.steps, "cfg": fam.guidance if cfg_scale is None else cfg_scale,
                    "seed": seed, "seeds": list(seeds), "rows": batch.rows,
                    "per_class": per_class, "calib_per_class": calib_per_class,
                    "policy": policy.mode,
                    "extractor": None if extractor is None else (
                        "digits classifier (in-project)" if real_feats is not None else type(extractor).__name__)}
        if classes is not None:
            settings["classes"] = list(classes)
        if attention is not None:
            settings["attention"] = attention  # of the quantized rows (the float row: the model's own)
        return settings

    images0 = None
    real_feats = None
    rows, images = [], {}
    for name in ["float"] + list(methods):
        _log(f"[{name}] quantizing" if name != "float" else "[float] sampling")
        t0 = time.time()
        try:
            m = quantize_model(model, name, calib=calib, progress=progress)
        except Exception as e:  # noqa: BLE001 -- keep_going: report it, compare the rest
            if not keep_going or name == "float":
                raise
            notes.append(f"{name} failed and is left out: {type(e).__name__}: {e}")
            _log("  " + notes[-1])
            continue
        tq = time.time() - t0
        t0 = time.time()
        sample = run if name == "float" else run_q
        x0 = np.asarray(jax.block_until_ready(sample(m.params, batch.x_T, batch.cond, batch.uncond, key)))
        ts = time.time() - t0
        img = to_images(model, x0, vae_model)
        if images0 is None:
            images0 = img
            if extractor is None and digits_model(model_source, img):
                extractor = metrics.load_digits_classifier()
                from jaxdq.metrics.features import load_digits_16

                real_feats = np.asarray(extractor(load_digits_16()[0]))
        images[name] = img
        rows.append(_score(name, img, None if name == "float" else images["float"], batch, extractor, real_feats,
                           m, tq, ts))
        if extra:
            per = [rows[-1]]
            for i, (b, k) in enumerate(extra):
                t0 = time.time()
                xs = np.asarray(jax.block_until_ready(sample(m.params, b.x_T, b.cond, b.uncond, k)))
                ts = time.time() - t0
                im = to_images(model, xs, vae_model)
                if name == "float":
                    float_extra.append(im)
                per.append(_score(name, im, None if name == "float" else float_extra[i], b, extractor, real_feats,
                                  m, tq, ts))
            rows[-1] = _over_seeds(per)
        _log("  " + ", ".join(f"{k}={v}" for k, v in rows[-1].items()
                              if k not in ("description", "method", "per_seed")))
        if on_row is not None:
            done = [dict(r, compression_vs_fp32=round(rows[0]["weight_bytes"] / r["weight_bytes"], 2)) for r in rows]
            on_row({"settings": _settings(), "results": done, "notes": list(notes), "partial": True})
    settings = _settings()
    for r in rows:
        r["compression_vs_fp32"] = round(rows[0]["weight_bytes"] / r["weight_bytes"], 2)
    result = {"settings": settings, "results": rows, "images": images, "notes": notes,
              "latents": is_latent(model) and vae_model is None, "rows": batch.rows, "per_row": batch.per_row}
    if out_dir:
        write_outputs(result, out_dir)
    return result


def _score(name, img, ref, batch, extractor, real_feats, m, tq, ts) -> dict:
    labels = None if batch.labels is None else np.repeat(batch.labels, img.shape[0] // batch.size)
    if extractor is not None and real_feats is not None and img.shape[1:] != (1, 16, 16):
        from jaxdq.data import ink_crop  # moving-digit frames: FD / agreement on the digit's window

        ev = metrics.evaluate(ink_crop(img), None if ref is None else ink_crop(ref), labels, extractor=extractor)
        ev["psnr_db"] = None if ref is None else metrics.psnr(img, ref, 2.0)
        ev["ssim"] = None if ref is None else _ssim(img, ref, 2.0)
    elif extractor is not None:
        ev = metrics.evaluate(img, ref, labels, extractor=extractor)
    else:  # no feature network for this model: fidelity metrics only
        ev = {"psnr_db": None if ref is None else metrics.psnr(img, ref, data_range=_range(ref)),
              "ssim": None if ref is None else _ssim(img, ref, _range(ref)),
              "fd": None, "class_agreement": None}
    recipe = None if name == "float" else get_recipe(name)
    row = {"method": name, "bits": "W32A32" if recipe is None else recipe.bits,
           "description": "float32 reference" if recipe is None else recipe.description,
           "psnr_db": _r(ev["psnr_db"]), "ssim": _r(ev["ssim"], 4), "fd_vs_float": _r(ev["fd"], 3),
           "class_agreement": _r(ev["class_agreement"], 3),
           "weight_bytes": nbytes(m.params), "quantize_s": round(tq, 1), "sample_s": round(ts, 1)}
    if real_feats is not None:
        from jaxdq.data import ink_crop

        crop = img if img.shape[1:] == (1, 16, 16) else ink_crop(img)
        row["fd_vs_data"] = _r(metrics.frechet_distance(np.asarray(extractor(crop)), real_feats), 3)
    return row


def mean_ci95(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and the half-width of its two-sided 95% Student-t interval,
    ``t_{0.975, n-1} · sd / sqrt(n)`` (sd with ``n − 1``); half-width None for one value."""
    v = np.asarray(values, np.float64)
    if v.size < 2:
        return float(v.mean()), None
    from scipy.stats import t as student_t

    return float(v.mean()), float(student_t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))


def _over_seeds(per: Sequence[dict]) -> dict:
    """One row from the rows of several seeds: :data:`SEED_METRICS` as mean, ``ci95`` and
    ``per_seed``; ``sample_s`` the mean; the rest from the first seed's row."""
    row = dict(per[0])
    row["per_seed"], row["ci95"] = {}, {}
    for k in SEED_METRICS:
        vals = [r.get(k) for r in per]
        if k not in row or any(v is None for v in vals):
            continue
        mean, half = mean_ci95(vals)
        nd = 4 if k == "ssim" else 3 if k in ("fd_vs_float", "fd_vs_data", "class_agreement") else 2
        row[k], row["ci95"][k], row["per_seed"][k] = round(mean, nd), round(half, nd + 1), list(vals)
    row["sample_s"] = round(float(np.mean([r["sample_s"] for r in per])), 1)
    return row


def _ssim(img: np.ndarray, ref: np.ndarray, data_range: float) -> float:
    """Mean SSIM: Wang et al.'s 11×11 Gaussian window, or for images smaller than it (tiny
    latents) scikit-image's uniform window of the largest odd size that fits (at most 7)."""
    side = min(img.shape[-2:])
    if side >= 11:
        return float(np.mean(metrics.ssim(img, ref, data_range)))
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        return None
    return float(np.mean(metrics.ssim(img, ref, data_range, gaussian=False, win_size=win)))


def _range(ref: np.ndarray) -> float:
    """PSNR/SSIM data range: 2 for images in [-1, 1], the float samples' spread otherwise (latents)."""
    lo, hi = float(np.min(ref)), float(np.max(ref))
    return 2.0 if lo >= -1.5 and hi <= 1.5 else hi - lo


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
    for r in rows:  # with several seeds: mean ± half-width of the 95% interval
        ci = r.get("ci95") or {}
        fmt = lambda k, f: "—" if r.get(k) is None else f.format(r[k]) + (  # noqa: E731
            "" if ci.get(k) is None else " ± " + f.format(ci[k]))
        cells = [r["method"], r["bits"], fmt("psnr_db", "{:.2f}"), fmt("ssim", "{:.4f}"), fmt("fd_vs_float", "{:.3f}")]
        cells += [fmt("fd_vs_data", "{:.3f}")] if has_data else []
        cells += [fmt("class_agreement", "{:.3f}"), f"{r['weight_bytes']:,}", f"{r['compression_vs_fp32']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: str) -> dict:
    """``compare.md`` (table), ``compare.json`` (settings + rows + notes) and ``compare.png``
    (one labelled row per method: the first two samples of each conditioning row)."""
    from jaxdq.viz import method_rows, write_png

    os.makedirs(out_dir, exist_ok=True)
    rows = result["results"]
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(markdown_table(rows) + "\n")
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump({"settings": result["settings"], "results": rows, "notes": result["notes"]}, f, indent=1)
    per = result["per_row"]
    n_img = next(iter(result["images"].values())).shape[0]
    frames = n_img // (per * len(result["rows"]))  # video: frames per sample
    pick = [(i * per + j) * frames for i in range(len(result["rows"])) for j in range(min(per, 2))]
    cols = [str(result["rows"][i]) for i in range(len(result["rows"])) for _ in range(min(per, 2))]
    shown = {r["method"]: _displayable(result["images"][r["method"]][pick]) for r in rows}
    title = "latents (channels 0-2 as RGB; pass --vae to decode)" if result.get("latents") else None
    png = method_rows(shown, scores={r["method"]: r["psnr_db"] for r in rows}, col_titles=cols, title=title)
    write_png(os.path.join(out_dir, "compare.png"), png)
    return {"md": os.path.join(out_dir, "compare.md")}


def _displayable(x: np.ndarray) -> np.ndarray:
    """``[N, C, H, W]`` with C in (1, 3): latents of other widths show channels 0–2 (or 0),
    rescaled to [-1, 1] per array."""
    if x.shape[1] in (1, 3):
        return x
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / max(hi - lo, 1e-8) * 2 - 1
