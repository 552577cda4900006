"""Cross-validation summaries (cv.json): each fold's best-F1 scores, their mean and spread, and the macro F1
of every out-of-fold prediction pooled."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from maskcls.checkpoint import load_checkpoint
from maskcls.metrics import evaluate_predictions
from maskcls.task import Task


def summarise_folds(runs: Sequence[Path], task: Task) -> dict:
    """Mean and sample standard deviation over folds of each best-F1 epoch's scores, and the macro F1
    of all out-of-fold predictions pooled (every person scored once, by the fold that never saw them)."""
    per_fold, probs, labels = [], [], []
    for run in runs:
        ckpt = load_checkpoint(run / "best_f1.pth")
        last = load_checkpoint(run / "last.pth")
        per_fold.append({"run": str(run), "best_epoch": ckpt["epoch_number"], **{k: ckpt["metrics"][k] for k in
                         ckpt["metrics"] if k.startswith("val_")}, "last_val_f1": last["metrics"].get("val_f1")})
        probs.append(np.load(run / "val_probs.npy"))
        labels.append(np.load(run / "val_labels.npy"))
    pooled = evaluate_predictions(np.concatenate(labels), np.concatenate(probs).argmax(1), task.report_task)
    summary: dict = {"folds": per_fold}
    for key in [k for k in per_fold[0] if k.startswith("val_") or k == "last_val_f1"]:
        values = np.array([f[key] for f in per_fold], dtype=np.float64)
        summary[f"cv_{key}_mean"] = float(values.mean())
        summary[f"cv_{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    summary.update({f"cv_oof_{k}": float(v) for k, v in pooled.items() if k == "accuracy" or k.startswith("f1")})
    return summary


def cv_report(summary: dict, k: int) -> str:
    def pm(key: str) -> str:
        return f"{summary[f'cv_{key}_mean']:.4f} +- {summary[f'cv_{key}_std']:.4f}"

    folds = " ".join(f"{f['val_f1']:.4f}" for f in summary["folds"])
    return (f"cross-validation, {k} folds by person: macro F1 {pm('val_f1')} (folds: {folds}); "
            f"last epoch {pm('last_val_f1')}\n  mask {pm('val_f1_mask')}, gender {pm('val_f1_gender')}, "
            f"age {pm('val_f1_age')}; all out-of-fold predictions pooled: macro F1 {summary['cv_oof_f1']:.4f}")
