"""SD-1.5 UNet at 512² (random weights): one CFG sampling step in bf16 vs W8A8 and W4A8,
convolutions included — step time and peak device memory (issue 15).

W8A8 / W4A8: per-output-channel symmetric weights (4-bit packed) on every linear and every
conv except the first and last, activations 8-bit symmetric per tensor, dynamic (random
weights have no calibration; the static ranges of the PTQ recipes change the cost of the
activation quantization only), executed under ``--policy`` (default "kernels": the Pallas
GEMMs for the linears where supported, XLA's int8 × int8 → int32 convolution for the convs).
One process per configuration (peak memory is per process)::

    python bench/bench_unet_sd.py --quant w8a8 --out results.jsonl
    python bench/bench_unet_sd.py --quant bf16 --smoke --out /tmp/x.jsonl   # CPU check
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import quiet_gpu  # noqa: E402
from bench.bench_models import emit, setup, time_step  # noqa: E402
from jaxdq.backend import policy as make_policy  # noqa: E402
from jaxdq.quant.layers import QConv, QLinear, iter_layers  # noqa: E402
from jaxdq.quant.quantizer import QuantSpec  # noqa: E402
from jaxdq.quant.rules import LayerQuant, Rule, keep_float, quantize_conv_params, quantize_params  # noqa: E402


def quantize(params, roles, wbits: int):
    cfg = LayerQuant(weight=QuantSpec(bits=wbits, granularity="channel"),
                     act=QuantSpec(bits=8, granularity="tensor"), act_static=False, pack=wbits <= 4)
    rules = [keep_float(), Rule(cfg)]
    q = quantize_params(params, rules, roles=roles)
    return quantize_conv_params(q, rules, roles=roles)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", choices=("bf16", "w8a8", "w4a8"), required=True)
    ap.add_argument("--policy", default="kernels", choices=("reference", "integer", "kernels"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", required=True, help="JSON-lines file to append to")
    ap.add_argument("--smoke", action="store_true", help="CPU check: a tiny UNet of the same layout")
    quiet_gpu.add_arguments(ap)
    args = ap.parse_args()
    quiet = quiet_gpu.from_args(args)
    pol = make_policy("reference" if args.quant == "bf16" else args.policy)
    t0 = time.time()
    params, step, x, roles = setup("sd15-unet-512", args.batch, policy=pol, tiny=args.smoke)
    if args.quant != "bf16":
        params = quantize(params, roles, int(args.quant[1]))
    jax.block_until_ready(params)
    build = time.time() - t0
    layers = dict(iter_layers(params))
    n_qconv = sum(isinstance(l, QConv) for l in layers.values())
    n_qlin = sum(isinstance(l, QLinear) for l in layers.values())
    wbytes = int(sum(l.size * l.dtype.itemsize for l in jax.tree_util.tree_leaves(params)))
    t = jnp.full((args.batch,), 500, jnp.int32)
    out, compile_s, times, peak = time_step(jax.jit(step), params, x, t, args.reps, quiet)
    row = {"model": "sd15-unet-512", "quant": args.quant, "policy": pol.mode, "batch_images": args.batch,
           "step_ms_median": round(1e3 * float(np.median(times)), 3), "step_ms_min": round(1e3 * min(times), 3),
           "compile_s": round(compile_s, 1), "build_s": round(build, 1), "weight_bytes": wbytes,
           "peak_device_bytes": peak, "quantized_convs": n_qconv, "quantized_linears": n_qlin,
           "finite": bool(jnp.isfinite(out).all()), "device": str(jax.devices()[0]), "jax": jax.__version__,
           "reps": args.reps,
           "command": f"python bench/bench_unet_sd.py --quant {args.quant} --policy {args.policy} "
                      f"--batch {args.batch} --reps {args.reps} --out OUT" + (" --smoke" if args.smoke else "")}
    if quiet.report is not None:
        row["quiet_gpu"] = quiet.report
    if args.smoke:
        row["smoke"] = True
    emit(row, args.out)


if __name__ == "__main__":
    main()
