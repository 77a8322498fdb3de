"""Train jaxdq's default UNet: a class-conditional diffusers-``UNet2DModel``-layout DDPM on the digits.

Data: scikit-learn's digits as 16×16 in [-1, 1] (:func:`jaxdq.data.load_digits_16`, the default
DiT's data).  Model: :data:`jaxdq.models.default.UNET_CONFIG` — channels (32, 64, 64) over
16×16 / 8×8 / 4×4, two ResNet blocks per down stage (three per up stage), spatial self-attention
at 8×8 and in the 4×4 mid block, 11 class embeddings added to the time embedding (label 10 is
the classifier-free-guidance null class; 10% label dropout).  ε-prediction, MSE, the linear β
schedule (DDPM), AdamW, EMA (:mod:`train_common`).

    python examples/train_default_unet.py --steps 10000 --out /tmp/unet_digits

writes ``unet_digits16.safetensors`` (EMA weights, float16, Flax paths as keys),
``unet_digits16.json`` (config, command, log, wall time, device) and
``unet_digits16_samples.png`` (one row per class, DDIM 50 steps, CFG 4).
``--tiny`` trains a very small UNet (for smoke tests).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_common import Task, add_train_args, class_agreement, ddim_cfg_sample, labeled_grid, run  # noqa: E402

from jaxdq.data import load_digits_16  # noqa: E402
from jaxdq.models.default import UNET_CONFIG, UNET_NULL_CLASS  # noqa: E402
from jaxdq.models.unet import UNet, init_unet  # noqa: E402
from jaxdq.viz import write_png  # noqa: E402

TINY_CONFIG = dataclasses.replace(UNET_CONFIG, block_out_channels=(8, 16),
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
                                  attention_head_dim=8)


def make_task(cfg=UNET_CONFIG, name: str = "unet_digits16", drop_prob: float = 0.1) -> Task:
    model = UNet(cfg)
    null = cfg.num_class_embeds - 1
    images, labels = load_digits_16()

    def apply(p, x, t, y):
        return model.apply({"params": p}, x, t, None, y)

    def batch(data, k1, k2, b):
        idx = jax.random.randint(k1, (b,), 0, data["images"].shape[0])
        x0, y = data["images"][idx], data["labels"][idx]
        return x0, jnp.where(jax.random.uniform(k2, y.shape) < drop_prob, null, y)

    def sample(ema, out_dir, args):
        per = 10
        y = jnp.repeat(jnp.arange(10), per)
        x_T = jax.random.normal(jax.random.PRNGKey(1), (10 * per, 1, 16, 16))
        x0 = ddim_cfg_sample(apply, ema, y, null, x_T, jax.random.PRNGKey(2), scale=args.cfg_scale,
                             num_steps=args.sample_steps)
        fname = f"{name}_samples.png"
        write_png(os.path.join(out_dir, fname), labeled_grid([x0[i * per:(i + 1) * per] for i in range(10)],
                                                                [str(i) for i in range(10)]))
        return {"file": fname, "rows": "class 0-9", "per_row": per, "class_agreement": class_agreement(x0, y),
                "solver": "ddim", "num_steps": args.sample_steps, "cfg_scale": args.cfg_scale, "noise_seed": 1}

    return Task(name=name, config=cfg, init=lambda k: init_unet(cfg, k), apply=apply,
                data={"images": images, "labels": labels}, batch=batch, sample=sample,
                extra={"null_class": null, "objective": "eps-mse"})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_train_args(ap, steps=10000, batch=128, lr=2e-4, ema=0.999, ema_warmup=True, log_every=500,
                   out="unet_digits_out")
    ap.add_argument("--tiny", action="store_true", help="a very small UNet (smoke tests)")
    args = ap.parse_args(argv)
    assert UNET_NULL_CLASS == UNET_CONFIG.num_class_embeds - 1
    return run(make_task(TINY_CONFIG if args.tiny else UNET_CONFIG, drop_prob=args.drop_prob), args, argv, __file__)


if __name__ == "__main__":
    main()
