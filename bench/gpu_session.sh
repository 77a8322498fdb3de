#!/usr/bin/env bash
# One device call: train the default model, then benchmark jitted sampling on the GPU.
# Usage on the device machine (repo root):  bash bench/gpu_session.sh STEPS
# Everything lands in $OUT (weights, samples, logs, bench JSON).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
STEPS=${1:-30000}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import jax, flax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'orbax', o.__version__, jax.devices())" | tee -a $OUT/gpu.txt
python3 examples/train_default_dit.py --steps "$STEPS" --max-seconds 360 --out "$OUT" 2>&1 | tee $OUT/train.log
if [ -f "$OUT/dit_digits16.safetensors" ]; then
  mkdir -p jaxdq/assets && cp "$OUT/dit_digits16.safetensors" jaxdq/assets/
  python3 bench/bench_sampling.py --out "$OUT/sampling_gpu.json" 2>&1 | tail -n 8
fi
