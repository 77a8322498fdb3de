#!/usr/bin/env bash
# One device call (≤ 9 min): the twin-log (LRQ-DiT) Pallas GEMMs (Triton, and on sm_90 the
# Mosaic GPU one at three tilings) vs XLA bf16 vs the uniform W4A8 kernel on DiT-XL/2,
# PixArt-Σ and FLUX.1 layer shapes at M = 2, 512, 4608-8192, plus the probes of both
# kernels' main-loop MMA instruction.  Usage on the device machine (repo root):
#   bash bench/gpu_twinlog_session.sh
# Writes $OUT/twinlog_h200.json (meta.command, meta.main_loop_instruction,
# meta.hopper_main_loop_instruction, rows), the probe summaries under $OUT/ptx, and
# $OUT/log.txt.  CPU check: bash bench/gpu_twinlog_session.sh --cpu-dry-run
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/twinlog_out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
if [ "${1:-}" = "--cpu-dry-run" ]; then
  ARGS=(--cpu-dry-run --out "$OUT/twinlog_dry.json")
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
  ARGS=(--out "$OUT/twinlog_h200.json" --ptx "$OUT/ptx" --reps 20)
fi
t0=$(date +%s)
timeout "${TW_T:-540}" python3 bench/bench_twinlog.py "${ARGS[@]}" > "$LOG" 2>&1
rc=$?
echo "=== bench_twinlog rc=$rc, $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
# keep only the probe summary of the dump (the .ptx / HLO files are large)
if [ -d "$OUT/ptx" ]; then
  find "$OUT/ptx" -type f ! -name '*probe.json' ! -name '*.ptx' -delete
  find "$OUT/ptx" -name '*.ptx' -size +2M -delete
fi
grep -v '^{' "$LOG" | tail -n 40
exit $rc
