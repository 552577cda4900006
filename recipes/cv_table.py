"""Table of cross-validated variants: each variant's out-of-fold predictions (every person scored once,
by the fold that never saw them) pooled into one macro F1, the mean +- sd over folds, and each
variant's paired difference from a baseline with a 95% bootstrap interval over people.

    python recipes/cv_table.py --base OUT/base OUT/years OUT/bf16 ...

Each argument is a `train.py --kfold K --fold all` folder (or a folder of fold run folders) of the same
folds (same --kfold, --seed and data). Where the folder holds calibrated.json (`calibrate.py --runs
FOLDER --report FOLDER/calibrated.json`), "rule" is the cross-validated decision rule: fitted on the
other folds, scored on each. A difference counts as real when its interval excludes 0: people, not
images, are resampled, because a person's seven photos share their gender and age.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskcls.metrics import fast_macro_f1  # noqa: E402
from maskcls.checkpoint import expand_runs, load_checkpoint  # noqa: E402
from maskcls.task import NUM_CLASSES, decode18  # noqa: E402


def out_of_fold(folder: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(rows: path, person, label; per-fold best-F1-epoch val F1) of a cross-validated variant."""
    (runs,) = expand_runs([folder])
    frames, fold_f1 = [], []
    for run in runs:
        rows = pd.read_csv(run / "val_samples.csv")
        rows["label"] = np.load(run / "val_labels.npy")
        rows["pred"] = np.load(run / "val_probs.npy").argmax(1)
        frames.append(rows)
        fold_f1.append(load_checkpoint(run / "best_f1.pth")["metrics"]["val_f1"])
    return pd.concat(frames, ignore_index=True).sort_values("path", ignore_index=True), np.array(fold_f1)


def scores(label: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    (lm, lg, la), (pm, pg, pa) = decode18(label), decode18(pred)
    return {"f1": fast_macro_f1(label, pred, NUM_CLASSES), "mask": fast_macro_f1(lm, pm, 3),
            "gender": fast_macro_f1(lg, pg, 2), "age": fast_macro_f1(la, pa, 3)}


def bootstrap_diff(rows: pd.DataFrame, other: pd.DataFrame, reps: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of pooled macro F1 (other - rows), resampling people with replacement."""
    people = rows["person"].unique()
    index = {p: np.flatnonzero(rows["person"].to_numpy() == p) for p in people}
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(reps):
        pick = np.concatenate([index[p] for p in rng.choice(people, len(people))])
        diffs.append(fast_macro_f1(other["label"].to_numpy()[pick], other["pred"].to_numpy()[pick], NUM_CLASSES)
                     - fast_macro_f1(rows["label"].to_numpy()[pick], rows["pred"].to_numpy()[pick], NUM_CLASSES))
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the baseline variant's folder")
    p.add_argument("variants", nargs="*")
    args = p.parse_args()
    base, _ = out_of_fold(Path(args.base))
    table = [("variant", "pooled F1", "mask", "gender", "age", "folds: mean +- sd", "rule (cv)", "vs base, 95% interval")]
    for folder in [args.base, *args.variants]:
        rows, fold_f1 = out_of_fold(Path(folder))
        if not rows["path"].equals(base["path"]):
            raise SystemExit(f"{folder}: not the same validation images as {args.base}")
        s = scores(rows["label"].to_numpy(), rows["pred"].to_numpy())
        calibrated = Path(folder) / "calibrated.json"
        rule = "-"
        if calibrated.is_file():
            cv = json.loads(calibrated.read_text())
            rule = f"{cv['calibrate_cv_f1_rule']:.4f}" if "calibrate_cv_f1_rule" in cv else "-"
        diff = "-"
        if folder != args.base:
            lo, hi = bootstrap_diff(base, rows)
            d = s["f1"] - scores(base["label"].to_numpy(), base["pred"].to_numpy())["f1"]
            diff = f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}] {'real' if lo > 0 or hi < 0 else 'within noise'}"
        table.append((Path(folder).name, f"{s['f1']:.4f}", f"{s['mask']:.4f}", f"{s['gender']:.4f}", f"{s['age']:.4f}",
                      f"{fold_f1.mean():.4f} +- {fold_f1.std(ddof=1):.4f}", rule, diff))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
