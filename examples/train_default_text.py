"""Train jaxdq's text-conditioned default model: a PixArt-layout DiT on captioned digits.

Data: scikit-learn's digits as 16×16 in [-1, 1], each drawn with one of its captions
(:data:`jaxdq.data.CAPTION_TEMPLATES`: "a handwritten seven", "the digit 7", "a 7 written by
hand", "number seven", ...) picked uniformly; the captions' all-MiniLM-L6-v2 token embeddings
(``[K, 16, 384]`` + mask) come from the shipped ``jaxdq/assets/digit_captions.npz``, so no text
encoder is needed here.  10% of the captions are replaced by the empty prompt's encoding (the
CFG null caption).  Model: :data:`jaxdq.models.default.TEXT_CONFIG` — PixArt (adaLN-single,
cross-attention to the projected caption states), pixel space 1×16×16, patch 2, hidden 128,
depth 6, 4 heads, learned sigma; DiT's hybrid loss on the linear β schedule (:mod:`train_common`).

    python examples/train_default_text.py --steps 8000 --out /tmp/text_digits

writes ``text_digits16.safetensors`` (EMA weights, float16, Flax paths as keys),
``text_digits16.json`` (config, command, log, wall time, device, the sample prompts) and
``text_digits16_samples.png`` (one row per prompt, DDIM 50 steps, CFG 4).
``--tiny`` trains a very small PixArt (for smoke tests).
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
from train_common import Task, add_train_args, class_agreement, ddim_cfg_sample, labeled_grid, run  # noqa: E402

from jaxdq.data import CAPTION_TEMPLATES, caption_table, load_digit_captions, load_digits_16  # noqa: E402
from jaxdq.models.default import TEXT_CONFIG  # noqa: E402
from jaxdq.models.pixart import PixArt, example_inputs  # noqa: E402
from jaxdq.viz import write_png  # noqa: E402

TINY_CONFIG = dataclasses.replace(TEXT_CONFIG, hidden_size=32, depth=1, num_heads=2)


def caption_data(captions: dict) -> dict:
    """Device-side caption tables: every caption's states/mask with the null caption appended
    as the last row (index ``K``), and each digit's caption indices ``[10, T]``."""
    return {"states": np.concatenate([captions["states"], captions["null_states"]]).astype(np.float32),
            "mask": np.concatenate([captions["mask"], captions["null_mask"]]).astype(np.int32),
            "per_digit": caption_table(captions)}


def draw_captions(data, key_pick, key_drop, labels, drop_prob: float):
    """Caption index per example: one of its digit's captions, or the null row with ``drop_prob``."""
    per = data["per_digit"]
    pick = jax.random.randint(key_pick, labels.shape, 0, per.shape[1])
    idx = per[labels, pick]
    null = data["states"].shape[0] - 1
    return jnp.where(jax.random.uniform(key_drop, labels.shape) < drop_prob, null, idx)


def sample_prompts(captions: dict) -> list[int]:
    """One caption per digit, template ``d mod T`` for digit d (so every template is shown)."""
    table = caption_table(captions)
    return [int(table[d, d % table.shape[1]]) for d in range(10)]


def make_task(cfg=TEXT_CONFIG, name: str = "text_digits16", drop_prob: float = 0.1) -> Task:
    model = PixArt(cfg)
    images, labels = load_digits_16()
    captions = load_digit_captions()
    if captions["states"].shape[-1] != cfg.caption_channels:
        raise ValueError(f"caption width {captions['states'].shape[-1]} != caption_channels {cfg.caption_channels}")
    data = {"images": images, "labels": labels, **caption_data(captions)}

    def apply(p, x, t, cond):
        states, mask = cond
        return model.apply({"params": p}, x, t, states, mask)

    def batch(data, k1, k2, b):
        ka, kb = jax.random.split(k1)
        idx = jax.random.randint(ka, (b,), 0, data["images"].shape[0])
        cap = draw_captions(data, kb, k2, data["labels"][idx], drop_prob)
        return data["images"][idx], (data["states"][cap], data["mask"][cap])

    def sample(ema, out_dir, args):
        per = 10
        rows = sample_prompts(captions)
        states, mask = jnp.asarray(data["states"]), jnp.asarray(data["mask"])
        null = states.shape[0] - 1
        c = jnp.repeat(jnp.asarray(rows), per)
        x_T = jax.random.normal(jax.random.PRNGKey(1), (len(rows) * per, 1, 16, 16))
        fn = lambda p, x, t, i: apply(p["model"], x, t, (p["states"][i], p["mask"][i]))  # noqa: E731
        tables = {"model": ema, "states": states, "mask": mask}
        x0 = ddim_cfg_sample(fn, tables, c, null, x_T, jax.random.PRNGKey(2), scale=args.cfg_scale,
                             num_steps=args.sample_steps)
        fname = f"{name}_samples.png"
        prompts = [str(captions["captions"][i]) for i in rows]
        picture = labeled_grid([x0[i * per:(i + 1) * per] for i in range(len(rows))], prompts)
        write_png(os.path.join(out_dir, fname), picture)
        digits = np.asarray(captions["labels"])[np.repeat(rows, per)]
        return {"file": fname, "prompts": prompts, "per_row": per, "class_agreement": class_agreement(x0, digits),
                "solver": "ddim", "num_steps": args.sample_steps, "cfg_scale": args.cfg_scale, "noise_seed": 1}

    init = lambda k: model.init(k, *example_inputs(cfg))["params"]  # noqa: E731
    return Task(name=name, config=cfg, init=jax.jit(init), apply=apply, data=data, batch=batch, sample=sample,
                extra={"captions": [str(c) for c in captions["captions"]], "caption_templates": list(CAPTION_TEMPLATES),
                       "text_encoder": captions["encoder"], "max_tokens": captions["max_tokens"],
                       "null_caption": "empty prompt", "objective": "hybrid (eps-mse + vb)"})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_train_args(ap, steps=8000, batch=256, lr=3e-4, ema=0.999, ema_warmup=True, log_every=500,
                   out="text_digits_out")
    ap.add_argument("--tiny", action="store_true", help="a very small PixArt (smoke tests)")
    args = ap.parse_args(argv)
    return run(make_task(TINY_CONFIG if args.tiny else TEXT_CONFIG, drop_prob=args.drop_prob), args, argv, __file__)


if __name__ == "__main__":
    main()
