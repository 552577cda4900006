#!/usr/bin/env bash
# A CPU recipe for real face photos: two models on every training person, then their soft vote.
#   recipes/realface_cpu.sh TRAIN_DIR EVAL_DIR OUT_DIR
# TRAIN_DIR: competition training layout (train/ or train/images); EVAL_DIR: info.csv + images/.
# Writes OUT_DIR/output.csv (and output_probs.csv). Training flags: recipes/realface_cpu.yaml.
# Measured on 2 CPU cores: see README "Recipes" (wall time, and its 5-fold estimate on new people).
# SEED=N (default 0) changes the initialisation of the new heads and the data order;
# TRACKING_URI=... logs the run to MLflow (default: none, so the recipe writes nothing else).
set -euo pipefail
TRAIN_DIR=${1:?usage: $0 TRAIN_DIR EVAL_DIR OUT_DIR}
EVAL_DIR=${2:?usage: $0 TRAIN_DIR EVAL_DIR OUT_DIR}
OUT=${3:?usage: $0 TRAIN_DIR EVAL_DIR OUT_DIR}
SEED=${SEED:-0}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
rm -rf "$OUT/model/flip" "$OUT/model/fastaug"  # a re-run replaces its own runs (train.py never overwrites one)
start=$(date +%s)

# 1. Two EfficientNet-Lite0 models (offline ImageNet weights), three heads (mask, gender, age group),
#    128x128, label smoothing, AdamW + one-cycle, 6 epochs on every person; they differ in augmentation:
#    flip only, and flip + shift/scale + colour jitter. The second reads the image cache the first filled.
python train.py --config recipes/realface_cpu.yaml --data_dir "$TRAIN_DIR" --model_dir "$OUT/model" \
    --name flip --seed "$SEED" --cache_dir "$OUT/cache" --tracking_uri "${TRACKING_URI:-none}"
python train.py --config recipes/realface_cpu.yaml --augmentation FastAugmentation --data_dir "$TRAIN_DIR" \
    --model_dir "$OUT/model" --name fastaug --seed "$SEED" --cache_dir "$OUT/cache" \
    --tracking_uri "${TRACKING_URI:-none}"

# 2. Predict with the soft vote of both models' last-epoch weights, each photo averaged with its mirror.
python inference.py --data_dir "$EVAL_DIR" --model_dir "$OUT/model/flip" "$OUT/model/fastaug" --state last \
    --tta hflip --output_dir "$OUT"
echo "recipe finished in $(( $(date +%s) - start )) s: $OUT/output.csv"
