"""Train jaxdq's default model: a small class-conditional DiT on scikit-learn's digits.

The data ship inside the scikit-learn wheel (1797 grey 8×8 digits, 10 classes),
so this needs no download.  Images are upsampled to 16×16 (bilinear) and scaled
to [-1, 1]; the DiT (patch 2, hidden 128, depth 6, 4 heads, learned sigma) is
trained with DiT's objective (ε-MSE + the variational bound for the learned
variance, "hybrid" loss of improved DDPM) on the linear β schedule, 10% label
dropout for classifier-free guidance, AdamW and an EMA of the weights
(the loop is :mod:`train_common`, shared with the other default models).

    python examples/train_default_dit.py --steps 30000 --out /tmp/dit_digits

writes ``dit_digits16.safetensors`` (EMA weights, float16), ``dit_digits16.json``
(config + training record) and ``samples.png`` (one row per class).  The shipped
default model in ``jaxdq/assets/`` was made by this script on the GPU (see
``bench/results/train_default_dit.json`` for the command and the log).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_common import Task, add_train_args, ddim_cfg_sample, hybrid_loss, normal_kl, run  # noqa: E402,F401

from jaxdq.data import load_digits_16  # noqa: E402,F401  (re-exported: tests compare the preprocessing)
from jaxdq.models.default import DEFAULT_CONFIG  # noqa: E402
from jaxdq.models.dit import DiT, init_dit  # noqa: E402
from jaxdq.viz import grid, write_png  # noqa: E402


def make_task(cfg=DEFAULT_CONFIG) -> Task:
    model = DiT(cfg)
    images, labels = load_digits_16()

    def batch(data, k1, k2, b):
        idx = jax.random.randint(k1, (b,), 0, data["images"].shape[0])
        x0, y = data["images"][idx], data["labels"][idx]
        y = jnp.where(jax.random.uniform(k2, y.shape) < cfg.class_dropout_prob, cfg.num_classes, y)
        return x0, y

    def sample(ema, out_dir, args):
        # one row per class, 10 samples each, DDIM 50 steps, CFG 4
        y = jnp.repeat(jnp.arange(10), 10)
        x_T = jax.random.normal(jax.random.PRNGKey(1), (100, 1, 16, 16))
        apply = lambda p, x, t, yy: model.apply({"params": p}, x, t, yy)  # noqa: E731
        x0 = ddim_cfg_sample(apply, ema, y, cfg.num_classes, x_T, jax.random.PRNGKey(2), scale=args.cfg_scale,
                             num_steps=args.sample_steps)
        write_png(os.path.join(out_dir, "samples.png"), grid([x0[i * 10:(i + 1) * 10] for i in range(10)], upscale=4))
        return {"file": "samples.png", "solver": "ddim", "num_steps": args.sample_steps, "cfg_scale": args.cfg_scale}

    return Task(name="dit_digits16", config=cfg, init=lambda k: init_dit(cfg, k),
                apply=lambda p, x, t, y: model.apply({"params": p}, x, t, y),
                data={"images": images, "labels": labels}, batch=batch, sample=sample)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_train_args(ap, steps=30000, batch=256, lr=3e-4, ema=0.9995, out="dit_digits_out")
    args = ap.parse_args(argv)
    if args.drop_prob != DEFAULT_CONFIG.class_dropout_prob:
        raise SystemExit("the DiT's label dropout is its config's class_dropout_prob "
                         f"({DEFAULT_CONFIG.class_dropout_prob})")
    return run(make_task(), args, argv, __file__)


if __name__ == "__main__":
    main()
