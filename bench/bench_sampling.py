"""Jitted end-to-end sampling time of a model, float vs quantized, side by side in one run.

    python bench/bench_sampling.py --out bench/results/sampling_cpu.json

Writes JSON with one row per method: compile seconds (first call), median
seconds of the jitted sampler over ``--repeats`` calls, per-step milliseconds,
samples/second and weight bytes; plus the device, versions and the command.
The quantized rows run the jnp reference path (fake quantization, the sampler's default
policy), so on their own they measure the cost of quantize/dequantize ops, not a kernel
speed-up.  The methods needing calibration share one calibration (2 samples per class).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    import jax

    from jaxdq.models.sources import load_model
    from jaxdq.quant.layers import nbytes
    from jaxdq.quantize import calibration, calibration_request, quantize_model
    from jaxdq.sampling.families import Request

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--methods", default="float,w8a8,w4a8,naive")
    ap.add_argument("--solver", default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--per-class", type=int, default=10, help="samples per class (10 classes; CFG doubles the batch)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    model = load_model(args.model)
    fam = model.family
    batch = fam.batch(model.config, Request(per_class=args.per_class, seed=0))  # every class (up to 10)
    run = fam.sampler(model.config, solver=args.solver, num_steps=args.steps)
    key = jax.random.PRNGKey(1)
    methods = args.methods.split(",")
    calib = calibration(model, methods, request=calibration_request(model, per_class=2))
    rows = []
    for name in methods:
        m = quantize_model(model, name, calib=calib)
        call = lambda: run(m.params, batch.x_T, batch.cond, batch.uncond, key)  # noqa: E731
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append({"method": name, "compile_plus_first_call_s": round(compile_s, 3),
                     "median_s": round(med, 4), "min_s": round(min(times), 4),
                     "per_step_ms": round(1e3 * med / args.steps, 3),
                     "samples_per_s": round(batch.size / med, 1), "weight_bytes": nbytes(m.params)})
        print(f"{name:8s} median {med:.4f}s  ({1e3 * med / args.steps:.2f} ms/step)  compile {compile_s:.1f}s",
              flush=True)
    dev = jax.devices()[0]
    result = {
        "bench": "sampling", "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}", "jax": jax.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "model": args.model, "solver": args.solver, "steps": args.steps,
        "batch": batch.size, "model_batch_with_cfg": (2 if batch.uncond is not None else 1) * batch.size,
        "repeats": args.repeats,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
