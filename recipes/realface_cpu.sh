#!/usr/bin/env bash
# A CPU recipe for real face photos: one model on every training person, then predict.
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
rm -rf "$OUT/model/realface"  # a re-run replaces its own run (train.py never overwrites one)
start=$(date +%s)

# 1. EfficientNet-Lite0 (offline ImageNet weights), three heads (mask, gender, age group), 128x128,
#    flip, label smoothing, AdamW + one-cycle, 6 epochs on every person.
python train.py --config recipes/realface_cpu.yaml --data_dir "$TRAIN_DIR" --model_dir "$OUT/model" \
    --name realface --seed "$SEED" --cache_dir "$OUT/cache" --tracking_uri "${TRACKING_URI:-none}"

# 2. Predict with the last epoch's weights, averaging each photo with its mirror image.
python inference.py --data_dir "$EVAL_DIR" --model_dir "$OUT/model/realface" --state last --tta hflip \
    --output_dir "$OUT"
echo "recipe finished in $(( $(date +%s) - start )) s: $OUT/output.csv"
