#!/usr/bin/env bash
# One device call (≤ 4 min): issue 19 items 1 and 5 on an H200.
#  (1) bench_fused_norm.py kernels: fused norm→quantize kernel vs XLA norm + separate quantize
#      vs the bf16 norm, % of the copy bandwidth measured in the same run (and of 4.8 TB/s), a
#      launch-config sweep; FP8 vs int8 vs bf16 GEMMs (XLA dots, Hopper wgmma int8 / e4m3) at
#      DiT-XL/2 256², PixArt-Σ 1024², FLUX.1 1024² shapes; JSON rewritten per row.     (≤ 80 s)
#  (2) bench_fused_norm.py e2e: one jitted W8A8 sampling step (cuDNN attention), fuse_norm on/off,
#      PixArt-Σ 1024² (2 × ≤ 45 s) and DiT-XL/2 256² (2 × ≤ 35 s).  Total ≤ 80 + 160 = 240 s.
# Usage on the device machine (repo root):  bash bench/gpu_fused_session.sh
# Writes $OUT/fused_norm_h200.json, $OUT/fused_e2e_h200.jsonl (each with its exact command), $OUT/log.txt.
# CPU check: bash bench/gpu_fused_session.sh --cpu-dry-run
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/fused_out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
: > "$LOG"
if [ "${1:-}" = "--cpu-dry-run" ]; then
  TINY=(--tiny); KOUT=$OUT/fused_norm_dry.json; EOUT=$OUT/fused_e2e_dry.jsonl; KT=150
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
  TINY=(); KOUT=$OUT/fused_norm_h200.json; EOUT=$OUT/fused_e2e_h200.jsonl; KT=80
fi
t0=$(date +%s)
timeout $KT python3 bench/bench_fused_norm.py kernels --reps 10 --out "$KOUT" "${TINY[@]}" >> "$LOG" 2>&1
echo "=== kernels rc=$?, $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
for model in pixart-sigma-1024 dit-xl2-256; do
  ET=70; [ "$model" = dit-xl2-256 ] && ET=50; [ ${#TINY[@]} -gt 0 ] && ET=60
  for fuse in 1 0; do
    t1=$(date +%s)
    timeout $ET python3 bench/bench_fused_norm.py e2e --model "$model" --fuse-norm $fuse --reps 10 \
      --out "$EOUT" "${TINY[@]}" >> "$LOG" 2>&1
    echo "=== e2e $model fuse_norm=$fuse rc=$?, $(( $(date +%s) - t1 )) s" | tee -a "$LOG"
  done
done
echo "=== total $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
grep -v '^{"shape"' "$LOG" | tail -n 30
