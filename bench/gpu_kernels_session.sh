#!/usr/bin/env bash
# One device call for issues 5/6: kernel rows on the main layer shapes, then end-to-end
# quantized sampling steps.  Usage on the device machine (repo root):
#   bash bench/gpu_kernels_session.sh "SHAPE_INDICES" "MODELS" "METHODS" KERNEL_TIMEOUT
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
SHAPES=${1:-6,0,14}
MODELS=${2:-dit-xl2-256}
METHODS=${3:-"bf16 w8a8 w4a8 svdquant-w4a4"}
KT=${4:-240}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
if [ "$SHAPES" != "none" ]; then
  timeout "$KT" python3 bench/bench_kernels.py --only "$SHAPES" --reps 20 --out $OUT/kernels.json 2>&1 \
    | grep -v "^{" | tail -n 80
fi
for m in $MODELS; do
  for meth in $METHODS; do
    timeout 150 python3 bench/bench_e2e.py --model $m --method $meth --profile --out $OUT/e2e.jsonl 2>&1 | tail -n 2 | cut -c1-1500
  done
done
