#!/usr/bin/env bash
# A cross-validated estimate of a whole recipe (training, decision rule, prediction) on new people.
#   recipes/realface_estimate.sh TRAIN_DIR OUT_DIR [RECIPE]     (RECIPE default recipes/realface_cpu.sh)
# For each of K person folds (K=5 by default; the folds of `train.py --kfold K --seed SEED`): holdout.py
# holds that fold's people out in the evaluation layout, the recipe runs on the other people as if they
# were the whole training set, evaluation.py scores its output.csv. Prints macro F1 (and mask, gender,
# age F1, accuracy) as mean +- sd over folds; OUT_DIR/scores.jsonl has one line per fold.
# Each recipe run sees 80% of the people, so the estimate is, if anything, a little pessimistic.
set -euo pipefail
TRAIN_DIR=${1:?usage: $0 TRAIN_DIR OUT_DIR [RECIPE]}
OUT=${2:?usage: $0 TRAIN_DIR OUT_DIR [RECIPE]}
RECIPE=${3:-recipes/realface_cpu.sh}
K=${K:-5}
SEED=${SEED:-0}
TRAIN_DIR=$(realpath "$TRAIN_DIR")
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
cd "$(dirname "$0")/.."
: > "$OUT/scores.jsonl"
for i in $(seq 0 $((K - 1))); do
  python holdout.py --data_dir "$TRAIN_DIR" --out "$OUT/fold$i/data" --kfold "$K" --fold "$i" --seed "$SEED"
  start=$(date +%s)
  "$RECIPE" "$OUT/fold$i/data/train" "$OUT/fold$i/data/eval" "$OUT/fold$i" > "$OUT/fold$i/recipe.log" 2>&1
  seconds=$(( $(date +%s) - start ))
  python evaluation.py --gt "$OUT/fold$i/data/gt" --pred "$OUT/fold$i" --json \
    | python -c "import json, sys; r = json.load(sys.stdin); print(json.dumps({'fold': $i, 'seconds': $seconds, **{k: r[k] for k in ('f1', 'f1_mask', 'f1_gender', 'f1_age', 'accuracy')}}))" \
    | tee -a "$OUT/scores.jsonl"
done
python - "$OUT/scores.jsonl" <<'PY'
import json, sys
import numpy as np
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"{len(rows)} folds: " + ", ".join(
    f"{k} {np.mean([r[k] for r in rows]):.4f} +- {np.std([r[k] for r in rows], ddof=1):.4f}"
    for k in ("f1", "f1_mask", "f1_gender", "f1_age", "accuracy")))
PY
