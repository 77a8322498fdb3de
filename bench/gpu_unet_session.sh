#!/usr/bin/env bash
# One device call (issue 15, expected ≤ 4 min on one H200): TFMQ-DM and its baselines on the
# default UNet (jaxdq compare, 3 seeds, calibration + reconstruction wall time per method in
# compare.json's reports), TFMQ-DM vs Q-Diffusion calibration time, the temporal-feature error
# at the reconstruction iterations used here, and SD-1.5 UNet 512² bf16 / W8A8 / W4A8 step time and
# peak memory (convolutions quantized).
# Usage on the device machine (repo root): bash bench/gpu_unet_session.sh      (CPU check: TINY=1 OUT=/tmp/x bash ...)
# PART=sd or PART=compare runs one half (two calls if the whole does not fit one); ITERS sets the
# reconstruction iterations per block (default 500; the papers use 20000).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-bench_out}; mkdir -p $OUT
ITERS=${ITERS:-500}; SEEDS=0,1,2; PER=10; SMOKE=""; T_SD=${T_SD:-300}; T_CMP=${T_CMP:-170}
if [ "${TINY:-0}" = 1 ]; then ITERS=2; SEEDS=0,1; PER=1; SMOKE=--smoke; T_SD=600; T_CMP=1200; fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo cpu) | tee $OUT/gpu.txt
O="@iters=$ITERS@per_step=2"
M=""
for b in w4a8 w8a8 w4a32; do
  M="${M:+$M,}rtn-$b,qdiffusion-$b$O,brecq-$b$O,tfmq-dm-$b$O,tfmq-dm-tiar-$b$O"
  [ $b != w4a32 ] && M="$M,per-step-static-$b,tfmq-dm-fsc-$b$O"
done
[ "${TINY:-0}" = 1 ] && M="rtn-w4a8,qdiffusion-w4a8$O,tfmq-dm-w4a8$O,per-step-static-w4a8"
CMD="python3 -m jaxdq.cli compare --model default-unet --methods $M --seeds $SEEDS --per-class $PER --out $OUT/compare_unet"
echo "$CMD" > $OUT/compare_unet_command.txt
PART=${PART:-all}
if [ $PART != sd ]; then
timeout $T_CMP $CMD 2>&1 | tr '\r' '\n' | grep -av "step/s\|call/s\|it/s\|^\s*$" | tail -n 40
python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
p = os.path.join(out, "compare_unet", "compare.json")
if os.path.exists(p):
    d = json.load(open(p))
    # quantize_s: the recipe's wall time (round-to-nearest + calibration set + reconstruction);
    # the float trajectory calibration is shared by every row (compare's log)
    times = {r["method"]: r.get("quantize_s") for r in d["results"]}
    qd = {k.split("@")[0]: v for k, v in times.items()}
    ratio = {b: round(qd[f"qdiffusion-{b}"] / qd[f"tfmq-dm-{b}"], 3) for b in ("w4a8", "w8a8", "w4a32")
             if qd.get(f"qdiffusion-{b}") and qd.get(f"tfmq-dm-{b}")}
    times = {"quantize_s": times, "qdiffusion_over_tfmq_time": ratio}
    json.dump({"command": open(os.path.join(out, "compare_unet_command.txt")).read().strip(),
               "calibration_seconds": times}, open(os.path.join(out, "unet_calibration_times.json"), "w"), indent=1)
    print(json.dumps(times, indent=1)[:3000])
PY
fi
[ $PART = compare ] && exit 0
for q in bf16 w8a8 w4a8; do
  timeout $T_SD python3 bench/bench_unet_sd.py --quant $q $SMOKE --reps 10 --out $OUT/unet_sd15_512.jsonl 2>&1 | tail -n 1
done
