#!/usr/bin/env bash
# One device call (H200, <= 9.5 min): issue 17's comparison tables with intervals, and the
# full- vs block-Hadamard online cost.
#
#   bash bench/gpu_compare_session.sh            # on the device machine, repo root; files in $OUT
#   OUT=/tmp/cmp_dry bash bench/gpu_compare_session.sh --tiny   # CPU dry run (tiny settings; ~40 min on 2 cores)
#   VIDIT_METHODS=a,b LRQ_METHODS=c OUT=... bash bench/gpu_compare_session.sh --tiny   # plumbing only
#
# Writes into $OUT:
#   compare_default.json / compare_default-text.json / compare_default-video.json  (jaxdq compare,
#     >= 3 noise seeds: every metric mean, ci95 (half-width of the 95% Student-t interval), per_seed;
#     "command": the exact command line), compare_<model>.png (+ .md), compare_<model>.log
#   hadamard_h200.jsonl (+ .log): bench/bench_hadamard.py, full vs block Hadamard at 1152..15360
#   commands.txt, gpu.txt, timing.txt (wall seconds of each part)
# The compares run as five processes on the one GPU at once (no preallocation; the models are
# tiny, the time is compilation, CPU work, and 16 cores are there): per model ViDiT-Q's table,
# and on default / default-text the LRQ-DiT rows as compare_<model>_lrq.json (same seeds, same
# calibration: the float rows and noise are identical, so the rows compare across the files).
# The Hadamard timing runs alone afterwards.  Each part has its own timeout, so the call ends inside 7 minutes.
#
# Methods (W8A8 and W4A8 each): the fair baselines rtn (ViDiT-Q's naive: per-channel W, static
# per-tensor A), per-step-static, qdiffusion (BRECQ + AdaRound, @iters below), ptq4dit-csb,
# smoothquant; ViDiT-Q's ablation dynamic -> vidit-q-smooth-only -> quarot -> vidit-q, and the
# block-diagonal rotation variants quarot-block, vidit-q-block (not on default: its widths 128/256/512
# are powers of two, where the largest-power-of-two block is the full width and the rows equal
# quarot / vidit-q exactly; default-text/-video have 384); then vidit-q-mp; plus the LRQ-DiT
# rows of bench/methods_lrq.txt (one name per line, '#' comments) on default and default-text.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT"
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1

SEEDS=${SEEDS:-0,1,2}
if [ "$TINY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  PER_DIT=1; PER_TEXT=1; PER_VIDEO=1; STEPS_DIT=4; STEPS_TEXT=4; STEPS_VIDEO=4; CALIB=1
  PER_UNET=1; ITERS=20; MP="@steps=2@per_class=1"; T_CMP=3000; T_HAD=600; HAD_ARGS="--small"
else
  PER_DIT=${PER_DIT:-4}; PER_TEXT=${PER_TEXT:-4}; PER_VIDEO=${PER_VIDEO:-2}
  STEPS_DIT=${STEPS_DIT:-50}; STEPS_TEXT=${STEPS_TEXT:-20}; STEPS_VIDEO=${STEPS_VIDEO:-25}; CALIB=${CALIB:-2}
  PER_UNET=${PER_UNET:-4}; ITERS=${ITERS:-500}; MP=${MP:-"@steps=12@per_class=1"}; T_CMP=${T_CMP:-330}; T_HAD=${T_HAD:-50}; HAD_ARGS=""
fi

methods() {  # $1: vidit = ViDiT-Q's table; lrq = the LRQ-DiT rows
  local m="" w
  if [ "$1" = lrq ] && [ -n "${LRQ_METHODS:-}" ]; then echo "$LRQ_METHODS"; return; fi
  if [ "$1" = vidit ] && [ -n "${VIDIT_METHODS:-}" ]; then echo "$VIDIT_METHODS"; return; fi
  if [ "$1" = lrq ]; then
    if [ -f bench/methods_lrq.txt ]; then
      m="$(grep -v '^\s*#' bench/methods_lrq.txt | tr -s ' \n' ',')"
    else
      m="lrq-dit-w4a6,lrq-dit-w3a8,lrq-dit-w4a4"
    fi
    echo "$m" | sed 's/,,*/,/g; s/^,//; s/,$//'
    return
  fi
  for w in 8 4; do
    for f in rtn per-step-static ptq4dit-csb smoothquant dynamic vidit-q-smooth-only quarot \
             quarot-block vidit-q vidit-q-block; do
      if [ "${2:-}" = noblock ] && [[ "$f" == *-block ]]; then continue; fi
      m="$m,$f-w${w}a8"
    done
  done
  # the slow rows last (reconstruction, the mixed-precision search): a chunk that runs out of
  # time keeps the rows before them (compare writes compare.partial.json after every row)
  m="$m,qdiffusion-w8a8@iters=$ITERS,qdiffusion-w4a8@iters=$ITERS,vidit-q-mp$MP"
  echo "${m#,}"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi (CPU)"
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; } | tee "$OUT/gpu.txt"
: > "$OUT/commands.txt"; : > "$OUT/timing.txt"

# compile time dominates these tiny models' compares: skip XLA's GEMM autotuning there (a flag
# this XLA may not know would abort every process, so it is tried first)
CFLAGS=""
if XLA_FLAGS="--xla_gpu_autotune_level=0" python3 -c "import jax, jax.numpy as jnp; jnp.ones(2).block_until_ready()" >/dev/null 2>&1; then
  CFLAGS="--xla_gpu_autotune_level=0"
fi
echo "compare XLA_FLAGS: ${CFLAGS:-none}" >> "$OUT/gpu.txt"

compare() {  # $1 model, $2 per-class, $3 steps, $4 methods, $5 suffix of the output names, $6 chunks
  local model=$1 dir="$OUT/cmp_$1$5" tag="$1$5"
  # bench/compare_chunks.py: one jaxdq compare process per chunk of the method list (same seeds,
  # noise and calibration; a chunk that times out loses only its rows), merged into one table
  local cmd=(python3 bench/compare_chunks.py --model "$model" --methods "$4" --chunks "${6:-4}"
             --timeout "$T_CMP" --out "$dir" -- --seeds "$SEEDS" --per-class "$2" --steps "$3"
             --calib-per-class "$CALIB" ${7:-})
  echo "${cmd[*]}" >> "$OUT/commands.txt"
  local t0=$SECONDS
  XLA_FLAGS="$CFLAGS ${XLA_FLAGS:-}" "${cmd[@]}" > "$OUT/compare_$tag.log" 2>&1
  local rc=$?
  echo "compare $tag rc=$rc wall_s=$((SECONDS - t0))" >> "$OUT/timing.txt"
  if [ -f "$dir/compare.json" ]; then
    cp "$dir/compare.json" "$OUT/compare_$tag.json"
    cp "$dir/compare.png" "$OUT/compare_$tag.png" 2>/dev/null; cp "$dir/compare.md" "$OUT/compare_$tag.md"
  fi
}

unet_methods() {  # issue 15: TFMQ-DM and its baselines on the default UNet (UNET_METHODS overrides)
  if [ -n "${UNET_METHODS:-}" ]; then echo "$UNET_METHODS"; return; fi
  local O="@iters=$ITERS@per_step=2" M="rtn-w4a8,rtn-w8a8,rtn-w4a32,per-step-static-w4a8,per-step-static-w8a8" b
  for b in w4a8 w8a8 w4a32; do  # the reconstructing rows after the quick ones
    M="$M,qdiffusion-$b$O,brecq-$b$O,tfmq-dm-$b$O,tfmq-dm-tiar-$b$O"
    [ $b != w4a32 ] && M="$M,tfmq-dm-fsc-$b$O"
  done
  echo "$M"
}

# ONLY: the compares to run (tags below; default all), e.g. ONLY="default-unet default-text"
ONLY=${ONLY:-"default default-text default-video default_lrq default-text_lrq default-unet"}
CH=${CHUNKS:-3}
want() { [[ " $ONLY " == *" $1 "* ]]; }
T0=$SECONDS
# SD_PARALLEL=1: the SD-1.5 steps (below) build and compile while the compares run (their int8-conv
# autotuning takes minutes) and time their steps only after the compares are done, one at a time
# (bench/quiet_gpu.py: the compares are one more participant, marked ready when they end)
T_SD=${T_SD:-300}; SMOKE=""; [ "$TINY" = 1 ] && { T_SD=900; SMOKE=--smoke; }
QD="$OUT/.quiet"; rm -rf "$QD"; SD_PIDS=()
sd_step() {  # $1 bf16|w8a8|w4a8, $2 extra arguments
  local t0=$SECONDS
  local SCMD="timeout $T_SD python3 bench/bench_unet_sd.py --quant $1 $SMOKE --reps 10 $2 --out $OUT/unet_sd15_512.jsonl"
  echo "$SCMD" >> "$OUT/commands.txt"
  $SCMD > "$OUT/unet_sd15_$1.log" 2>&1
  echo "unet_sd15 $1 rc=$? wall_s=$((SECONDS - t0))" >> "$OUT/timing.txt"
}
if [ "${SD:-1}" = 1 ] && [ "${SD_PARALLEL:-0}" = 1 ]; then
  SDQ=(${SD_QUANTS:-bf16 w8a8 w4a8})
  for q in "${SDQ[@]}"; do sd_step $q "--quiet-dir $QD --quiet-n $((${#SDQ[@]} + 1)) --wait-max $((T_SD - 60))" & SD_PIDS+=($!); done
fi
CMP_PIDS=()
want default && { compare default "$PER_DIT" "$STEPS_DIT" "$(methods vidit noblock)" "" $CH & CMP_PIDS+=($!); }
want default-text && { compare default-text "$PER_TEXT" "$STEPS_TEXT" "$(methods vidit)" "" $CH & CMP_PIDS+=($!); }
want default-video && { compare default-video "$PER_VIDEO" "$STEPS_VIDEO" "$(methods vidit)" "" $CH & CMP_PIDS+=($!); }
want default_lrq && { compare default "$PER_DIT" "$STEPS_DIT" "$(methods lrq)" _lrq $CH & CMP_PIDS+=($!); }
want default-text_lrq && { compare default-text "$PER_TEXT" "$STEPS_TEXT" "$(methods lrq)" _lrq $CH & CMP_PIDS+=($!); }
want default-unet && { compare default-unet "$PER_UNET" "$STEPS_DIT" "$(unet_methods)" "" ${UNET_CHUNKS:-$CH} & CMP_PIDS+=($!); }
for p in "${CMP_PIDS[@]}"; do wait "$p"; done
echo "compares wall_s=$((SECONDS - T0))" >> "$OUT/timing.txt"
mkdir -p "$QD"; touch "$QD/ready.compares"
for p in "${SD_PIDS[@]}"; do wait "$p"; done

if [ "${HAD:-1}" = 1 ]; then
t0=$SECONDS
HCMD="timeout $T_HAD python3 bench/bench_hadamard.py $HAD_ARGS ${HAD_WIDTHS:+--widths $HAD_WIDTHS} --out $OUT/hadamard_h200.jsonl"
echo "$HCMD" >> "$OUT/commands.txt"
$HCMD > "$OUT/hadamard_h200.log" 2>&1
echo "hadamard rc=$? wall_s=$((SECONDS - t0))" >> "$OUT/timing.txt"
fi
# issue 15: SD-1.5 UNet 512² (random weights) bf16 / W8A8 / W4A8 step time and peak memory
# the quantized SD-1.5 steps need minutes: XLA autotunes the int8 convolutions (125 s was not enough)
[ "${SD:-1}" = 1 ] && [ "${SD_PARALLEL:-0}" != 1 ] && for q in ${SD_QUANTS:-bf16 w8a8 w4a8}; do sd_step $q ""; done
echo "total wall_s=$((SECONDS - T0))" >> "$OUT/timing.txt"
cat "$OUT/timing.txt"
tail -n 20 "$OUT/hadamard_h200.log"
for m in default default-text default-video default_lrq default-text_lrq default-unet; do [ -f "$OUT/compare_$m.md" ] && { echo "== $m"; cat "$OUT/compare_$m.md"; }; done
rm -rf "$OUT"/cmp_* "$QD"
# the device tool returns a limited number of files: pack everything into one tar (+ timing.txt)
( cd "$OUT" && tar cf session.tar --exclude=session.tar --exclude=timing.txt ./* && find . -maxdepth 1 -type f ! -name session.tar ! -name timing.txt -delete )
