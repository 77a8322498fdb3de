#!/usr/bin/env bash
# Issue 19 items 3 and 4 on the H200, one device call (bench/gpu_quiet_session.sh: parallel compiles,
# one timer at a time):
#   PART=lowrank  the rank-32 low-rank epilogue over the plain W8A8 kernel at the eight shapes of
#                 bench/results/lowrank_epilogue_h200.json, with the low-rank tiles aliasing the epilogue's
#                 store tiles (lr_smem="alias", the default) and in their own SMEM ("separate", the old
#                 kernel), and the plain kernel at the 3-stage depth "separate" forces (max_concurrent_steps=3);
#                 plus the HLO lines of the concatenates in a DiT-XL/2 256² W8A8 step with XLA's dot merger
#                 on (the default: it concatenates the 28 blocks' adaLN weights every step) and off.
#   PART=steps    one step each, the defaults (the blocks' GELU and gate · y + residual in the GEMM epilogues;
#                 the low-rank product in the scaled accumulator) beside the same model without the epilogue
#                 fusion (--no-fuse-epilogue), each also with XLA's dot merger off (--no-dot-merger):
#                 DiT-XL/2 256², PixArt-Σ 1024²
#                 (bf16, W8A8), FLUX.1-dev 1024² (bf16, W8A8), PixArt-Σ svdquant-w4a4 / svdquant-w4a8; profiles.
#   PART=restma   the proj / fc2 shapes of DiT, PixArt-Σ, FLUX: the GEMM with gate · y + residual in its epilogue,
#                 the residual read directly (default) or TMA-copied at the tile's start (res_load="tma"),
#                 and by XLA after it; and the plain kernel with mma_in_flight=0 (not yet run).
#   PART=defaults PixArt-Σ 1024² and FLUX.1-dev 1024², bf16 / W8A8 (the GELU in the GEMMs) / W8A8
#                 --no-fuse-epilogue / W8A8 --fuse-residual (gate · y + residual in the GEMMs too).
#   PART=dit      DiT-XL/2 256² only, 50 reps, each config twice (the run-to-run spread of a launch-bound step):
#                 bf16 / W8A8 with the dot merger on (default) and off, and W8A8 with every layer on XLA's
#                 int8 path (--small-m-xla 512: no Pallas custom calls).
# The 2026-12-04 runs (bench/results/*_commands.txt) predate two flag inversions: their default compiled
# with the dot merger off (--dot-merger turned it on) and fused gate / residual (--no-fuse-residual turned
# it off); each row's compiler_options / fuse_residual fields say which.
#
#   OUT=... PART=lowrank T=240 bash bench/gpu_epilogue_session.sh
#   OUT=... PART=steps T=540 bash bench/gpu_epilogue_session.sh
#   OUT=... PART=dit T=300 bash bench/gpu_epilogue_session.sh
#   OUT=... PART=defaults T=360 bash bench/gpu_epilogue_session.sh
#   OUT=... PART=restma T=240 bash bench/gpu_epilogue_session.sh
set -uo pipefail
OUT=${OUT:?set OUT}; T=${T:-480}; PART=${PART:-lowrank}
E2E="python bench/bench_e2e.py"

D="--model dit-xl2-256 --attention cudnn"
CMDS=()
if [ "$PART" = lowrank ]; then  # one process: no quiet-session barrier needed
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false; mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
  V='xla_bf16$,mgpu_ws_w8a8$,mgpu_ws_w8a8_s3$,mgpu_ws_w8a8_lr32_fused$,mgpu_ws_w8a8_lr32_inacc$,mgpu_ws_w8a8_lr32_fused_sep$,mgpu_ws_w8a8_lr32_inacc_sep$'
  C="python3 bench/bench_kernels.py --out $OUT/lowrank_alias_h200.json --reps 20 --only 2,6,9,11,14,15,16,17 --variants '$V'"
  echo "$C" > "$OUT/commands.txt"; t0=$SECONDS
  timeout "$T" bash -c "$C" > "$OUT/log_lowrank.txt" 2>&1; echo "lowrank rc=$? wall_s=$((SECONDS - t0))" | tee "$OUT/timing.txt"
  for flag in "" "--no-dot-merger"; do  # the step's concatenates (after XLA's optimizations), small excerpt
    H=/tmp/hlo_dump; rm -rf $H; name=${flag:+merger_off}; name=${name:-merger_on}
    C="XLA_FLAGS='--xla_dump_to=$H --xla_dump_hlo_as_text' $E2E $D --method w8a8 --reps 1 $flag --out /tmp/hlo.jsonl"
    echo "$C" >> "$OUT/commands.txt"; t0=$SECONDS
    timeout 150 bash -c "$C" > /dev/null 2>&1; echo "hlo $name rc=$? wall_s=$((SECONDS - t0))" | tee -a "$OUT/timing.txt"
    f=$(ls -S $H/*after_optimizations.txt 2>/dev/null | head -1)
    { echo "== w8a8 $name: $f"; grep -n "concatenate(" "$f" | cut -c1-400 | head -40; } > "$OUT/hlo_concat_$name.txt"
    rm -rf $H
  done
  exit 0
elif [ "$PART" = restma ]; then  # gate · y + residual: loaded directly, by TMA, or by XLA after the GEMM
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false; mkdir -p "$OUT"
  V='xla_bf16$,mgpu_ws_w8a8$,mgpu_ws_w8a8_inflight0$,mgpu_ws_w8a8_gate_res$,mgpu_ws_w8a8_gate_res_tma$,mgpu_ws_w8a8_xla_gate_res$'
  C="python3 bench/bench_kernels.py --out $OUT/residual_tma_h200.json --reps 20 --only 1,3,5,7,10,12,16,17 --variants '$V'"
  echo "$C" > "$OUT/commands.txt"; t0=$SECONDS
  timeout "$T" bash -c "$C" > "$OUT/log_restma.txt" 2>&1; echo "restma rc=$? wall_s=$((SECONDS - t0))" | tee "$OUT/timing.txt"
  exit 0
elif [ "$PART" = dit ]; then  # the launch-bound step again: each config twice, 50 reps
  A="$D --profile --reps 50"
  for rep in 1 2; do
    CMDS+=("$E2E $A --method bf16 --no-dot-merger --out $OUT/dit_new.jsonl" "$E2E $A --method bf16 --out $OUT/dit_merger.jsonl")
    CMDS+=("$E2E $A --method w8a8 --no-dot-merger --out $OUT/dit_new.jsonl" "$E2E $A --method w8a8 --out $OUT/dit_merger.jsonl")
  done
  # every layer (M = 512 rows) through XLA's int8 path instead of the Pallas kernels: no custom calls
  CMDS+=("$E2E $A --method w8a8 --small-m-xla 512 --no-dot-merger --out $OUT/dit_xla_int.jsonl")
  CMDS+=("$E2E $A --method w8a8 --small-m-xla 512 --out $OUT/dit_xla_int.jsonl")
elif [ "$PART" = defaults ]; then  # the defaults as they are now, with and without the epilogue fusion
  for model in pixart-sigma-1024 flux1-dev-1024; do
    A="--model $model --attention cudnn --profile"
    CMDS+=("$E2E $A --method bf16 --out $OUT/defaults.jsonl" "$E2E $A --method w8a8 --out $OUT/defaults.jsonl")
    CMDS+=("$E2E $A --method w8a8 --no-fuse-epilogue --out $OUT/defaults.jsonl")
    CMDS+=("$E2E $A --method w8a8 --fuse-residual --out $OUT/defaults.jsonl")
  done
else
  for model in dit-xl2-256 pixart-sigma-1024; do
    A="--model $model --attention cudnn --profile"
    CMDS+=("$E2E $A --method bf16 --no-dot-merger --out $OUT/steps_${model}.jsonl")
    CMDS+=("$E2E $A --method bf16 --out $OUT/steps_${model}_old.jsonl")
    CMDS+=("$E2E $A --method w8a8 --no-dot-merger --out $OUT/steps_${model}.jsonl")
    CMDS+=("$E2E $A --method w8a8 --no-fuse-epilogue --no-dot-merger --out $OUT/steps_${model}_noepi.jsonl")
    CMDS+=("$E2E $A --method w8a8 --no-fuse-epilogue --out $OUT/steps_${model}_old.jsonl")
  done
  A="--model flux1-dev-1024 --attention cudnn --profile"
  CMDS+=("$E2E $A --method bf16 --no-dot-merger --out $OUT/steps_flux.jsonl")
  CMDS+=("$E2E $A --method w8a8 --no-dot-merger --out $OUT/steps_flux.jsonl")
  A="--model pixart-sigma-1024 --attention cudnn --profile"
  CMDS+=("$E2E $A --method svdquant-w4a4 --no-dot-merger --out $OUT/steps_pixart_svdquant.jsonl")
  CMDS+=("$E2E $A --method svdquant-w4a8 --no-dot-merger --out $OUT/steps_pixart_svdquant.jsonl")
fi
OUT=$OUT T=$T bash bench/gpu_quiet_session.sh "${CMDS[@]}"
