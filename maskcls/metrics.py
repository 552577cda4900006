"""Classification metrics shared by train.py, inference.py and evaluation.py.

Labels are integer class ids of a task (SPEC §1):
- "all" / "multi": 18 classes, class = mask * 6 + gender * 3 + age
  ("multi" also accepts [N, 3] arrays of (mask, gender, age), encoded to 18 classes);
- "mask": 3 classes (0 worn, 1 incorrect, 2 not worn);
- "genderage": 6 classes, gender * 3 + age.

Macro F1 is exactly the competition's scorer, sklearn `f1_score(y_true, y_pred, average="macro")`
called without `labels`: it averages over the classes present in y_true or y_pred, so a class that
is present but never predicted (or predicted but never present) counts as F1 0, and a class absent
from both is left out of the mean rather than counted as 0 or 1.

Only numpy, sklearn and the stdlib-only fileio are imported at module level; matplotlib is imported
inside the one function that draws, so importing this module stays cheap and has no global side effects.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import f1_score

from maskcls.fileio import atomic_write

# The label scheme lives in task.py (numpy only, so metrics stays free of torch).
from maskcls.task import DEFAULT_AGE_BINS, PART_SIZES, TASK_CLASSES, class_names, get_task, join_labels, split_labels
from maskcls.task import num_classes as _num_classes
from maskcls.task import plain_names as _plain_names
# Imported where used, being heavy or optional: matplotlib (only to draw the confusion matrix).


def _to_numpy(y: Any) -> np.ndarray:
    if hasattr(y, "detach"):  # a torch tensor, possibly on the GPU
        y = y.detach().cpu().numpy()
    return np.asarray(y)


def _as_labels(y: Any, task: str, what: str) -> np.ndarray:
    """Validate labels of `task` and return them as a 1-D int64 array."""
    n = _num_classes(task)
    a = _to_numpy(y)
    if get_task(task).multihead and a.ndim == 2 and a.shape[1] == 3:  # (mask, gender, age) targets
        a = join_labels("all", *a.T)
    if a.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of class ids, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not (np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a))):
            raise ValueError(f"{what} must hold integer class ids, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= n):
        raise ValueError(f"{what} has labels outside 0..{n - 1} for task {task!r} "
                         f"(min {a.min()}, max {a.max()})")
    return a


def _pair(y_true: Any, y_pred: Any, task: str) -> tuple[np.ndarray, np.ndarray]:
    t, p = _as_labels(y_true, task, "y_true"), _as_labels(y_pred, task, "y_pred")
    if len(t) != len(p):
        raise ValueError(f"y_true and y_pred differ in length ({len(t)} vs {len(p)})")
    if len(t) == 0:
        raise ValueError("no samples to evaluate")
    return t, p


# --------------------------------------------------------------------------- scores
def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The competition's scorer: sklearn macro F1 over the labels present in y_true or y_pred."""
    # zero_division=0 only silences warnings: every label of the union has tp + fp + fn > 0.
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def evaluate_predictions(y_true: Any, y_pred: Any, task: str) -> dict[str, float]:
    """accuracy and macro F1 of `task`, plus macro F1 of each sub-task the labels determine:
    "all"/"multi": f1_mask, f1_gender, f1_age, f1_genderage; "genderage": f1_gender, f1_age."""
    t, p = _pair(y_true, y_pred, task)
    out = {"accuracy": float(np.mean(t == p)), "f1": macro_f1(t, p)}
    true_parts, pred_parts = split_labels(task, t), split_labels(task, p)
    if sum(part is not None for part in true_parts) < 2:
        return out  # one part: f1 is already its score
    for name, tp, pp in zip(PART_SIZES, true_parts, pred_parts):
        if tp is not None:
            out[f"f1_{name}"] = macro_f1(tp, pp)
    if true_parts[0] is not None:  # the 18 classes: also the gender-age pair a 6-class model predicts
        out["f1_genderage"] = macro_f1(join_labels("genderage", *true_parts), join_labels("genderage", *pred_parts))
    return out


def confusion_counts(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] counts, rows = true class, columns = predicted class."""
    t, p = _to_numpy(y_true).astype(np.int64), _to_numpy(y_pred).astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in shape ({t.shape} vs {p.shape})")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_rows(y_true: Any, y_pred: Any, task: str,
                   age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> list[dict[str, Any]]:
    """One dict per class of `task`: class, name, correct, total, accuracy (None when total is 0),
    predicted, precision, recall, f1 (0 where undefined)."""
    t, p = _pair(y_true, y_pred, task)
    n = TASK_CLASSES[task]
    cm = confusion_counts(t, p, n)
    rows = []
    for c, name in enumerate(_plain_names(task, age_bins)):
        correct, total, predicted = int(cm[c, c]), int(cm[c].sum()), int(cm[:, c].sum())
        precision = correct / predicted if predicted else 0.0
        recall = correct / total if total else 0.0
        f1 = 2 * correct / (total + predicted) if total + predicted else 0.0
        rows.append({"class": c, "name": name, "correct": correct, "total": total,
                     "accuracy": correct / total if total else None, "predicted": predicted,
                     "precision": precision, "recall": recall, "f1": f1})
    return rows


def per_class_table(y_true: Any, y_pred: Any, task: str, age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> str:
    """Printable per-class report (accuracy = correct / total, '-' for a class with no samples),
    ending with a line holding overall accuracy and macro F1."""
    rows = per_class_rows(y_true, y_pred, task, age_bins)
    scores = evaluate_predictions(y_true, y_pred, task)
    width = max(len("name"), *(len(r["name"]) for r in rows))
    head = (f"{'class':>5}  {'name':<{width}}  {'correct':>7}  {'total':>6}  {'acc':>7}  "
            f"{'pred':>6}  {'prec':>6}  {'recall':>6}  {'f1':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        lines.append(f"{r['class']:>5}  {r['name']:<{width}}  {r['correct']:>7}  {r['total']:>6}  {acc:>7}  "
                     f"{r['predicted']:>6}  {r['precision']:>6.4f}  {r['recall']:>6.4f}  {r['f1']:>6.4f}")
    lines.append("-" * len(head))
    total = sum(r["total"] for r in rows)
    correct = sum(r["correct"] for r in rows)
    lines.append(f"accuracy {100 * scores['accuracy']:.2f}% ({correct}/{total})  macro F1 {scores['f1']:.4f}")
    return "\n".join(lines)


def confusion_matrix_text(y_true: Any, y_pred: Any, num_classes: int) -> str:
    """Confusion matrix as text: rows = true class, columns = predicted class."""
    cm = confusion_counts(y_true, y_pred, num_classes)
    w = max(len(str(int(cm.max()))) if cm.size else 1, len(str(num_classes - 1)), 2)
    lines = ["true\\pred " + " ".join(f"{c:>{w}}" for c in range(num_classes))]
    for c in range(num_classes):
        lines.append(f"{c:>9} " + " ".join(f"{v:>{w}}" for v in cm[c]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- files
def write_per_class_csv(path: str | os.PathLike, y_true: Any, y_pred: Any, task: str,
                        age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> None:
    """per_class_rows as CSV (empty accuracy for a class with no samples), written atomically."""
    rows = per_class_rows(y_true, y_pred, task, age_bins)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in r.items()})

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def save_confusion_matrix_png(path: str | os.PathLike, y_true: Any, y_pred: Any, task: str,
                              age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> None:
    """Confusion matrix heat map (colour = row-normalised recall, text = counts) as a PNG, written atomically."""
    # Figure + the Agg canvas directly: no pyplot, so no global backend or figure registry is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t, p = _pair(y_true, y_pred, task)
    n = TASK_CLASSES[task]
    cm = confusion_counts(t, p, n)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    scores = evaluate_predictions(t, p, task)
    names = class_names(task, age_bins)

    size = 3.0 + 0.5 * n
    fig = Figure(figsize=(size + 1.5, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), labels=names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels=names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{task}: accuracy {scores['accuracy']:.4f}, macro F1 {scores['f1']:.4f} (n={len(t)})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def fast_macro_f1(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """sklearn's macro F1 (classes present in labels or predictions), via one bincount:
    the search below scores thousands of candidate offsets."""
    counts = np.bincount(labels * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    tp = np.diag(counts).astype(np.float64)
    support, predicted = counts.sum(1), counts.sum(0)
    present = (support + predicted) > 0
    return float(np.mean(2 * tp[present] / (support + predicted)[present]))
