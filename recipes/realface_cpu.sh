#!/usr/bin/env bash
# A CPU recipe for real face photos: a model trained on every training person, then predict.
#   recipes/realface_cpu.sh TRAIN_DIR EVAL_DIR OUT_DIR
# TRAIN_DIR: competition training layout (train/ or train/images); EVAL_DIR: info.csv + images/.
# Writes OUT_DIR/output.csv (and output_probs.csv). Training flags: recipes/realface_cpu.yaml.
# Measured on 2 CPU cores: see README "Recipes" (wall time, and its 5-fold estimate on new people).
# SEED=N (default 0) changes the initialisation of the new heads and the data order;
# MODELS=fastaug (default) trains one model with flip + shift/scale + colour jitter, dropout and stochastic
# depth; several names predict with their soft vote, e.g. MODELS="flip fastaug"; a name given twice trains
# that model again with the next seed (MODELS="fastaug96 fastaug96": two 96x96 models, seeds SEED and SEED+1)
# (README: each one's 5-fold estimate and wall time; `erase` adds random erasing, measured no better).
# TRACKING_URI=... logs the runs to MLflow (default: none, so the recipe writes nothing else).
set -euo pipefail
TRAIN_DIR=${1:?usage: $0 TRAIN_DIR EVAL_DIR OUT_DIR}
EVAL_DIR=${2:?usage: $0 TRAIN_DIR EVAL_DIR OUT_DIR}
OUT=${3:?usage: $0 TRAIN_DIR EVAL_DIR OUT_DIR}
SEED=${SEED:-0}
MODELS=${MODELS:-fastaug}
KNOWN_MODELS="flip fastaug fastaug96 erase"  # the names flags_of defines, for the error messages
flags_of() {  # the one place a model name is defined: its train.py flags on top of the yaml
  case $1 in
    flip) echo --augmentation FlipAugmentation ;;
    fastaug) echo --augmentation FastAugmentation --dropout 0.2 --drop_path 0.2 ;;
    fastaug96) echo --augmentation FastAugmentation --dropout 0.2 --drop_path 0.2 --resize 96 96 ;;
    erase) echo --augmentation ErasingAugmentation --dropout 0.2 --drop_path 0.2 ;;
    *) echo "error: MODELS: unknown model '$1' (known: $KNOWN_MODELS)" >&2; return 2 ;;
  esac
}
for name in $MODELS; do flags_of "$name" > /dev/null || exit 2; done  # every name, before anything trains
[ -n "${MODELS// /}" ] || { echo "error: MODELS is empty (known: $KNOWN_MODELS)" >&2; exit 2; }
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
start=$(date +%s)

# 1. EfficientNet-Lite0 models (offline ImageNet weights), three heads (mask, gender, age group), 128x128,
#    label smoothing, AdamW + one-cycle, 6 epochs on every person. They differ in regularisation: `flip`
#    (flips only) and `fastaug` (flip + shift/scale + colour jitter, dropout 0.2 before the heads,
#    stochastic depth 0.2); a later one reads the image cache the first one filled.
runs=()
declare -A repeats=()
for name in $MODELS; do
  seed=$(( SEED + ${repeats[$name]:-0} ))  # a repeated name: the same model with the next seed
  repeats[$name]=$(( ${repeats[$name]:-0} + 1 ))
  run=$name; (( seed == SEED )) || run=$name-seed$seed
  rm -rf "$OUT/model/$run"  # a re-run replaces its own run (train.py never overwrites one)
  read -ra flags <<< "$(flags_of "$name")"
  python train.py --config recipes/realface_cpu.yaml "${flags[@]}" --data_dir "$TRAIN_DIR" \
      --model_dir "$OUT/model" --name "$run" --seed "$seed" --cache_dir "$OUT/cache" \
      --tracking_uri "${TRACKING_URI:-none}"
  runs+=("$OUT/model/$run")
done

# 2. Predict with the last epoch's weights (several models: their soft vote), each photo averaged with
#    its mirror image.
python inference.py --data_dir "$EVAL_DIR" --model_dir "${runs[@]}" --state last --tta hflip \
    --output_dir "$OUT"
echo "recipe finished in $(( $(date +%s) - start )) s: $OUT/output.csv"
