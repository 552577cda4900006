#!/usr/bin/env bash
# A CPU recipe for real face photos: train, tune the decision rule, predict.
#   recipes/realface_cpu.sh TRAIN_DIR EVAL_DIR OUT_DIR
# TRAIN_DIR: competition training layout (train/ or train/images); EVAL_DIR: info.csv + images/.
# Writes OUT_DIR/output.csv (and output_probs.csv); about 15-20 minutes on 2 idle CPU cores.
# Each choice is measured in README "Recipes" (recipes/realface_ablation.sh).
set -euo pipefail
TRAIN_DIR=${1:?usage: $0 TRAIN_DIR EVAL_DIR OUT_DIR}
EVAL_DIR=${2:?usage: $0 TRAIN_DIR EVAL_DIR OUT_DIR}
OUT=${3:?usage: $0 TRAIN_DIR EVAL_DIR OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
RUN="$OUT/model/recipe"
rm -rf "$RUN"  # a re-run replaces its own run folder (train.py never overwrites one)
start=$(date +%s)

# 1. EfficientNet-Lite0 with its offline ImageNet weights and three heads (mask, gender, age),
#    128x128 faces, flips, label smoothing, AdamW + one-cycle. 15% of the people are held out to
#    pick the best-F1 epoch and to fit the decision rule on people the model never saw.
python train.py --data_dir "$TRAIN_DIR" --model_dir "$OUT/model" --name recipe --task multi \
    --model EfficientNetLite0 --pretrained True --resize 128 128 --augmentation FlipAugmentation \
    --criterion label_smoothing --smoothing 0.1 --optimizer AdamW --lr 2e-3 --weight_decay 1e-4 \
    --scheduler onecycle --epochs 6 --batch_size 64 --val_ratio 0.15 --seed 0 \
    --cache True --cache_dir "$OUT/cache" --tracking_uri none

# 2. Decision rule for macro F1: offsets = -alpha * log(class frequency), alpha fitted on the
#    held-out people (rare classes such as ">= 60" are otherwise under-predicted); stored in best_f1.pth.
python calibrate.py --runs "$RUN" --method prior --write

# 3. Predict with the offsets the checkpoint carries (flip TTA did not help on the hold-out).
python inference.py --data_dir "$EVAL_DIR" --model_dir "$RUN" --state best_f1 --output_dir "$OUT"
echo "recipe finished in $(( $(date +%s) - start )) s: $OUT/output.csv"
