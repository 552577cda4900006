#!/usr/bin/env bash
# Measure the label audit on real photos (issue 16, item 3):
#   recipes/audit_realface.sh TRAIN_DIR OUT_DIR
# TRAIN_DIR: competition training layout (train/ or train/images). Nothing in it is written.
#  1. holdout.py keeps 20% of the people apart (clean labels: they score every training below);
#  2. `audit.py inject` makes a symlinked copy of the other 80% with known errors: 5% of the people
#     filed under the other gender, 5% moved across an age cut, 3% with normal/incorrect_mask swapped;
#  3. the same K-fold training (EfficientNet-Lite0, three heads with a years age head) on the clean
#     80% ("clean") and on the copy with errors ("noisy"); audit.py on the noisy folds' out-of-fold
#     predictions; recall per kind among the top 2 x (injected) suspects;
#  4. the suspects among those that match an injected error (what a reviewer of audit.png confirms),
#     with the audit's suggested values, as --label_overrides: a third training ("fixed");
#  5. each training's fold soft vote predicts the hold-out: macro F1 clean / noisy / fixed.
# Writes OUT_DIR/summary.txt (and holdout/, noisy/, model/, audit/, pred/). Three K-fold trainings:
# with the defaults about 3 x 5 x 10 minutes on 2 CPU cores, a few minutes on one GPU.
# Settings (environment): KFOLD=5 EPOCHS=6 MODEL=EfficientNetLite0 RESIZE="128 128" SEED=0,
# EXTRA="more train.py flags" (e.g. "--num_workers 8" on a GPU machine).
set -euo pipefail
TRAIN_DIR=${1:?usage: $0 TRAIN_DIR OUT_DIR}
OUT=${2:?usage: $0 TRAIN_DIR OUT_DIR}
KFOLD=${KFOLD:-5}
EPOCHS=${EPOCHS:-6}
MODEL=${MODEL:-EfficientNetLite0}
RESIZE=${RESIZE:-128 128}
SEED=${SEED:-0}
EXTRA=${EXTRA:-}
TRAIN_DIR=$(realpath "$TRAIN_DIR")
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
cd "$(dirname "$0")/.."
rm -rf "$OUT/model" "$OUT/pred" "$OUT/audit"  # a re-run replaces its own results (train.py never overwrites a run)
start=$(date +%s)

python holdout.py --data_dir "$TRAIN_DIR" --out "$OUT/holdout" --val_ratio 0.2 --seed "$SEED"
python audit.py inject --data_dir "$OUT/holdout/train" --out "$OUT/noisy" --seed "$SEED"

# shellcheck disable=SC2206  # RESIZE and EXTRA are word lists on purpose
COMMON=(--model_dir "$OUT/model" --kfold "$KFOLD" --fold all --task multi --age_head years --model "$MODEL"
        --pretrained True --resize $RESIZE --augmentation FlipAugmentation --criterion label_smoothing
        --optimizer AdamW --lr 2e-3 --scheduler onecycle --epochs "$EPOCHS" --batch_size 64 --seed "$SEED"
        --cache True --cache_dir "$OUT/cache" --tracking_uri none $EXTRA)

f1() {  # the macro F1 on the clean hold-out of a K-fold training's soft vote
  python inference.py --data_dir "$OUT/holdout/eval" --model_dir "$OUT/model/$1" --output_dir "$OUT/pred/$1" >/dev/null
  python evaluation.py --gt "$OUT/holdout/gt" --pred "$OUT/pred/$1" --images "$OUT/holdout/eval" --json \
    | python -c "import json, sys; print(f\"{json.load(sys.stdin)['f1']:.4f}\")"
}

python train.py --data_dir "$OUT/holdout/train" --name clean "${COMMON[@]}"
python train.py --data_dir "$OUT/noisy/train" --name noisy "${COMMON[@]}"
python audit.py --runs "$OUT/model/noisy" --out "$OUT/audit"
python audit.py recall --audit "$OUT/audit/audit.csv" --truth "$OUT/noisy/truth.csv" \
  --keep "$OUT/audit/reviewed.csv" | tee "$OUT/recall.txt"
python train.py --data_dir "$OUT/noisy/train" --name fixed --label_overrides "$OUT/audit/reviewed.csv" "${COMMON[@]}"

{
  echo "label audit on $TRAIN_DIR: $KFOLD folds, $MODEL $RESIZE, $EPOCHS epochs, seed $SEED"
  grep -v "^wrote" "$OUT/recall.txt"
  echo "macro F1 on the clean hold-out: clean $(f1 clean), with the errors $(f1 noisy), with the confirmed suggestions $(f1 fixed)"
  echo "review sheet: $OUT/audit/audit.png; error galleries: $OUT/pred/*/errors.png"
} | tee "$OUT/summary.txt"
echo "recipe finished in $(( $(date +%s) - start )) s: $OUT/summary.txt"
