"""Tune the decision rule for macro F1: per-class log-prior offsets.

Arg-max of the probabilities maximises accuracy, not macro F1: with 49:1 imbalance the
rare classes (incorrect mask, >= 60) are predicted too rarely. Adding a per-class offset
b_c to log p_c before the arg-max trades a little accuracy for recall on rare classes.
The offsets are fitted by coordinate ascent on out-of-fold validation probabilities
(`val_probs.npy` / `val_labels.npy`, written by train.py for its best-F1 epoch), stored
in the checkpoints as `class_offsets`, and applied by inference.py.

    python calibrate.py --runs model/fold0 model/fold1 model/fold2 --write
    python calibrate.py --runs model/cv --write --tracking_uri http://server:5000 --run_id checkpoint

With several runs (K folds) it also reports a cross-validated estimate: offsets fitted on
the other folds, scored on the held-out one, so the gain it prints is not self-graded. It does so
only when the runs' validation people (val_samples.csv) are disjoint.

Models with a `years` age head (--age_head years) predict a survival curve P(age >= t); the cut
points that turn it into the three age groups are fitted here too (`age_cuts` in the checkpoint),
before the offsets: the "train with 58" trick as a fitted threshold, not another model.

With `--tracking_uri` (off by default) the result goes to MLflow: metrics calibrate_f1_argmax /
calibrate_f1_rule (and calibrate_cv_* when cross-validated), calibrate_offset_class_00..,
calibrate_age_cut_low/high, and the artifact calibration.json; `--run_id checkpoint` logs into the
training run of the runs (the parent run of a --fold all folder).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maskcls import cli
from maskcls.checkpoint import (CheckpointError, expand_runs, load_array, load_checkpoint, resolve_state_path,
                                run_folder, set_decision, training_run)
from maskcls.fileio import atomic_write_text
from maskcls.metrics import fast_macro_f1, macro_f1
from maskcls.task import AGE_THRESHOLDS, Task, decide, log_probs, task_of
from maskcls.tracking import add_tracking_flags, class_metrics, step_tracker

GRID = np.linspace(-3.0, 3.0, 61)


def fit_offsets(probs: np.ndarray, labels: np.ndarray, rounds: int = 3, grid: np.ndarray = GRID) -> np.ndarray:
    """Coordinate ascent: for each class in turn, the offset on `grid` that maximises macro F1
    with the others held fixed; a few rounds. Ties keep the offset nearest 0 (least change)."""
    log_p = log_probs(probs)
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
    log_p = log_probs(probs)
    log_freq = np.log((np.bincount(labels, minlength=n) + 1.0) / (len(labels) + n))  # add-one: no log(0)
    scores = [fast_macro_f1(labels, (log_p - alpha * log_freq).argmax(1), n) for alpha in grid]
    return -grid[int(np.argmax(scores))] * log_freq


FITTERS = {"coordinate": fit_offsets, "prior": fit_prior_offsets}


# Candidate cut points of a `years` age head: around the competition's 30 and 60.
AGE_CUT_GRID = (tuple(range(26, 35)), tuple(range(52, 65)))


@dataclass
class OutOfFold:
    """One run's validation predictions: probabilities at its trained cut points, labels, and for a
    years age head the logits from which probabilities at other cut points are recomputed."""

    run: Path
    probs: np.ndarray
    labels: np.ndarray
    people: set[str]
    task: Task | None = None
    logits: np.ndarray | None = None
    age_bins: tuple[int, int] = (30, 60)

    def probs_at(self, cuts) -> np.ndarray:
        if cuts is None or self.logits is None:
            return self.probs

        return self.task.probs(torch.from_numpy(self.logits), cuts).numpy()


def load_oof(run_dir: Path, state: str = "best_f1") -> OutOfFold:
    probs_path, labels_path = run_dir / "val_probs.npy", run_dir / "val_labels.npy"
    if not probs_path.is_file() or not labels_path.is_file():
        raise CheckpointError(f"no validation probabilities (val_probs.npy, val_labels.npy) in {run_dir}; "
                              "train with a validation split first")
    people: set[str] = set()
    samples = run_dir / "val_samples.csv"
    if samples.is_file():
        with samples.open(newline="") as f:
            people = {row["person"] for row in csv.DictReader(f)}
    oof = OutOfFold(run_dir, load_array(probs_path, ndim=2), load_array(labels_path, ndim=1), people)
    if len(oof.probs) != len(oof.labels):
        raise CheckpointError(f"val_probs.npy ({len(oof.probs)} rows) and val_labels.npy ({len(oof.labels)}) "
                              f"disagree: {run_dir}")
    logits = run_dir / "val_logits.npy"
    try:
        ckpt = load_checkpoint(resolve_state_path(run_dir, state))
    except CheckpointError:
        ckpt = None  # offsets need only the probabilities
    if ckpt is not None and task_of(ckpt).age_head == "years" and logits.is_file():
        oof.task, oof.logits, oof.age_bins = task_of(ckpt), load_array(logits, ndim=2), tuple(ckpt["age_bins"])
    return oof


@dataclass
class Rule:
    """A decision rule: age cut points for years heads (None: as trained) and per-class log offsets."""

    cuts: tuple[int, int] | None
    offsets: np.ndarray


def fit_age_cuts(oofs: list[OutOfFold]) -> tuple[int, int] | None:
    """Cut points at which a years head's arg-max scores the best macro F1 (None without such a head)."""
    if not oofs or any(o.logits is None for o in oofs):
        return None
    labels = np.concatenate([o.labels for o in oofs])
    a0, b0 = oofs[0].age_bins
    candidates = sorted((c for c in itertools.product(*AGE_CUT_GRID) if set(c) <= set(AGE_THRESHOLDS)),
                        key=lambda c: abs(c[0] - a0) + abs(c[1] - b0))  # ties keep the cuts nearest the labels'
    best, best_cuts = -1.0, None
    for cuts in candidates:
        score = fast_macro_f1(labels, np.concatenate([o.probs_at(cuts) for o in oofs]).argmax(1), oofs[0].probs.shape[1])
        if score > best + 1e-9:
            best, best_cuts = score, cuts
    return best_cuts


def fit_rule(oofs: list[OutOfFold], method: str, fit_cuts: bool = True) -> Rule:
    cuts = fit_age_cuts(oofs) if fit_cuts else None
    probs = np.concatenate([o.probs_at(cuts) for o in oofs])
    labels = np.concatenate([o.labels for o in oofs])
    return Rule(cuts, FITTERS[method](probs, labels))


def score_rule(oofs: list[OutOfFold], rule: Rule | None) -> float:
    labels = np.concatenate([o.labels for o in oofs])
    if rule is None:
        return macro_f1(labels, np.concatenate([o.probs for o in oofs]).argmax(1))
    return macro_f1(labels, decide(np.concatenate([o.probs_at(rule.cuts) for o in oofs]), rule.offsets))


def overlapping_people(oofs: list[OutOfFold]) -> set[str]:
    """People who are in the validation split of more than one run."""
    seen: set[str] = set()
    shared: set[str] = set()
    for o in oofs:
        shared |= seen & o.people
        seen |= o.people
    return shared


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run folders (e.g. the K folds of one recipe, or their --fold all folder)")
    p.add_argument("--state", default="best_f1", help="checkpoint to write the rule into (default best_f1)")
    p.add_argument("--write", action="store_true", help="store the rule in each run's checkpoint")
    p.add_argument("--method", choices=sorted(FITTERS), default="prior",
                   help="coordinate: one offset per class (coordinate ascent); prior: -alpha * log(class frequency)")
    p.add_argument("--age_cuts", choices=["fit", "keep"], default="fit",
                   help="models with a years age head: fit the cut points for macro F1 (fit) or keep the trained ones")
    p.add_argument("--report", default=None, metavar="FILE",
                   help="write what was fitted and scored (per run too) as JSON")
    add_tracking_flags(p, checkpoint_run=True)
    args = p.parse_args(argv)
    runs = [run_folder(run) for group in expand_runs(args.runs) for run in group]  # not "no validation outputs"
    if args.write:
        for run in runs:
            resolve_state_path(run, args.state)  # a bad --state or a missing checkpoint fails before any work
    oofs = [load_oof(r, args.state) for r in runs]
    if len({o.probs.shape[1] for o in oofs}) != 1:
        raise CheckpointError("runs have different numbers of classes: " + ", ".join(str(r) for r in runs))

    def checkpoint_run(client) -> str:  # --run_id checkpoint
        return training_run(runs, client)

    tracker = step_tracker(args, "calibrate", {"runs": [str(r) for r in runs], "state": args.state, "method": args.method,
                                               "age_cuts": args.age_cuts, "write": args.write}, checkpoint_run)
    with tracker:
        record = calibrate(args, runs, oofs)
        if args.report:
            atomic_write_text(args.report, json.dumps(record, indent=2))
        tracker.log_metrics({k: v for k, v in record.items() if k.startswith("calibrate_")}, step=0)
        tracker.log_dict(record, "calibration.json")
    return 0


def calibrate(args: argparse.Namespace, runs: list[Path], oofs: list[OutOfFold]) -> dict:
    """Fit, report and (--write) store the rule; returns what tracking logs."""
    rule = fit_rule(oofs, args.method, args.age_cuts == "fit")
    n = sum(len(o.labels) for o in oofs)
    plain, fitted = float(score_rule(oofs, None)), float(score_rule(oofs, rule))
    record = {"method": args.method, "runs": [str(r) for r in runs], "predictions": n,
              "offsets": rule.offsets.tolist(), "age_cuts": list(rule.cuts) if rule.cuts is not None else None,
              "calibrate_f1_argmax": plain, "calibrate_f1_rule": fitted, **class_metrics("calibrate_offset", rule.offsets)}
    if rule.cuts is not None:
        record.update(calibrate_age_cut_low=rule.cuts[0], calibrate_age_cut_high=rule.cuts[1])
    shared = overlapping_people(oofs)
    # runs that validated on the same people are not folds: their predictions are not out-of-fold ones
    kind = "validation predictions (people repeated across runs)" if len(runs) > 1 and shared else "out-of-fold predictions"
    print(f"{n} {kind} from {len(runs)} run(s)")
    print(f"macro F1 arg-max {plain:.4f} -> with the fitted rule {fitted:.4f} "
          "(fitted and scored on the same predictions)")
    if len(runs) > 1 and shared:
        print(f"no cross-validated estimate: the runs validated on {len(shared)} of the same people "
              f"(e.g. {cli.examples(sorted(shared))}); train folds of one --kfold split to get one")
    elif len(runs) > 1 and not all(o.people for o in oofs):
        print("no cross-validated estimate: some runs do not record their validation people (val_samples.csv)")
    elif len(runs) > 1:
        held, folds = [], []
        for i, fold in enumerate(oofs):
            fold_rule = fit_rule([o for j, o in enumerate(oofs) if j != i], args.method, args.age_cuts == "fit")
            held.append((score_rule([fold], None), score_rule([fold], fold_rule)))
            folds.append({"run": str(runs[i]), "f1_argmax": float(held[-1][0]), "f1_rule": float(held[-1][1]),
                          "age_cuts": list(fold_rule.cuts) if fold_rule.cuts is not None else None})
        (cv_plain, cv_tuned), (sd_plain, sd_tuned) = np.mean(held, axis=0), np.std(held, axis=0, ddof=1)
        record.update(calibrate_cv_f1_argmax=float(cv_plain), calibrate_cv_f1_rule=float(cv_tuned), cv_folds=folds)
        print(f"cross-validated (fit on the other runs, score on each): arg-max {cv_plain:.4f} +- {sd_plain:.4f} "
              f"-> rule {cv_tuned:.4f} +- {sd_tuned:.4f} (sd over runs)")
        if rule.cuts is not None:
            print("  age cut points fitted without each run: " + ", ".join(f"{f['age_cuts'][0]} {f['age_cuts'][1]}"
                                                                          for f in folds))
    if rule.cuts is not None:
        print(f"age cut points: {rule.cuts[0]} {rule.cuts[1]} (labels keep their own age bins)")
    print("offsets: " + " ".join(f"{c}:{v:+.1f}" for c, v in enumerate(rule.offsets)))
    if args.write:
        for run in runs:
            path = resolve_state_path(run, args.state)
            set_decision(path, rule.offsets.tolist(), rule.cuts if task_of(load_checkpoint(path)).age_head == "years"
                         else None)
            print(f"wrote the decision rule into {path}")
    return record


if __name__ == "__main__":
    cli.run(main)
