"""Score a submission against the ground truth (SPEC §1, §2).

    SM_GROUND_TRUTH_DIR=gt_dir SM_OUTPUT_DATA_DIR=out_dir python evaluation.py
    python evaluation.py --gt gt.csv --pred output.csv [--json]
    python evaluation.py --gt gt_dir --pred out_dir        # folders holding gt.csv / output.csv
    python evaluation.py --gt gt.csv --pred output/output.csv --images eval/   # + output/errors.png
    python evaluation.py ... --tracking_uri http://server:5000 [--run_id <training run>]   # log the scores

Both files are CSVs with the columns `ImageID,ans` (other columns are ignored). Rows are paired by
ImageID, never by position, so the prediction file may be in any order. Prints accuracy, macro F1
over the 18 classes (the competition's scorer, see metrics.py), F1 of the mask, gender, age and
gender-age sub-tasks, the per-class report and the confusion matrix. With `--json` stdout holds
exactly one JSON object instead. With `--tracking_uri` the scores are logged to MLflow (holdout_f1,
holdout_accuracy, holdout_f1_mask/gender/age/genderage, holdout_f1_class_00..17), in a new run or,
with `--run_id`, in an existing one (e.g. the training run of the model that made the predictions).

Exit codes: 0 scored; 2 bad input (missing file or path, unreadable CSV, missing column, empty or
duplicate ImageID, ImageIDs missing from or extra in the predictions, a label that is not an integer
in 0..17) -- each reported as one line `error: <what> (<file>)` on stderr, the same code argparse
uses for a bad command line.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from maskcls import cli, metrics
from maskcls.fileio import path_escape
from maskcls.task import DEFAULT_AGE_BINS, NUM_CLASSES, class_names
from maskcls.tracking import add_tracking_flags, class_metrics, step_tracker

ID_COL, LABEL_COL = "ImageID", "ans"
EXIT_BAD_INPUT = 2
_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_INT_FLOAT = re.compile(r"([+-]?[0-9]+)\.0*", re.ASCII)  # "3.0": an integer written by a float column


class EvaluationError(cli.ToolkitError, ValueError):
    """Bad evaluation input; str() is one line naming the file."""

    def __init__(self, what: str, path: str | os.PathLike | None = None):
        super().__init__(f"{what} ({path})" if path is not None else what)


def parse_label(text: str) -> int | None:
    """Integer label from a CSV cell ("7", " 7 ", "7.0"); None for anything else ("7.5", "abc", "")."""
    s = text.strip()
    m = _INT.fullmatch(s) or _INT_FLOAT.fullmatch(s)
    return int(m.group(1) if m.re is _INT_FLOAT else s) if m else None


def csv_path(path: str | os.PathLike, name: str) -> Path:
    """`path` itself, or `path/name` when `path` is a folder (as SM_GROUND_TRUTH_DIR is)."""
    p = Path(path)
    if p.is_dir():
        if not (p / name).is_file():
            raise EvaluationError(f"not a file and holds no {name}", path)
        return p / name
    return p


def read_labels(path: str | os.PathLike) -> dict[str, int]:
    """ImageID -> label from a CSV with ImageID and ans columns, validated (see the module doc)."""
    p = Path(path)
    if not p.exists():
        raise EvaluationError("file not found", path)
    if not p.is_file():
        raise EvaluationError("not a file", path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise EvaluationError("empty file, expected a header with ImageID,ans", path)
            header = [h.strip() for h in header]
            missing = [c for c in (ID_COL, LABEL_COL) if c not in header]
            if missing:
                raise EvaluationError(f"missing column {', '.join(missing)} (found: {', '.join(header) or 'none'})",
                                      path)
            i_id, i_label = header.index(ID_COL), header.index(LABEL_COL)
            labels: dict[str, int] = {}
            first_line: dict[str, int] = {}
            bad: list[tuple[int, str]] = []
            out_of_range: list[tuple[int, int]] = []
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue  # blank line, e.g. a trailing newline
                image_id = row[i_id].strip() if i_id < len(row) else ""
                if not image_id:
                    raise EvaluationError(f"empty ImageID on line {line}", path)
                if image_id in first_line:
                    raise EvaluationError(f"duplicate ImageID {image_id!r} on lines {first_line[image_id]} "
                                          f"and {line}", path)
                first_line[image_id] = line
                cell = row[i_label] if i_label < len(row) else ""
                label = parse_label(cell)
                if label is None:
                    bad.append((line, cell))
                elif not 0 <= label < NUM_CLASSES:
                    out_of_range.append((line, label))
                else:
                    labels[image_id] = label
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EvaluationError(f"cannot read CSV: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                              path) from e
    if bad:
        line, cell = bad[0]
        raise EvaluationError(f"{len(bad)} non-integer label(s) in column ans, first {cell!r} on line {line}", path)
    if out_of_range:
        line, label = out_of_range[0]
        raise EvaluationError(f"{len(out_of_range)} label(s) outside 0-{NUM_CLASSES - 1}, first {label} "
                              f"on line {line}", path)
    if not labels:
        raise EvaluationError("no rows", path)
    return labels


def load_labels(gt_path: str | os.PathLike, pred_path: str | os.PathLike
                ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ImageIDs in ground-truth order, true labels, predicted labels), paired by ImageID.
    Either path may be a folder holding gt.csv / output.csv."""
    gt_path, pred_path = csv_path(gt_path, "gt.csv"), csv_path(pred_path, "output.csv")
    gt, pred = read_labels(gt_path), read_labels(pred_path)
    missing = [i for i in gt if i not in pred]
    if missing:
        raise EvaluationError(f"{len(missing)} ImageID(s) of the ground truth missing from the predictions: "
                              f"{cli.examples([repr(i) for i in missing])}", pred_path)
    extra = [i for i in pred if i not in gt]
    if extra:
        raise EvaluationError(f"{len(extra)} ImageID(s) in the predictions not in the ground truth: "
                              f"{cli.examples([repr(i) for i in extra])}", pred_path)
    ids = list(gt)
    return ids, np.array([gt[i] for i in ids], dtype=np.int64), np.array([pred[i] for i in ids], dtype=np.int64)


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """accuracy, f1 (18-class macro F1), f1_mask, f1_gender, f1_age, f1_genderage (fractions) and n."""
    return {**metrics.evaluate_predictions(y_true, y_pred, "all"), "n": len(y_true)}


def evaluate_files(gt_path: str | os.PathLike, pred_path: str | os.PathLike) -> dict:
    """`scores` of a predictions file against a ground-truth file (or folders holding them).
    Raises EvaluationError on bad input."""
    _, y_true, y_pred = load_labels(gt_path, pred_path)
    return scores(y_true, y_pred)


def read_probs(path: Path, ids: Sequence[str]) -> np.ndarray:
    """[len(ids), 18] probabilities from inference.py's <stem>_probs.csv (ImageID,p0..p17), in `ids` order."""
    if not path.is_file():
        raise EvaluationError("no probabilities for the error gallery (inference.py writes output_probs.csv beside "
                              "output.csv; or pass --probs)", path)
    columns = [f"p{c}" for c in range(NUM_CLASSES)]
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in (ID_COL, *columns) if c not in header]
            if missing:
                raise EvaluationError(f"missing column {', '.join(missing[:3])} (expected ImageID,p0..p17)", path)
            where = [header.index(c) for c in columns]
            table = {row[header.index(ID_COL)].strip(): [float(row[k]) for k in where] for row in reader if row}
    except EvaluationError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, IndexError) as e:
        raise EvaluationError(f"cannot read probabilities: {type(e).__name__}", path) from None
    absent = [i for i in ids if i not in table]
    if absent:
        raise EvaluationError(f"{len(absent)} ImageID(s) of the ground truth have no probabilities, "
                              f"first {absent[0]!r}", path)
    return np.array([table[i] for i in ids], dtype=np.float64)


def error_gallery(images: str, pred: Path, probs_file: str | None, out: str | None, ids: Sequence[str],
                  y_true: np.ndarray, y_pred: np.ndarray, age_bins: Sequence[int]) -> Path:
    """errors.png: per true class, the most confident mistakes (gallery.py); returns where it went."""
    from maskcls.gallery import error_rows, save_error_gallery  # torch, through image decoding: only --images
    escaping = [(i, reason) for i in ids if (reason := path_escape(i))]
    if escaping:  # ImageIDs come from the prediction and gt files: they must not reach outside --images
        raise EvaluationError(f"ImageID {escaping[0][0]!r} is {escaping[0][1]}, outside the images folder "
                              f"({len(escaping)} such ImageID(s)); ImageIDs name files inside it", pred)
    root = Path(images)
    if not root.is_dir():
        raise EvaluationError("--images is not a folder", images)
    root = root / "images" if (root / "images").is_dir() else root
    probs = read_probs(Path(probs_file) if probs_file else pred.with_name(f"{pred.stem}_probs.csv"), ids)
    paths = [str(root / i) for i in ids]
    shown = [c.path for r in error_rows(paths, y_true, y_pred, probs, class_names("all", age_bins)) for c in r.cells]
    missing = [p for p in shown if not os.path.isfile(p)]
    if missing:
        raise EvaluationError(f"{len(missing)} image(s) of the gallery not found, first {missing[0]}", images)
    target = Path(out) if out else pred.parent / "errors.png"
    save_error_gallery(target, paths, y_true, y_pred, probs, "all", age_bins, title=pred.name)
    return target


def _default_path(env: str, name: str) -> str | None:
    root = os.environ.get(env)
    return os.path.join(root, name) if root else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score output.csv against gt.csv (pairs rows by ImageID).",
                                     epilog="Exit code 2 on bad input, with a one-line error on stderr.")
    parser.add_argument("--gt", default=None,
                        help="ground-truth CSV with ImageID,ans, or a folder holding gt.csv "
                             "(default: $SM_GROUND_TRUTH_DIR/gt.csv)")
    parser.add_argument("--pred", default=None,
                        help="predictions CSV with ImageID,ans, or a folder holding output.csv "
                             "(default: $SM_OUTPUT_DATA_DIR/output.csv)")
    parser.add_argument("--json", action="store_true",
                        help="print only one JSON object (accuracy, f1, f1_mask, f1_gender, f1_age, ...) on stdout")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="the evaluation images (the eval folder holding images/, or images/ itself): also draw "
                             "the error gallery, each class's most confident mistakes, from the probabilities "
                             "inference.py writes beside the predictions (output_probs.csv)")
    parser.add_argument("--probs", default=None, metavar="FILE",
                        help="with --images: the probabilities CSV, ImageID,p0..p17 (default <pred>_probs.csv beside --pred)")
    parser.add_argument("--gallery", default=None, metavar="FILE",
                        help="with --images: where the error gallery goes (default errors.png beside the predictions)")
    parser.add_argument("--age_bins", nargs=2, type=int, default=list(DEFAULT_AGE_BINS),
                        metavar=("LOW", "HIGH"),
                        help="age cut points the labels were made with; only names the classes (default: 30 60)")
    add_tracking_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.age_bins[0] < args.age_bins[1]:
        parser.error(f"--age_bins must be two increasing positive ages, got {args.age_bins}")
    gt = args.gt or _default_path("SM_GROUND_TRUTH_DIR", "gt.csv")
    pred = args.pred or _default_path("SM_OUTPUT_DATA_DIR", "output.csv")
    try:
        if gt is None:
            raise EvaluationError("no ground truth: pass --gt or set SM_GROUND_TRUTH_DIR")
        if pred is None:
            raise EvaluationError("no predictions: pass --pred or set SM_OUTPUT_DATA_DIR")
        gt, pred = csv_path(gt, "gt.csv"), csv_path(pred, "output.csv")
        ids, y_true, y_pred = load_labels(gt, pred)
        if (args.gallery or args.probs) and not args.images:
            raise EvaluationError("--gallery and --probs draw the error gallery, which needs --images DIR "
                                  "(the evaluation images)")
        gallery = error_gallery(args.images, pred, args.probs, args.gallery, ids, y_true, y_pred,
                                args.age_bins) if args.images else None
    except EvaluationError as e:  # here too, not only in cli.run: in-process callers get the code
        cli.error(e)
        return EXIT_BAD_INPUT

    if len(ids) > 1 and len(set(y_true.tolist())) == 1:  # e.g. --gt eval/info.csv, whose ans is a placeholder
        print(f"warning: every ground-truth label in {gt} is class {y_true[0]}: is it the real gt.csv (info.csv's "
              f"ans is only a placeholder)?", file=sys.stderr)
    score = scores(y_true, y_pred)
    rows = metrics.per_class_rows(y_true, y_pred, "all", args.age_bins)
    with step_tracker(args, "evaluation", {"gt": gt, "pred": pred, "images": len(ids)},
                      announce_to=sys.stderr if args.json else None) as tracker:
        tracker.log_metrics({**{f"holdout_{k}": v for k, v in score.items() if k != "n"},
                             **class_metrics("holdout_f1", [r["f1"] for r in rows])}, step=0)
    if args.json:
        cm = metrics.confusion_counts(y_true, y_pred, NUM_CLASSES)
        print(json.dumps({**score, "gt": str(gt), "pred": str(pred), "per_class": rows,
                          "confusion_matrix": cm.tolist()}))
        return 0
    print(f"ground truth: {gt}\npredictions:  {pred}\nimages:       {len(ids)}")
    print(f"accuracy:     {score['accuracy']:.4f} ({100 * score['accuracy']:.2f}%)")
    print(f"macro F1:     {score['f1']:.4f} ({NUM_CLASSES} classes)")
    print(f"F1 mask {score['f1_mask']:.4f} | gender {score['f1_gender']:.4f} | age {score['f1_age']:.4f} "
          f"| gender-age {score['f1_genderage']:.4f}")
    print("\nper class:")
    print(metrics.per_class_table(y_true, y_pred, "all", args.age_bins))
    print("\nconfusion matrix:")
    print(metrics.confusion_matrix_text(y_true, y_pred, NUM_CLASSES))
    if gallery is not None:
        print(f"\nerror gallery (most confident mistakes per true class): {gallery}")
    return 0


if __name__ == "__main__":
    cli.run(main)  # a closed stdout (`| head`) ends quietly with 1, Ctrl-C with 130
