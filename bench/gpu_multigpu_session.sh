#!/usr/bin/env bash
# Issue 21 (past one GPU): FLUX.1-dev 1024² W8A8 step, tensor parallel over every local GPU vs 1 GPU,
# and data-parallel DiT-XL/2 calibration throughput N vs 1 (two processes: clean peak-memory numbers).
# For nvidia-h200-x2; on one GPU it writes only the 1-device rows (validates the script).
# Usage on the device machine (repo root): bash bench/gpu_multigpu_session.sh
# Expected wall time: ~4 min on 2 H200s, ~2 min on one.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0
OUT=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu_multigpu.txt
nvidia-smi topo -m >> $OUT/gpu_multigpu.txt 2>&1
N=$(nvidia-smi -L | wc -l)
timeout 300 python3 bench/bench_multigpu.py --devices $N --skip calib --out $OUT/multigpu_flux_h200x$N.json 2>&1 \
  | grep -v "^sampling\|^calibrating" | tail -n 8
timeout 240 python3 bench/bench_multigpu.py --devices $N --skip flux --out $OUT/multigpu_calib_h200x$N.json 2>&1 \
  | grep -v "^sampling\|^calibrating" | tail -n 8
