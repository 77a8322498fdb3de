"""Train jaxdq's video default model: a Latte-layout video DiT on captioned moving-digit clips.

Data: 8-frame clips of one of scikit-learn's digits (16×16, full size) moving rigidly on a 24×24
canvas — constant-velocity translation and rotation between two random poses (±3.5 px, ±20°) —
drawn fresh on the device for every batch (:func:`jaxdq.data.random_clip_batch`, the JAX twin of
:func:`jaxdq.data.moving_digit_clips`), each captioned with one of its digit's captions
("a handwritten seven", ...; the shipped embeddings, as the text model), 10% null captions for
CFG.  Model: :data:`jaxdq.models.default.VIDEO_CONFIG` — Latte (spatial PixArt blocks with
cross-attention, alternating with temporal self-attention blocks over the 8 frames), 1 channel,
24×24 frames at patch 3 (8×8 tokens per frame), hidden 128, 4 + 4 blocks, 4 heads, learned
sigma; DiT's hybrid loss on the linear β schedule (:mod:`train_common`).

Training settings (defaults), and why: the first H200 run (8000 steps at batch 32, lr 3e-4,
unweighted loss; bench/results/train_default_video_run1.json) learned temporally consistent
blobs that ignore the caption — its ε-MSE with the right, the null and a wrong caption agree to
~1% at every t (the text model's differ by 40-70% at t = 200-600), so CFG had nothing to
amplify.  A clip is 8 views of one digit: 32 clips are 32 (caption, digit) pairs a step against
the text model's 256, and the frames' redundancy leaves the caption less to explain.  Hence:
batch 128 clips (4× the pairs per step; the step is mostly fixed cost at this size), lr 6e-4,
Min-SNR-5 weighting of the ε-MSE (``--min-snr-gamma``: the low-noise steps, t < 130, no longer
dominate the update), and ``--fit-steps``: ``--steps 12000`` is an upper bound and the cosine
schedule is fitted, at the end of the 500 warmup steps, to what the measured rate fits into
``--max-seconds``.

    python examples/train_default_video.py --max-seconds 150 --out /tmp/video_digits

writes ``video_digits.safetensors`` (EMA weights, float16, Flax paths as keys),
``video_digits.json`` (config, command, log, wall time, device, prompts, the fitted schedule),
``video_digits_samples.png`` (one row per prompt: the 8 frames of its clip, DDIM 50 steps,
CFG 4), ``video_digits_samples.gif`` (the same clips animated, Pillow) and
``video_digits_data.png`` (training clips, for comparison).  The record's ``sample`` also has
the per-prompt frame agreement, a CFG sweep on 5 more clips per prompt (``cfg_sweep``) and the
caption check (``caption_check``: ε-MSE on data clips with the right, the null and a wrong
caption at t = 300/500/700: right < null < wrong when the caption is used).
Measured with these defaults (H200, 2026-12-02, bench/results/train_default_video.json): 6464
fitted steps in 150 s, per-frame agreement 0.61 (run 1: 0.15), right < null < wrong at t = 300
and 500 but only 2-4% apart — the caption is used, weakly; a longer run is the next step.
``--tiny`` trains a very small Latte (for smoke tests).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_common import (Task, add_train_args, class_agreement, class_predictions, ddim_cfg_sample,  # noqa: E402
                          ddim_cfg_sampler, labeled_grid, run, schedule_arrays, write_gif)
from train_default_text import caption_data, draw_captions, sample_prompts  # noqa: E402

from jaxdq.data import (CAPTION_TEMPLATES, CLIP_CANVAS, MAX_ANGLE, MAX_SHIFT, caption_table, ink_crop,  # noqa: E402
                        load_digit_captions, load_digits_16, moving_digit_clips, random_clip_batch)
from jaxdq.models.default import VIDEO_CONFIG, VIDEO_FRAMES  # noqa: E402
from jaxdq.models.latte import Latte, init_latte  # noqa: E402
from jaxdq.viz import grid, write_png  # noqa: E402

TINY_CONFIG = dataclasses.replace(VIDEO_CONFIG, hidden_size=32, depth=1, num_heads=2)


def frame_strip(clips: np.ndarray, labels=None, upscale: int = 3) -> np.ndarray:
    """``[N, 1, F, H, W]`` → one row per clip, its frames left to right (uint8 picture), rows
    labelled (the prompts) when ``labels`` is given."""
    rows = [np.asarray(c).transpose(1, 0, 2, 3) for c in clips]
    return grid(rows, upscale=upscale) if labels is None else labeled_grid(rows, labels, upscale=upscale)


def gif_frames(clips: np.ndarray, cols: int = 5, upscale: int = 4) -> list[np.ndarray]:
    """``[N, 1, F, H, W]`` → F pictures, each the clips' frame f tiled ``cols`` to a row."""
    clips = np.asarray(clips)
    n = clips.shape[0]
    return [grid([clips[i:i + cols, :, f] for i in range(0, n, cols)], upscale=upscale) for f in range(clips.shape[2])]


def make_task(cfg=VIDEO_CONFIG, name: str = "video_digits", drop_prob: float = 0.1, frames: int = VIDEO_FRAMES) -> Task:
    model = Latte(cfg)
    images, labels = load_digits_16()
    captions = load_digit_captions()
    data = {"images": images, "labels": labels, **caption_data(captions)}
    canvas = cfg.sample_size
    if canvas != CLIP_CANVAS:
        raise ValueError(f"video config sample_size {canvas} != the clips' canvas {CLIP_CANVAS}")

    def apply(p, x, t, cond):
        states, mask = cond
        return model.apply({"params": p}, x, t, states, mask)

    def batch(data, k1, k2, b):
        ka, kb = jax.random.split(k1)
        clips, y = random_clip_batch(ka, data["images"], data["labels"], b, frames, canvas=canvas)
        cap = draw_captions(data, kb, k2, y, drop_prob)
        return clips, (data["states"][cap], data["mask"][cap])

    def sample(ema, out_dir, args):
        rows = sample_prompts(captions)
        states, mask = jnp.asarray(data["states"]), jnp.asarray(data["mask"])
        null = states.shape[0] - 1
        x_T = jax.random.normal(jax.random.PRNGKey(1), (len(rows), 1, frames, canvas, canvas))
        fn = lambda p, x, t, i: apply(p["model"], x, t, (p["states"][i], p["mask"][i]))  # noqa: E731
        tables = {"model": ema, "states": states, "mask": mask}
        x0 = ddim_cfg_sample(fn, tables, jnp.asarray(rows), null, x_T, jax.random.PRNGKey(2), scale=args.cfg_scale,
                             num_steps=args.sample_steps)
        files = {"strip": f"{name}_samples.png", "gif": f"{name}_samples.gif", "data": f"{name}_data.png"}
        prompts = [str(captions["captions"][i]) for i in rows]
        write_png(os.path.join(out_dir, files["strip"]), frame_strip(x0, prompts))
        if write_gif(os.path.join(out_dir, files["gif"]), gif_frames(x0)) is None:
            files.pop("gif")
        real, real_y = moving_digit_clips(10, frames, seed=0, canvas=canvas, data=(images, labels))
        write_png(os.path.join(out_dir, files["data"]), frame_strip(real, [f"data: {d}" for d in real_y]))
        # per frame: the classifier on a 16x16 window around the frame's ink
        digits = np.asarray(captions["labels"])[np.asarray(rows)]
        real_frames = ink_crop(real.transpose(0, 2, 1, 3, 4).reshape(-1, 1, canvas, canvas))
        pred = frame_predictions(x0)
        per_prompt = None if pred is None else [float(v) for v in np.mean(pred == digits[:, None], axis=1)]
        return {"files": files, "prompts": prompts, "solver": "ddim",
                "frame_class_agreement": None if pred is None else float(np.mean(pred == digits[:, None])),
                "per_prompt_frame_agreement": per_prompt,
                "data_frame_class_agreement": class_agreement(real_frames, np.repeat(real_y, real.shape[2])),
                "num_steps": args.sample_steps, "cfg_scale": args.cfg_scale, "noise_seed": 1,
                # temporal change between consecutive frames, samples (clipped to [-1, 1]) vs data
                "mean_abs_frame_diff": float(np.mean(np.abs(np.diff(np.clip(x0, -1, 1), axis=2)))),
                "data_mean_abs_frame_diff": float(np.mean(np.abs(np.diff(real, axis=2)))),
                "cfg_sweep": cfg_sweep(tables, fn, rows, digits, null, args),
                "caption_check": caption_check(ema, real, real_y)}

    def frame_predictions(x0):
        """``[N, 1, F, H, W]`` samples → the classifier's class of each frame's ink window, ``[N, F]``."""
        n, f = x0.shape[0], x0.shape[2]
        crops = ink_crop(np.clip(x0, -1, 1).transpose(0, 2, 1, 3, 4).reshape(n * f, 1, canvas, canvas))
        pred = class_predictions(crops)
        return None if pred is None else pred.reshape(n, f)

    def cfg_sweep(tables, fn, rows, digits, null, args):
        """Frame agreement at a few guidance scales on ``--sweep-clips`` more clips per prompt
        (noise seed 3): is the grid's number robust, and is the scale right?"""
        per = args.sweep_clips
        if per <= 0:
            return []
        go = ddim_cfg_sampler(fn, null, num_steps=args.sample_steps)
        cond = jnp.repeat(jnp.asarray(rows), per)
        x_T = jax.random.normal(jax.random.PRNGKey(3), (len(rows) * per, 1, frames, canvas, canvas))
        out = []
        for scale in sorted({float(v) for v in args.cfg_sweep} | {float(args.cfg_scale)}):
            x0 = np.asarray(go(tables, cond, x_T, jax.random.PRNGKey(4), jnp.float32(scale)))
            pred = frame_predictions(x0)
            out.append({"cfg_scale": scale, "clips": int(x0.shape[0]),
                        "frame_class_agreement": None if pred is None
                        else float(np.mean(pred == np.repeat(digits, per)[:, None]))})
        return out

    def caption_check(ema, real, real_y):
        """ε-MSE (the ε half of the output) of the EMA model on the data clips with their own
        caption, the null caption and a wrong digit's caption, at a few t (same noise)."""
        table = caption_table(captions)
        states, mask = jnp.asarray(data["states"]), jnp.asarray(data["mask"])
        acp = schedule_arrays()["alphas_cumprod"]
        x0 = jnp.asarray(real)
        noise = jax.random.normal(jax.random.PRNGKey(5), x0.shape)
        eps = jax.jit(lambda p, x, t, c: apply(p, x, t, (states[c], mask[c]))[:, :x.shape[1]])
        conds = {"right": table[real_y, 0], "null": np.full(len(real_y), states.shape[0] - 1),
                 "wrong": table[(real_y + 3) % 10, 0]}
        out = {}
        for t in (300, 500, 700):
            xt = jnp.sqrt(acp[t]) * x0 + jnp.sqrt(1 - acp[t]) * noise
            tt = jnp.full((x0.shape[0],), t, jnp.int32)
            out[str(t)] = {k: float(jnp.mean((eps(ema, xt, tt, jnp.asarray(c)) - noise) ** 2))
                           for k, c in conds.items()}
        return out

    return Task(name=name, config=cfg, init=lambda k: init_latte(cfg, k), apply=apply, data=data, batch=batch,
                sample=sample,
                extra={"frames": frames, "canvas": canvas,
                       "motion": {"max_shift_px": MAX_SHIFT, "max_angle_deg": MAX_ANGLE,
                                  "kind": "constant-velocity rigid, two random poses"},
                       "caption_templates": list(CAPTION_TEMPLATES), "text_encoder": captions["encoder"],
                       "null_caption": "empty prompt",
                       "objective": "hybrid (eps-mse + vb); the eps-mse Min-SNR weighted with args.min_snr_gamma "
                                    "(the logged loss unweighted)"})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_train_args(ap, steps=12000, batch=128, lr=6e-4, ema=0.999, ema_warmup=True, log_every=500,
                   out="video_digits_out", fit_steps=True, min_snr_gamma=5.0)
    ap.add_argument("--frames", type=int, default=VIDEO_FRAMES)
    ap.add_argument("--sweep-clips", type=int, default=5, help="clips per prompt of the CFG sweep (0: no sweep)")
    ap.add_argument("--cfg-sweep", type=lambda v: [float(x) for x in v.split(",") if x], default=[2.0, 7.0],
                    help="guidance scales of the sweep besides --cfg-scale (comma-separated)")
    ap.add_argument("--tiny", action="store_true", help="a very small Latte (smoke tests)")
    args = ap.parse_args(argv)
    cfg = TINY_CONFIG if args.tiny else VIDEO_CONFIG
    return run(make_task(cfg, drop_prob=args.drop_prob, frames=args.frames), args, argv, __file__)


if __name__ == "__main__":
    main()
