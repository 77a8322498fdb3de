#!/usr/bin/env bash
# One device call: bf16 float baselines of the model zoo (issue 3) + DiT-XL/2 calibration/quantization (issue 4).
# Usage on the device machine (repo root): bash bench/gpu_models_session.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
for m in dit-xl2-256 pixart-sigma-1024 sd15-unet-512 flux1-dev-1024; do
  timeout 150 python3 bench/bench_models.py --model $m --out $OUT/models_bf16.jsonl 2>&1 | tail -n 3
done
timeout 200 python3 bench/bench_calibrate_xl.py --out $OUT/calibrate_dit_xl2.json 2>&1 | grep -v "sampling\|calibrating" | tail -n 12
