"""Calibration + quantization of DiT-XL/2 (random weights, real size) on one device.

Measures wall time and peak device memory of: the float CFG sampling trajectory +
per-timestep cond/uncond statistics replay (``jaxdq.pipeline.calibrate``), and of
each recipe's quantization (ViDiT-Q W8A8/W4A8, the static baselines, ViDiT-Q
mixed precision).  JSON out.

    python bench/bench_calibrate_xl.py --out bench/results/calibrate_dit_xl2_h100.json
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
from jaxdq.pipeline import LoadedModel, calibrate, quantize_model, weight_bytes  # noqa: E402


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
    args = ap.parse_args()
    cfg = dit_config(args.config)
    params = init_dit(cfg, jax.random.PRNGKey(0))
    # random-but-not-degenerate weights: DiT's zero-initialised adaLN / final layers get small noise
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [jnp.where(l == 0, 0.02 * jax.random.normal(k, l.shape, l.dtype), l) for l, k in zip(leaves, keys)]
    model = LoadedModel(cfg, jax.tree_util.tree_unflatten(tree, leaves), {"method": "float", "bits": "W32A32"})
    rows = {"device": str(jax.devices()[0]), "jax": jax.__version__, "model": f"{args.config} (random weights)",
            "float_weight_bytes": weight_bytes(model.params), "settings": vars(args), "command":
            "python bench/bench_calibrate_xl.py --out " + args.out, "results": []}
    t0 = time.time()
    calib = calibrate(model, classes=list(range(args.classes)), per_class=args.per_class, num_steps=args.steps,
                      keep_inputs="vidit-q-mp" in args.methods, progress=True)
    jax.block_until_ready(calib["cond"])
    rows["calibration"] = {"seconds": round(time.time() - t0, 1), "peak_device_bytes": peak_bytes(),
                           "samples": args.classes * args.per_class, "cfg_batch": 2 * args.classes * args.per_class,
                           "steps": args.steps,
                           "stats_bytes": int(sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(
                               {k: calib[k] for k in ("cond", "uncond")})))}
    print(json.dumps(rows["calibration"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    for m in args.methods.split(","):
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
