"""TFMQ-DM's Fig. 2 on the default UNet: the temporal-feature error ‖emb_{t,i} − ê_{t,i}‖ per
sampler timestep for round-to-nearest, BRECQ and TFMQ-DM (W4A8 by default).

emb_{t,i} are the outputs of every resnet's ``time_emb_proj`` (the temporal information
block's features, :func:`jaxdq.quant.tfmq.tib_outputs`) at every (timestep, condition) pair
of the calibration — both CFG branches — computed by the float and by each quantized model
(activations quantized as each recipe does: one range for RTN / BRECQ, FSC's per-t ranges
for TFMQ-DM).  Writes JSON (with the command) and a PNG.

    python bench/tfmq_temporal_error.py                 # CPU: ~2-3 min
    python bench/tfmq_temporal_error.py --iters 20000   # the papers' iterations (GPU)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jaxdq.calibrate.blocks import calibration_set  # noqa: E402
from jaxdq.models.sources import load_model  # noqa: E402
from jaxdq.quant import tfmq  # noqa: E402
from jaxdq.quantize import calibration, quantize_model  # noqa: E402
from jaxdq.sampling.families import Request  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--steps", type=int, default=20, help="sampler (= calibration) timesteps")
    ap.add_argument("--iters", type=int, default=100, help="reconstruction iterations per block / for TIAR")
    ap.add_argument("--per-step", type=int, default=1, help="calibration samples per timestep and branch")
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--out", default="bench/results/tfmq_temporal_error.json")
    args = ap.parse_args(argv)
    model = load_model("default-unet")
    classes = tuple(int(c) for c in args.classes.split(","))
    t0 = time.time()
    calib = calibration(model, [f"tfmq-dm-{args.bits}"], request=Request(classes=classes, per_class=1, seed=1000),
                        num_steps=args.steps)
    calib_s = time.time() - t0
    data = calibration_set(calib, per_step=args.per_step, seed=0)
    ts = tfmq.temporal_set(data)
    net = model.family.eps_fn(model.config)
    outs = tfmq.tib_outputs(model.roles)
    opts = f"@iters={args.iters}@per_step={args.per_step}"
    rows = {}
    for name in (f"rtn-{args.bits}", f"brecq-{args.bits}{opts}", f"tfmq-dm-{args.bits}{opts}"):
        t0 = time.time()
        m = quantize_model(model, name, calib=calib, progress=False)
        secs = time.time() - t0
        err = tfmq.temporal_error(net, model.params, m.params, ts, outs)
        rows[name.split("@")[0]] = dict(err, quantize_seconds=round(secs, 2),
                                        report_seconds=(m.metadata.get("report") or {}).get("seconds"))
        print(f"{name:40s} mean ‖emb − ê‖ {np.mean(err['l2']):.4f}  rel {np.mean(err['rel']):.4f}  "
              f"({secs:.1f} s)", flush=True)
    result = {"command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
              "model": "default-unet", "bits": args.bits, "steps": args.steps, "iters": args.iters,
              "per_step": args.per_step, "pairs": ts.size, "features": outs, "calibration_seconds": round(calib_s, 2),
              "methods": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, r in rows.items():
        ax.plot(r["t"], r["l2"], marker="o", ms=3, label=name)
    ax.set_xlabel("timestep t")
    ax.set_ylabel(r"$\|emb_{t} - \hat e_{t}\|$ (all $i$, mean over conditions)")
    ax.set_title(f"temporal-feature error, default-unet {args.bits.upper()} ({args.iters} iters)")
    ax.invert_xaxis()
    ax.legend()
    fig.tight_layout()
    png = os.path.splitext(args.out)[0] + ".png"
    fig.savefig(png, dpi=120)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
