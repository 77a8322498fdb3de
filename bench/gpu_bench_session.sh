#!/usr/bin/env bash
# One device call: per-layer kernel diagnostics, then end-to-end quantized sampling steps.
# Every command's output goes to $OUT/log.txt (tail on the console).  Usage (repo root):
#   bash bench/gpu_bench_session.sh "STEP;STEP;..."   with STEP = "diag MODEL METHODS SECS" |
#        "e2e MODEL METHOD SECS [ATTENTION [SMALL_M_XLA]]" | "kern SHAPE_INDICES SECS [VARIANT_PREFIXES]"
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
LOG=$OUT/log.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
IFS=';' read -ra STEPS <<< "$1"
n=0
for st in "${STEPS[@]}"; do
  n=$((n + 1))
  read -ra a <<< "$st"
  t0=$(date +%s)
  case "${a[0]}" in
    diag) timeout "${a[3]}" python3 bench/diag_layers.py --model "${a[1]}" --methods "${a[2]}" --out $OUT/diag.jsonl > /tmp/step.log 2>&1 ;;
    e2e)  timeout "${a[3]}" python3 bench/bench_e2e.py --model "${a[1]}" --method "${a[2]}" --attention "${a[4]:-float32}" --profile --out $OUT/e2e.jsonl ${a[5]:+--small-m-xla "${a[5]}"} > /tmp/step.log 2>&1 ;;
    kern) timeout "${a[2]}" python3 bench/bench_kernels.py --only "${a[1]}" --reps 20 --variants "${a[3]:-all}" --out $OUT/kernels_$n.json > /tmp/step.log 2>&1 ;;
  esac
  rc=$?
  echo "=== $st: rc=$rc, $(( $(date +%s) - t0 )) s" | tee -a $LOG
  grep -v '^{' /tmp/step.log | grep -v "^\s*$" | tail -n 60 | cut -c1-1000 >> $LOG
  grep '^{' /tmp/step.log | cut -c1-400 >> $LOG
done
tail -c 9000 $LOG
