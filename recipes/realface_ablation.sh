#!/usr/bin/env bash
# Technique-by-technique comparison on a fixed person-level hold-out, same budget each.
#   recipes/realface_ablation.sh TRAIN_DIR OUT_DIR [variant ...]
# Makes OUT_DIR/holdout (80/20 by person, seed 0) once, then for each variant trains on the
# 80%, predicts the 20% with inference.py and scores it with evaluation.py; one JSON line per
# variant goes to OUT_DIR/results.jsonl. With no variant names it runs them all.
set -euo pipefail
TRAIN_DIR=${1:?usage: $0 TRAIN_DIR OUT_DIR [variant ...]}
OUT=${2:?usage: $0 TRAIN_DIR OUT_DIR [variant ...]}
shift 2
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
[ -f "$OUT/holdout/gt/gt.csv" ] || python holdout.py --data_dir "$TRAIN_DIR" --out "$OUT/holdout" --val_ratio 0.2 --seed 0
HO="$OUT/holdout"
CACHE="$OUT/cache"
# The budget every variant shares: EfficientNet-Lite0 (offline ImageNet weights), 96x96, 6 epochs.
BASE=(--data_dir "$HO/train" --model EfficientNetLite0 --resize 96 96 --epochs 6 --batch_size 64
      --optimizer AdamW --lr 2e-3 --weight_decay 1e-4 --scheduler onecycle --augmentation FlipAugmentation
      --criterion label_smoothing --smoothing 0.1 --val_ratio 0.15 --seed 0 --cache True --cache_dir "$CACHE"
      --tracking_uri none --model_dir "$OUT/runs")

train() {  # train NAME [extra flags]: one run, folder $OUT/runs/NAME
  local name=$1; shift
  rm -rf "$OUT/runs/$name"
  python train.py "${BASE[@]}" --name "$name" "$@" > "$OUT/$name.log" 2>&1
}
score() {  # score NAME [inference flags]: predict the hold-out, evaluate, record
  local name=$1; shift
  python inference.py --data_dir "$HO/eval" --output_dir "$OUT/pred/$name" "$@" > "$OUT/$name.infer.log" 2>&1
  python evaluation.py --gt "$HO/gt/gt.csv" --pred "$OUT/pred/$name/output.csv" --json \
    | python -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'variant': '$name', **{k: round(r[k], 4) for k in ('f1','f1_mask','f1_gender','f1_age','accuracy')}}))" \
    | tee -a "$OUT/results.jsonl"
}
calibrated() {  # calibrated NAME RUN METHOD: fit offsets into RUN's best_f1.pth, score it as NAME
  python calibrate.py --runs "$OUT/runs/$2" --method "$3" --write > "$OUT/$1.log" 2>&1
  score "$1" --model_dir "$OUT/runs/$2"
}
run() {  # plain variant: train with extra flags, score best_f1.pth
  local name=$1; shift
  train "$name" "$@" && score "$name" --model_dir "$OUT/runs/$name" --offsets none
}

variant() {
  case $1 in
    base)          run base ;;
    random_init)   run random_init --pretrained False ;;
    size128)       run size128 --resize 128 128 ;;
    multihead)     run multihead --task multi ;;
    multihead128)  run multihead128 --task multi --resize 128 128 ;;
    multihead128_prior) calibrated multihead128_prior multihead128 prior ;;
    multihead128_bins58) run multihead128_bins58 --task multi --resize 128 128 --age_bins 30 58 --score_age_bins 30 60 ;;
    multihead128_bins58_prior) calibrated multihead128_bins58_prior multihead128_bins58 prior ;;
    multihead128_pair_prior) # soft vote of the two calibrated 128 models above (age cut 60 and 58): the recipe
                   score multihead128_pair_prior --model_dir "$OUT/runs/multihead128" "$OUT/runs/multihead128_bins58" ;;
    separate)      train sep_mask --dataset MaskSplitByProfileDatasetForAlbumOnlyMask
                   train sep_ga --dataset MaskSplitByProfileDatasetForAlbumOnlyGenderAge
                   score separate --isEnsemble True --mask_model_dir "$OUT/runs/sep_mask" --genderage_model_dir "$OUT/runs/sep_ga" ;;
    bins58)        run bins58 --age_bins 30 58 --score_age_bins 30 60 ;;
    class_weights) run class_weights --class_weights auto ;;
    sampler)       run sampler --sampler weighted ;;
    focal)         run focal --criterion focal ;;
    mixup)         run mixup --mixup 0.2 --cutmix 1.0 ;;
    fast_aug)      run fast_aug --augmentation FastAugmentation ;;
    tta)           score tta --model_dir "$OUT/runs/base" --tta hflip --offsets none ;;
    offsets)       calibrated offsets base coordinate ;;
    offsets_prior) calibrated offsets_prior base prior ;;
    multihead_offsets) calibrated multihead_offsets multihead coordinate ;;
    multihead_prior) calibrated multihead_prior multihead prior ;;
    seed1)         run seed1 --seed 1 ;;
    ensemble)      [ -f "$OUT/runs/seed1/best_f1.pth" ] || train seed1 --seed 1
                   score ensemble --model_dir "$OUT/runs/base" "$OUT/runs/seed1" --offsets none ;;
    ensemble_prior) for r in base seed1; do python calibrate.py --runs "$OUT/runs/$r" --method prior --write >> "$OUT/ensemble_prior.log" 2>&1; done
                   score ensemble_prior --model_dir "$OUT/runs/base" "$OUT/runs/seed1" ;;
    *) echo "unknown variant $1" >&2; return 2 ;;
  esac
}

VARIANTS=("$@")
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=(base seed1 random_init tta offsets offsets_prior bins58 class_weights sampler focal mixup
  ensemble ensemble_prior separate multihead multihead_offsets multihead_prior multihead128 multihead128_prior multihead128_bins58
  multihead128_bins58_prior multihead128_pair_prior)
for v in "${VARIANTS[@]}"; do
  start=$(date +%s)
  variant "$v"
  echo "# $v took $(( $(date +%s) - start )) s" >&2
done
