#!/usr/bin/env bash
# One device call: several benchmark processes on the one GPU at once — they build and compile in
# parallel (the minutes of XLA autotuning / torch.compile overlap) and time one at a time after
# all have compiled (bench/quiet_gpu.py: a ready-count barrier, then an exclusive file lock).
#
#   OUT=... T=540 bash bench/gpu_quiet_session.sh "CMD" "CMD" ...
#
# Each CMD (a benchmark accepting --quiet-dir/--quiet-n/--wait-max: bench_e2e.py,
# bench_torch_anchor.py, bench_unet_sd.py) runs under `timeout $T` with those three appended;
# the barrier gives up at T − 60 s (a process still compiling then does not hold the others up:
# their rows say "all_ready": false).  Wheels in .whl/ (diffusers, torchao: see
# bench/gpu_anchor_session.sh) are installed first.  Logs $OUT/log_<i>.txt, commands.txt,
# timing.txt; everything but timing.txt packed into $OUT/session.tar.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:?set OUT}; T=${T:-540}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
[ -d .whl ] && python3 -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -1
QD="$OUT/.quiet"; rm -rf "$QD"; mkdir -p "$QD"
: > "$OUT/commands.txt"; : > "$OUT/timing.txt"
T0=$SECONDS; i=0; PIDS=()
for c in "$@"; do
  i=$((i + 1))
  full="$c --quiet-dir $QD --quiet-n $# --wait-max $((T - 60))"
  echo "$full" >> "$OUT/commands.txt"
  ( t0=$SECONDS; timeout "$T" bash -c "$full" > "$OUT/log_$i.txt" 2>&1
    echo "[$i] rc=$? wall_s=$((SECONDS - t0)) $c" >> "$OUT/timing.txt" ) &
  PIDS+=($!)
done
for p in "${PIDS[@]}"; do wait "$p"; done
echo "total wall_s=$((SECONDS - T0))" >> "$OUT/timing.txt"
cat "$OUT/timing.txt"
rm -rf "$QD"
( cd "$OUT" && tar cf session.tar --exclude=session.tar --exclude=timing.txt ./* \
  && find . -maxdepth 1 -type f ! -name session.tar ! -name timing.txt -delete )
