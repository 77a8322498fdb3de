"""Calibration + quantization of DiT-XL/2 (random weights, real size) on one device.

Measures wall time and peak device memory of: the float CFG sampling trajectory +
per-timestep cond/uncond statistics replay (``jaxdq.quantize.calibration``, one
calibration serving every method, through :func:`jaxdq.calibrate.calibrate`), and of
each recipe's quantization (``jaxdq.quantize.quantize_model``: ViDiT-Q W8A8/W4A8, the
static baselines, ViDiT-Q mixed precision).  JSON out.

    python bench/bench_calibrate_xl.py --out bench/results/calibrate_dit_xl2_h100.json

``--smoke``: DiT-S/8 cut to one block, 2 classes × 1 sample, 4 steps, mixed precision on
1 step × 2 samples a segment (CPU check of this script).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdq.models.dit import dit_config, init_dit  # noqa: E402
from jaxdq.models.sources import LoadedModel  # noqa: E402
from jaxdq.quant.layers import nbytes as weight_bytes  # noqa: E402  (every array of the tree, as before)
from jaxdq.quantize import CALIB_SEED, calibration, quantize_model  # noqa: E402
from jaxdq.sampling.families import Request  # noqa: E402


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="DiT-XL/2", help="named DiT config (random weights)")
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--methods", default="vidit-q-w8a8,vidit-q-w4a8,naive-w8a8,qdiffusion-w8a8,smoothquant-w8a8,"
                                         "quarot-w8a8,vidit-q-mp")
    ap.add_argument("--mp-steps", type=int, default=3, help="mixed precision: calibration steps per segment")
    ap.add_argument("--mp-samples", type=int, default=16, help="mixed precision: samples per step")
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script (see the module docstring)")
    args = ap.parse_args()
    overrides = {}
    if args.smoke:
        args.config, args.classes, args.per_class, args.steps, args.mp_steps, args.mp_samples = \
            "DiT-S/8", 2, 1, 4, 1, 2
        overrides = {"depth": 1}
    cfg = dit_config(args.config, **overrides)
    params = init_dit(cfg, jax.random.PRNGKey(0))
    # random-but-not-degenerate weights: DiT's zero-initialised adaLN / final layers get small noise
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [jnp.where(l == 0, 0.02 * jax.random.normal(k, l.shape, l.dtype), l) for l, k in zip(leaves, keys)]
    model = LoadedModel(cfg, jax.tree_util.tree_unflatten(tree, leaves),
                        {"arch": "dit", "method": "float", "bits": "W32A32"})
    rows = {"device": str(jax.devices()[0]), "jax": jax.__version__,
            "model": f"{args.config}{' (1 block)' if args.smoke else ''} (random weights)",
            "float_weight_bytes": weight_bytes(model.params), "settings": vars(args), "command":
            "python bench/bench_calibrate_xl.py --out " + args.out + (" --smoke" if args.smoke else ""),
            "results": []}
    methods = args.methods.split(",")
    t0 = time.time()
    # one calibration for every method: the float model's own CFG trajectories from noise seed
    # CALIB_SEED (sampler key seed + 1), statistics per step and branch, the trajectory kept
    # when a method needs it (mixed precision), stored input tokens when one needs them
    calib = calibration(model, methods, request=Request(classes=tuple(range(args.classes)),
                                                        per_class=args.per_class, seed=CALIB_SEED),
                        num_steps=args.steps, progress=True)
    if calib is None:
        raise SystemExit(f"none of {methods} needs calibration: nothing to measure")
    jax.block_until_ready(calib["cond"])
    rows["calibration"] = {"seconds": round(time.time() - t0, 1), "peak_device_bytes": peak_bytes(),
                           "samples": args.classes * args.per_class, "cfg_batch": 2 * args.classes * args.per_class,
                           "steps": args.steps,
                           "stats_bytes": int(sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(
                               {k: calib[k] for k in ("cond", "uncond")})))}
    print(json.dumps(rows["calibration"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    for m in methods:
        t0 = time.time()
        kw = {"steps_per_segment": args.mp_steps, "max_samples": args.mp_samples} if m == "vidit-q-mp" else {}
        q = quantize_model(model, m, calib=calib, progress=False, **kw)
        jax.block_until_ready(jax.tree_util.tree_leaves(q.params))
        r = {"method": m, "seconds": round(time.time() - t0, 1), "peak_device_bytes": peak_bytes(),
             "weight_bytes": weight_bytes(q.params)}
        r["compression_vs_fp32"] = round(rows["float_weight_bytes"] / r["weight_bytes"], 2)
        print(json.dumps(r), flush=True)
        rows["results"].append(r)
        del q
        with open(args.out, "w") as f:  # after every method: a killed run keeps what it measured
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
