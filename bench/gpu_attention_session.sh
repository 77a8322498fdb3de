#!/usr/bin/env bash
# Issue 19 on the H200, one device call (bench/gpu_quiet_session.sh: parallel compiles, one timer at a time):
#   PART=kernel  the 8-bit attention kernel vs cuDNN at the models' shapes (bench/bench_attention.py);
#                DiT-XL/2 256² steps (bf16, W8A8; cuDNN attention) under XLA's command-buffer settings
#                (default / off / every command type with graphs of any size) and W8A8 with int8qk attention.
#   PART=final   the attention bench; default-DiT compares with float32 / int8qk attention; FLUX and PixArt
#                steps bf16 / svdquant-w4a8 / svdquant-w4a4 (issue 20's step targets).
#   PART=e2e     the attention bench again; PixArt-Σ 1024² and FLUX.1-dev 1024² steps: bf16 and W8A8 with
#                cuDNN vs int8qk attention.
#
#   OUT=... PART=kernel T=540 bash bench/gpu_attention_session.sh
set -uo pipefail
OUT=${OUT:?set OUT}; T=${T:-540}; PART=${PART:-kernel}
E2E="python bench/bench_e2e.py"
CB_OFF="XLA_FLAGS=--xla_gpu_enable_command_buffer="
CB_ALL="XLA_FLAGS='--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=1'"
CMDS=()
if [ "$PART" = kernel ]; then
  CMDS+=("python bench/bench_attention.py --out $OUT/attention_h200.json")
  for m in bf16 w8a8; do
    D="--model dit-xl2-256 --method $m --attention cudnn"
    CMDS+=("$E2E $D --profile --out $OUT/dit_cmdbuf_default_$m.jsonl")
    CMDS+=("$CB_OFF $E2E $D --out $OUT/dit_cmdbuf_off_$m.jsonl")
    CMDS+=("$CB_ALL $E2E $D --out $OUT/dit_cmdbuf_all_$m.jsonl")
  done
  CMDS+=("$E2E --model dit-xl2-256 --method w8a8 --attention int8qk --profile --out $OUT/dit_int8qk_w8a8.jsonl")
elif [ "$PART" = final ]; then
  # the kernel after its scale-folding / hoisting change; the default DiT's quality with the kernel itself
  # (both compares on this GPU: same settings, float32 vs int8qk attention); SVDQuant W4A8 steps (issue 20)
  CMDS+=("python bench/bench_attention.py --out $OUT/attention_h200.json")
  CA="--seeds 0,1,2 --per-class 2 --steps 25 --calib-per-class 2"
  CM="--chunks 1 --model default --methods dynamic-w8a8,vidit-q-w8a8,rtn-w8a8 --timeout 420"
  CMDS+=("bash bench/as_participant.sh python bench/compare_chunks.py $CM --out $OUT/cmp_float32 -- $CA")
  CMDS+=("bash bench/as_participant.sh python bench/compare_chunks.py $CM --out $OUT/cmp_int8qk -- $CA --attention int8qk")
  for model in flux1-dev-1024 pixart-sigma-1024; do
    for m in bf16 svdquant-w4a8 svdquant-w4a4; do
      CMDS+=("$E2E --model $model --method $m --attention cudnn --profile --out $OUT/${model}_${m}.jsonl")
    done
  done
else
  CMDS+=("python bench/bench_attention.py --out $OUT/attention_h200.json")
  for model in pixart-sigma-1024 flux1-dev-1024; do
    for m in bf16 w8a8; do
      for att in cudnn int8qk; do
        CMDS+=("$E2E --model $model --method $m --attention $att --profile --out $OUT/${model}_${m}_${att}.jsonl")
      done
    done
  done
fi
OUT=$OUT T=$T bash bench/gpu_quiet_session.sh "${CMDS[@]}"
