#!/usr/bin/env bash
# A CPU recipe for whole photos of a person (the competition's 384x512 portraits): the face stage finds,
# aligns and crops each face (--face_crop chip), then dlib's face network is fine-tuned on the crops as in
# the `face` model of recipes/realface_cpu.sh, and predicts the evaluation set cropped the same way.
#   recipes/portrait_cpu.sh TRAIN_DIR EVAL_DIR OUT_DIR            -> OUT_DIR/output.csv (+ output_probs.csv
#                                                                    with a `face` column: detected / fallback)
#   recipes/realface_estimate.sh TRAIN_DIR OUT_DIR recipes/portrait_cpu.sh   # its 5-fold estimate
# Everything realface_cpu.sh takes works here too (SEED, MODELS, VOTE, TRACKING_URI); MODELS defaults to
# `portrait`. Measured (estimate, locked people, wall time): docs/face-stage.md.
set -euo pipefail
MODELS=${MODELS:-portrait} exec bash "$(dirname "$0")/realface_cpu.sh" "$@"
