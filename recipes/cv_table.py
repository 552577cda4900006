"""Table of cross-validated variants: mean +- sd over person folds, and each variant's paired
difference from a baseline (same folds), with a note on which differences are larger than noise.

    python recipes/cv_table.py --base OUT/runs/base OUT/runs/years OUT/runs/bf16 ...

Each argument is a `train.py --kfold K --fold all` folder (or a folder of fold run folders). Where
the folder holds calibrated.json (`calibrate.py --runs FOLDER --report FOLDER/calibrated.json`), the
"+ rule" column is the cross-validated decision rule: fitted on the other folds, scored on each.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoint import expand_runs, load_checkpoint  # noqa: E402

KEYS = ("val_f1", "val_f1_mask", "val_f1_gender", "val_f1_age", "val_acc")


def fold_scores(folder: Path) -> dict[str, np.ndarray]:
    """Best-F1-epoch validation scores of every fold, in fold order."""
    (runs,) = expand_runs([folder])
    metrics = [load_checkpoint(run / "best_f1.pth")["metrics"] for run in runs]
    scores = {k: np.array([m[k] for m in metrics]) for k in KEYS}
    calibrated = folder / "calibrated.json"
    if calibrated.is_file():
        scores["rule_f1"] = np.array([f["f1_rule"] for f in json.loads(calibrated.read_text())["cv_folds"]])
    return scores


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the baseline variant's folder")
    p.add_argument("variants", nargs="*")
    args = p.parse_args()
    base = fold_scores(Path(args.base))
    rows = [("variant", "macro F1", "+ rule", "mask", "gender", "age", "diff vs base (paired)")]
    for folder in [args.base, *args.variants]:
        s = fold_scores(Path(folder))
        k = len(s["val_f1"])

        def pm(key: str) -> str:
            return f"{s[key].mean():.4f} +- {s[key].std(ddof=1):.4f}" if key in s else "-"

        if folder == args.base:
            diff = "-"
        else:
            d = s["val_f1"] - base["val_f1"][:k]
            se = d.std(ddof=1) / np.sqrt(k)
            verdict = "real" if abs(d.mean()) > 2 * se else "within noise"
            diff = f"{d.mean():+.4f} (se {se:.4f}, {verdict})"
        rows.append((Path(folder).name, pm("val_f1"), pm("rule_f1"), pm("val_f1_mask"), pm("val_f1_gender"),
                     pm("val_f1_age"), diff))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
