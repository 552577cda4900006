"""Tune the decision rule for macro F1: per-class log-prior offsets.

Arg-max of the probabilities maximises accuracy, not macro F1: with 49:1 imbalance the
rare classes (incorrect mask, >= 60) are predicted too rarely. Adding a per-class offset
b_c to log p_c before the arg-max trades a little accuracy for recall on rare classes.
The offsets are fitted by coordinate ascent on out-of-fold validation probabilities
(`val_probs.npy` / `val_labels.npy`, written by train.py for its best-F1 epoch), stored
in the checkpoints as `class_offsets`, and applied by inference.py.

    python calibrate.py --runs model/fold0 model/fold1 model/fold2 --write

With several runs (K folds) it also reports a cross-validated estimate: offsets fitted on
the other folds, scored on the held-out one, so the gain it prints is not self-graded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from checkpoint import CheckpointError, atomic_save, load_checkpoint, resolve_state_path
from metrics import macro_f1

GRID = np.linspace(-3.0, 3.0, 61)


def fast_macro_f1(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """sklearn's macro F1 (classes present in labels or predictions), via one bincount:
    the search below scores thousands of candidate offsets."""
    counts = np.bincount(labels * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    tp = np.diag(counts).astype(np.float64)
    support, predicted = counts.sum(1), counts.sum(0)
    present = (support + predicted) > 0
    return float(np.mean(2 * tp[present] / (support + predicted)[present]))


def apply_offsets(probs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return (np.log(np.clip(probs, 1e-12, None)) + offsets).argmax(1)


def fit_offsets(probs: np.ndarray, labels: np.ndarray, rounds: int = 3, grid: np.ndarray = GRID) -> np.ndarray:
    """Coordinate ascent: for each class in turn, the offset on `grid` that maximises macro F1
    with the others held fixed; a few rounds. Ties keep the offset nearest 0 (least change)."""
    log_p = np.log(np.clip(probs, 1e-12, None))
    n = probs.shape[1]
    offsets = np.zeros(n)
    best = fast_macro_f1(labels, log_p.argmax(1), n)
    order = np.argsort(np.abs(grid), kind="stable")  # try small offsets first so ties prefer them
    for _ in range(rounds):
        changed = False
        for c in range(probs.shape[1]):
            current = offsets[c]
            for value in grid[order]:
                offsets[c] = value
                score = fast_macro_f1(labels, (log_p + offsets).argmax(1), n)
                if score > best + 1e-9:
                    best, current, changed = score, value, True
            offsets[c] = current
        if not changed:
            break
    return offsets


def fit_prior_offsets(probs: np.ndarray, labels: np.ndarray, grid: np.ndarray = np.linspace(0.0, 1.5, 31)
                      ) -> np.ndarray:
    """One-parameter rule: offsets = -alpha * log(class frequency), alpha chosen for macro F1.
    With 18 classes and a few validation images of the rare ones, fitting one number
    overfits far less than fitting 18."""
    n = probs.shape[1]
    log_p = np.log(np.clip(probs, 1e-12, None))
    log_freq = np.log((np.bincount(labels, minlength=n) + 1.0) / (len(labels) + n))  # add-one: no log(0)
    scores = [fast_macro_f1(labels, (log_p - alpha * log_freq).argmax(1), n) for alpha in grid]
    return -grid[int(np.argmax(scores))] * log_freq


FITTERS = {"coordinate": fit_offsets, "prior": fit_prior_offsets}


def load_oof(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    probs_path, labels_path = run_dir / "val_probs.npy", run_dir / "val_labels.npy"
    if not probs_path.is_file() or not labels_path.is_file():
        raise CheckpointError(f"no validation probabilities (val_probs.npy, val_labels.npy) in {run_dir}; "
                              "train with a validation split first")
    return np.load(probs_path), np.load(labels_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run folders (e.g. the K folds of one recipe)")
    p.add_argument("--state", default="best_f1", help="checkpoint to write the offsets into (default best_f1)")
    p.add_argument("--write", action="store_true", help="store the offsets in each run's checkpoint")
    p.add_argument("--method", choices=sorted(FITTERS), default="prior",
                   help="coordinate: one offset per class (coordinate ascent); prior: -alpha * log(class frequency)")
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    oof = [load_oof(r) for r in runs]
    probs = np.concatenate([o[0] for o in oof])
    labels = np.concatenate([o[1] for o in oof])
    if len({o[0].shape[1] for o in oof}) != 1:
        raise CheckpointError("runs have different numbers of classes: " + ", ".join(str(r) for r in runs))
    before = macro_f1(labels, probs.argmax(1))
    fit = FITTERS[args.method]
    offsets = fit(probs, labels)
    after = macro_f1(labels, apply_offsets(probs, offsets))
    print(f"{len(labels)} out-of-fold predictions from {len(runs)} run(s)")
    print(f"macro F1 arg-max {before:.4f} -> with offsets {after:.4f} (fitted and scored on the same predictions)")
    if len(runs) > 1:
        held = []
        for i, (fold_probs, fold_labels) in enumerate(oof):
            rest_p = np.concatenate([o[0] for j, o in enumerate(oof) if j != i])
            rest_l = np.concatenate([o[1] for j, o in enumerate(oof) if j != i])
            fold_offsets = fit(rest_p, rest_l)
            held.append((macro_f1(fold_labels, fold_probs.argmax(1)),
                         macro_f1(fold_labels, apply_offsets(fold_probs, fold_offsets))))
        plain, tuned = np.mean(held, axis=0)
        print(f"cross-validated (fit on the other runs, score on each): arg-max {plain:.4f} -> offsets {tuned:.4f}")
    print("offsets: " + " ".join(f"{c}:{v:+.1f}" for c, v in enumerate(offsets)))
    if args.write:
        for run in runs:
            path = resolve_state_path(run, args.state)
            ckpt = load_checkpoint(path)
            if len(ckpt["classes"]) != len(offsets) and not ckpt["model"].get("multihead"):
                raise CheckpointError(f"{path} has {len(ckpt['classes'])} classes, offsets have {len(offsets)}")
            ckpt["class_offsets"] = offsets.tolist()
            atomic_save(ckpt, path)
            print(f"wrote class_offsets into {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
