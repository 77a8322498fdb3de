#!/usr/bin/env bash
# One device call: train the default UNet, the text-conditioned (PixArt) and the video (Latte)
# default models one after another on one GPU (issues 15 and 17), about 8 minutes in all; or
# only some of them (MODELS).
#
# Usage on the device machine (repo root):  bash bench/gpu_train_session.sh
#   env MODELS (default "unet text video"): which models to train, in that order, e.g.
#   MODELS=video retrains only the video model (~3.5 min: ~150 s training + start-up, saving,
#   sampling and the CFG sweep);
#   env UNET_SECONDS / TEXT_SECONDS / VIDEO_SECONDS (default 100 / 120 / 150): each model's
#   training-loop budget (--max-seconds, compilation included); each model adds ~30-40 s of
#   start-up, init, saving and sampling on top, so ~8 min in all;
#   env UNET_STEPS / TEXT_STEPS / VIDEO_STEPS override the step counts below (UNet and text: sized
#   so that the LR schedule should end inside the budget on an H200; video: an upper bound, the
#   video script fits its schedule to VIDEO_SECONDS itself, --fit-steps; the records say if a
#   run stopped early and, for the video, the fitted schedule);
#   env UNET_BATCH / TEXT_BATCH / VIDEO_BATCH (default 128 / 256 / 128) the batch sizes (video: clips);
#   env TRAIN_EXTRA: extra arguments for every script (a CPU dry run:
#   TRAIN_EXTRA="--tiny --sample-steps 2", with small *_STEPS, *_BATCH and *_SECONDS).
# Needs jax (CUDA), flax, optax, safetensors, scikit-learn, Pillow; no text encoder (the
# caption embeddings ship in jaxdq/assets/digit_captions.npz).
#
# Back in $OUT (8 files, flat, with all three models; with fewer MODELS only theirs + the last two):
#   unet_digits16.safetensors  text_digits16.safetensors  video_digits.safetensors   EMA weights (float16)
#   unet_digits16.json         text_digits16.json         video_digits.json          training records
#   samples.tar                PNG grids, frame strips, the GIF, and the training logs
#   summary.txt                GPU, versions and the summary table (also printed last); "agree" is the
#                              digits classifier's agreement with the intended digit on the sample PNG
#                              (video: per frame), the "recognisable" number; for the video also the
#                              CFG sweep (50 more clips) and the caption check (right < null < wrong)
# Then, here: copy the .safetensors into jaxdq/assets/ and the .json into bench/results/
# (as train_default_unet.json, train_default_text.json, train_default_video.json).
set -euo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the output folder}
UNET_SECONDS=${UNET_SECONDS:-100}
TEXT_SECONDS=${TEXT_SECONDS:-120}
VIDEO_SECONDS=${VIDEO_SECONDS:-150}
UNET_STEPS=${UNET_STEPS:-10000}
TEXT_STEPS=${TEXT_STEPS:-8000}
VIDEO_STEPS=${VIDEO_STEPS:-12000}
UNET_BATCH=${UNET_BATCH:-128}
TEXT_BATCH=${TEXT_BATCH:-256}
VIDEO_BATCH=${VIDEO_BATCH:-128}
read -r -a MODEL_LIST <<< "${MODELS:-unet text video}"
for m in "${MODEL_LIST[@]}"; do
  case $m in unet|text|video) ;; *) echo "MODELS: unknown model '$m' (unet, text, video)" >&2; exit 2 ;; esac
done
[ ${#MODEL_LIST[@]} -gt 0 ] || { echo "MODELS is empty" >&2; exit 2; }
read -r -a EXTRA <<< "${TRAIN_EXTRA:-}"
WORK=$(mktemp -d /tmp/jaxdq_train.XXXXXX)
T0=$(date +%s)

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} | tee "$OUT/summary.txt"
test -f jaxdq/assets/digit_captions.npz

FAILED=()
train() {  # name script steps batch seconds; a failure is reported and the next model still trains
  local name=$1 script=$2 steps=$3 batch=$4 seconds=$5
  echo "=== $name: $script --steps $steps --batch $batch --max-seconds $seconds ($(( $(date +%s) - T0 ))s in)"
  if ! python3 "examples/$script" --steps "$steps" --batch "$batch" --max-seconds "$seconds" \
      --out "$WORK/$name" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$WORK/$name.log"; then
    echo "=== $name FAILED"
    FAILED+=("$name")
  fi
}

wanted() { local m; for m in "${MODEL_LIST[@]}"; do [ "$m" = "$1" ] && return 0; done; return 1; }
if wanted unet;  then train unet  train_default_unet.py  "$UNET_STEPS"  "$UNET_BATCH"  "$UNET_SECONDS"; fi
if wanted text;  then train text  train_default_text.py  "$TEXT_STEPS"  "$TEXT_BATCH"  "$TEXT_SECONDS"; fi
if wanted video; then train video train_default_video.py "$VIDEO_STEPS" "$VIDEO_BATCH" "$VIDEO_SECONDS"; fi

mkdir -p "$WORK/samples"
for name in "${MODEL_LIST[@]}"; do
  for f in "$WORK/$name"/*.safetensors "$WORK/$name"/*.json; do
    if [ -f "$f" ]; then cp "$f" "$OUT/"; fi
  done
  for f in "$WORK/$name"/*.png "$WORK/$name"/*.gif; do
    if [ -f "$f" ]; then cp "$f" "$WORK/samples/"; fi
  done
  if [ -f "$WORK/$name.log" ]; then cp "$WORK/$name.log" "$WORK/samples/train_$name.log"; fi
done
tar -cf "$OUT/samples.tar" -C "$WORK/samples" .

python3 - "$OUT" "$(( $(date +%s) - T0 ))" "${MODEL_LIST[*]}" <<'PY' | tee -a "$OUT/summary.txt"
import json, os, sys
out, total, models = sys.argv[1], sys.argv[2], sys.argv[3].split()
stems = {"unet": "unet_digits16", "text": "text_digits16", "video": "video_digits"}
print(f"\n{'model':<16}{'params':>10}{'steps':>14}{'early':>7}{'loss':>9}{'it/s':>8}{'compile':>9}{'train s':>9}"
      f"{'wall s':>8}{'agree':>7}")
r, video = {}, None
for name in (stems[m] for m in ("unet", "text", "video") if m in models):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        print(f"{name:<16}FAILED (no record: see train_*.log in samples.tar)")
        continue
    r = json.load(open(path))
    a = r["sample"].get("class_agreement", r["sample"].get("frame_class_agreement"))
    agree = "-" if a is None else f"{a:.2f}"
    print(f"{name:<16}{r['params']:>10}{r['steps_done']:>7}/{r['steps_planned']:<6}{str(r['stopped_early']):>7}"
          f"{r['final_loss']:>9.4f}{r['steps_per_second_after_first'] or 0:>8.1f}{r['first_step_seconds']:>9.1f}"
          f"{r['train_seconds']:>9.1f}{r['wall_seconds']:>8.1f}{agree:>7}")
    if name == "video_digits":
        video = r
if video is not None:
    s = video["sample"]
    fit = video.get("fit_steps") or {}
    if fit:
        print(f"video schedule: {fit}")
    if s.get("per_prompt_frame_agreement") is not None:
        print("video per-prompt frame agreement: " + " ".join(f"{a:.2f}" for a in s["per_prompt_frame_agreement"]))
    for row in s.get("cfg_sweep") or []:
        a = row["frame_class_agreement"]
        print(f"video CFG sweep: scale {row['cfg_scale']:g}, {row['clips']} clips: agree "
              + ("-" if a is None else f"{a:.2f}"))
    for t, v in (s.get("caption_check") or {}).items():
        print(f"video caption check t={t}: eps-MSE right {v['right']:.5f}  null {v['null']:.5f}  "
              f"wrong {v['wrong']:.5f}")
print(f"total {total}s; device {r.get('device_kind') or r.get('device')}; files: {sorted(os.listdir(out))}")
PY
[ ${#FAILED[@]} -eq 0 ] || { echo "failed: ${FAILED[*]}"; exit 1; }
