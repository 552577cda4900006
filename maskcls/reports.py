"""What a validation leaves: the per-class table on the console, the scores the checkpoint saver decides on,
the best epoch's files (confusion matrix, per-class CSV, errors.png, the out-of-fold arrays and val_samples.csv
that calibrate.py and audit.py read) and the metrics logged to TensorBoard and MLflow."""
from __future__ import annotations

import csv
import io
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maskcls.checkpoint import VALIDATION_SAMPLES
from maskcls.distributed import log
from maskcls.fileio import atomic_write_text
from maskcls.gallery import save_error_gallery
from maskcls.metrics import evaluate_predictions, per_class_table, save_confusion_matrix_png, write_per_class_csv
from maskcls.saver import CheckpointSaver
from maskcls.task import Task


@dataclass
class Validation:
    """Validation outputs in dataset order: logits [N, outputs], probabilities [N, classes]."""

    logits: np.ndarray
    probs: np.ndarray
    loss: float
    pred: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.pred = self.probs.argmax(1)


def report_validation(val: Validation, truth: np.ndarray, task: Task, age_bins, epoch: int,
                      saver: CheckpointSaver) -> dict:
    """Per-class table and scores, given to the `saver` (its best scores); returns the val_* metrics."""
    scores = evaluate_predictions(truth, val.pred, task.report_task)
    metrics = {"val_loss": val.loss, "val_acc": scores["accuracy"], "val_f1": scores["f1"]}
    metrics.update({f"val_{k}": v for k, v in scores.items() if k.startswith("f1_")})
    saver.score(epoch, scores["accuracy"], scores["f1"])
    best = saver.best
    log(per_class_table(truth, val.pred, task.report_task, age_bins))
    extra = " ".join(f"{k} {v:.4f}" for k, v in scores.items() if k.startswith("f1_"))
    log(f"[val] epoch {epoch + 1}: acc {scores['accuracy']:.2%} loss {val.loss:.4f} "
        f"macro F1 {scores['f1']:.4f} {extra} || best acc {best['acc']:.2%} best F1 {best['f1']:.4f}")
    return metrics


def write_validation_outputs(run_dir: Path, val: Validation, truth: np.ndarray, val_set, task: Task, age_bins,
                             tracker, writer=None, epoch: int = 0, face_crops: bool = False) -> None:
    """For the best-F1 epoch: confusion matrix, per-class CSV, the error gallery (errors.png, also to
    TensorBoard via `writer`; with `face_crops` it shows the crops the model saw) and the out-of-fold
    material that calibrate.py (decision rule) and audit.py (label audit) read."""
    save_confusion_matrix_png(run_dir / "confusion_matrix.png", truth, val.pred, task.report_task, age_bins)
    write_per_class_csv(run_dir / "per_class.csv", truth, val.pred, task.report_task, age_bins)
    np.save(run_dir / "val_probs.npy", val.probs)
    np.save(run_dir / "val_labels.npy", truth)
    np.save(run_dir / "val_logits.npy", val.logits)
    rows = [val_set.samples[i] for i in val_set.indices]
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows([("path", "person", "kind", "age"),
                                                      *((r.path, r.person, r.kind, r.age) for r in rows)])
    atomic_write_text(run_dir / VALIDATION_SAMPLES, table.getvalue())
    pixels = save_error_gallery(run_dir / "errors.png", [r.path for r in rows], truth, val.pred, val.probs,
                                task.report_task, age_bins, title=f"{run_dir.name} epoch {epoch + 1}",
                                people=[r.person for r in rows], image_of=val_set.model_input if face_crops else None)
    if writer is not None:
        writer.add_image("errors", pixels, epoch, dataformats="HWC")
    for name in ("confusion_matrix.png", "per_class.csv", "errors.png"):
        tracker.log_artifact(run_dir / name)


def log_epoch(writer, tracker, metrics: dict, epoch: int) -> None:
    """Every metric of the epoch, by name, to TensorBoard and MLflow."""
    for key, value in metrics.items():
        writer.add_scalar(key, value, epoch)
    writer.flush()
    tracker.log_metrics(metrics, step=epoch)


def interrupted_message(run_dir: Path, epoch: int, saved_epoch: int) -> str:
    # last.pth is rewritten after every epoch; a half-done epoch is not saved over it, because
    # resuming from mid-epoch weights would skip the rest of that epoch's batches.
    last = run_dir / "last.pth"
    if saved_epoch >= 0 and last.exists():
        return (f"\ninterrupted in epoch {epoch + 1}: {last} holds epoch {saved_epoch + 1}; "
                f"continue with --resume {shlex.quote(str(last))}")
    best = run_dir / "best_f1.pth"
    kept = f" ({best} holds the best epoch so far, for inference)" if best.exists() else ""
    return (f"\ninterrupted in epoch {epoch + 1}, before the first last.pth was saved (at the end of an "
            f"epoch): nothing to resume{kept}")
