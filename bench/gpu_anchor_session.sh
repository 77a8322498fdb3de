#!/usr/bin/env bash
# One device call per model (issue 19, item 6): jaxdq's one-step rows and the PyTorch anchor in the
# same call, on the same GPU — jaxdq bf16 and W8A8 (cuDNN attention) beside diffusers bf16 eager /
# torch.compile / CUDA graphs and torchao int8 / fp8 (compiled). JSON lines in $OUT/e2e_anchor.jsonl.
#
# Before the call, here (the device has no diffusers / torchao; wheels travel with `carry`):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 torchao==0.18.0   # torchao 0.18 <-> torch 2.11
# Then run(command="MODEL=pixart-sigma-1024 bash bench/gpu_anchor_session.sh", carry=[".whl"]).
# MODEL: dit-xl2-256 | pixart-sigma-1024 | flux1-dev-1024.  CPU check: SMOKE=1 OUT=/tmp/a bash ...
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:?set OUT}; MODEL=${MODEL:?set MODEL}; mkdir -p "$OUT"
T=${T:-150}; SM=""; [ "${SMOKE:-0}" = 1 ] && { SM=--smoke; ATTN=${ATTN:-xla}; }
[ -d .whl ] && python3 -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -1
R=$OUT/e2e_anchor.jsonl
for m in bf16 w8a8; do  # jaxdq, one process each (peak memory per configuration)
  timeout $T python3 bench/bench_e2e.py --model "$MODEL" --method $m --attention ${ATTN:-cudnn} --reps 10 --out $R $SM \
    > "$OUT/jaxdq_$m.log" 2>&1; echo "jaxdq $m rc=$?"
done
[ -n "$SM" ] && ATTN_MODES="eager" || ATTN_MODES=${MODES:-"eager compile compile-cg torchao-int8 torchao-fp8"}
for mode in $ATTN_MODES; do
  timeout $T python3 bench/bench_torch_anchor.py --model "$MODEL" --mode $mode --reps 10 --out $R $SM \
    > "$OUT/torch_$mode.log" 2>&1; echo "torch $mode rc=$?"
done
python3 - "$R" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for r in rows:
    who = r.get("method") or r.get("mode")
    print(f"{r['model']:>18} {r.get('framework', 'jaxdq'):>8} {who:>14} "
          f"{r.get('step_ms_median', r.get('error', '')[:60])!s:>12} finite={r.get('out_finite', r.get('out_finite'))}")
PY
( cd "$OUT" && tar cf session.tar --exclude=session.tar ./* && find . -maxdepth 1 -type f ! -name session.tar ! -name e2e_anchor.jsonl -delete )
