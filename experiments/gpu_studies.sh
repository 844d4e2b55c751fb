#!/usr/bin/env bash
# The two reference studies at their full epoch counts on one GPU,
# on the 12,111 bulk-100px images at 96 px from scratch, plus a screen of CPU-recipe
# variants (configs/cpu-bench.yaml and changes of it) run at their own epoch counts.
# All runs go concurrently on the one GPU (one process each), every run stops at the
# deadline if it has not finished (its last complete epoch stays, as after any kill),
# and each is then evaluated on its held-out split. Nothing but this script's runs is
# written, under OUT.
#
#   [ONLY="improved"] bash experiments/gpu_studies.sh DATA_DIR OUT [TRAIN_SECONDS]
#
# DATA_DIR: labels.csv + images/ (PNG or WebP; scripts/pack-webp.py packs them to carry).
# How to run it on a GPU machine: experiments/2026-11-26-studies-gpu.md.
set -uo pipefail
DATA=${1:?DATA_DIR}
OUT=${2:?OUT}
TRAIN_SECONDS=${3:-400}
RUNS="$OUT/runs"
CACHE=${CACHE:-/tmp/boneage-gpu-cache}
export KERAS_BACKEND=${KERAS_BACKEND:-jax}
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
mkdir -p "$RUNS" "$OUT/logs"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

if [ "$KERAS_BACKEND" = jax ] && [ -z "${ALLOW_CPU:-}" ] && ! python3 -c \
    "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')"; then
  echo "JAX sees no GPU here: the torch backend instead"
  export KERAS_BACKEND=torch
fi
stamp "backend $KERAS_BACKEND; $(nvidia-smi -L 2>/dev/null | head -1)"
python3 -c "import keras; print('keras', keras.__version__, keras.backend.backend())" || exit 1
python3 cli.py prepare --data-dir "$DATA" --size 96 --resize stretch --cache-dir "$CACHE" \
  >"$OUT/logs/prepare.log" 2>&1 || { tail -5 "$OUT/logs/prepare.log"; exit 1; }
stamp "cache ready"

# augmentation on the numpy engine: one fused warp per image in the loader's threads
# (the keras engine's eight layers held the improved model to ~90 images/s here)
COMMON=(--data-dir "$DATA" --set data.image_size=96 --set data.resize=stretch
        --set "data.cache_dir=$CACHE" --set model.weights=none --set "train.output_dir=$RUNS"
        --set "augment.engine=${AUG_ENGINE:-numpy}"
        # the 1,000-image selection split, held out first and scored by evaluate: the
        # same images as the CPU-scale runs, whatever data.max_images is
        --set "data.selection_size=${SELECTION:-1000}"
        ${EXTRA_SETS:-})   # e.g. EXTRA_SETS="--set data.max_images=300" for a smoke test
# study 1 on the ResNet18 study's 80/10/10 stratified split (same seed: the same images)
SPLIT=(--set data.split=stratified --set data.val_fraction=0.1 --set data.test_fraction=0.1)

train() {  # name config workers [--set ...]
  local name=$1 config=$2 workers=$3
  shift 3
  python3 cli.py train --config "$config" "${COMMON[@]}" --set "data.workers=$workers" \
    --set "train.run_name=$name" "$@" >"$OUT/logs/$name.log" 2>&1
  stamp "$name ended (exit $?)"
}

# ONLY picks some of: baseline improved study1 screen ablation lr (default all but
# ablation and lr;
# e.g. ONLY=improved gives the improved model, the slowest, the whole machine's cores)
ONLY=" ${ONLY:-baseline improved study1 screen} "
n_runs=$(wc -w <<<"$ONLY")
workers() {   # $1: the run's share of 16 workers when all four run; 1 to 14
  local w=$(( $1 * 4 / n_runs ))
  echo $(( w > 14 ? 14 : (w < 1 ? 1 : w) ))
}
[[ $ONLY == *" baseline "* ]] && train baseline resnet18-baseline "$(workers 3)" &
[[ $ONLY == *" improved "* ]] && train improved resnet18-improved "$(workers 6)" &
[[ $ONLY == *" study1 "* ]] && train study1 default "$(workers 5)" "${SPLIT[@]}" &
# which half of the improved model keeps it at the training mean (not in the default set)
NO_AUG=(--set augment.rotation_degrees=0 --set augment.shear=0 --set augment.scale=null
        --set augment.contrast=null --set augment.brightness=0 --set augment.blur_probability=0
        --set augment.salt_pepper=null --set augment.random_crop=false)
[[ $ONLY == *" ablation "* ]] && train improved-head resnet18-improved "$(workers 4)" \
  "${NO_AUG[@]}" &
[[ $ONLY == *" ablation "* ]] && train baseline-augment resnet18-improved "$(workers 4)" \
  --set model.head_units=0 --set model.dropout=0 &
# both study recipes at Adam 1e-4, where the improved model's hidden units survive
# (experiments/2026-11-27-improved-model-collapse.md; not in the default set)
[[ $ONLY == *" lr "* ]] && train baseline-lr1e-4 resnet18-baseline "$(workers 3)" \
  --set train.learning_rate=0.0001 &
[[ $ONLY == *" lr "* ]] && train improved-lr1e-4 resnet18-improved "$(workers 6)" \
  --set train.learning_rate=0.0001 &
screen=
if [[ $ONLY == *" screen "* ]]; then
  (  # the CPU-recipe screen, one after another (cpu-bench itself, batch 16, Adam 2e-3
     # and MSE were screened in the first GPU run; experiments/2026-11-27-cpu-recipe.md), on cpu-bench as it was
     # then: full width, the stem's max-pool, no shifts, 24 epochs
    as_screened=(--set model.width=1 --set model.stem_pool=true --set train.epochs=24)
    train cpu-bench-shift cpu-bench "$(workers 2)" "${as_screened[@]}" --set augment.translation=0.05
    train cpu-bench-affine cpu-bench "$(workers 2)" "${as_screened[@]}" --set augment.translation=0.05 \
      --set augment.rotation_degrees=5 --set "augment.scale=[0.95,1.05]"
  ) &
  screen=$!
fi

# stop whatever still trains at the deadline
while (( $(date +%s) - start < TRAIN_SECONDS )) && pgrep -f "cli.py train" >/dev/null; do
  sleep 5
done
if pgrep -f "cli.py train" >/dev/null; then
  stamp "deadline: stopping the runs still training"
  [ -n "$screen" ] && kill "$screen" 2>/dev/null
  pkill -INT -f "cli.py train"; sleep 15; pkill -KILL -f "cli.py train"
fi
wait
stamp "training over"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null

for run in "$RUNS"/*/; do
  name=$(basename "$run")
  [ -f "$run/best.keras" ] || { stamp "$name: no finished epoch"; continue; }
  python3 cli.py evaluate "$run" --out "$run/eval" >"$OUT/logs/eval-$name.log" 2>&1 &
done
wait
stamp "evaluated"
for run in "$RUNS"/*/; do
  name=$(basename "$run")
  echo "== $name: $(wc -l <"$run/history.csv" 2>/dev/null) lines of history"
  tail -2 "$run/history.csv" 2>/dev/null
  python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print({k: m.get(k) for k in ('title','n','mae','rmse','r2','tolerance_accuracy')})" \
    "$run/eval/metrics.json" 2>/dev/null
done
[ -d "$RUNS/baseline/eval" ] && [ -d "$RUNS/improved/eval" ] && \
  python3 cli.py compare "$RUNS/baseline/eval" "$RUNS/improved/eval" 2>&1 | head -3
[ -d "$RUNS/baseline-lr1e-4/eval" ] && [ -d "$RUNS/improved-lr1e-4/eval" ] && \
  python3 cli.py compare "$RUNS/baseline-lr1e-4/eval" "$RUNS/improved-lr1e-4/eval" 2>&1 | head -3
# the runs without their model files (too large to carry back), one archive
tar czf "$OUT/gpu-runs.tgz" --exclude='*.keras' --exclude='*.h5' -C "$OUT" runs logs
stamp "done"
