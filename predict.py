"""Predict photos: the top classes and the mask, gender and age reading of each image.

    python predict.py --model_dir model/exp photo.jpg more/*.jpg folder/
    python predict.py --model_dir model/fold0 model/fold1 --json photos/ > predictions.json
    python predict.py --mask_model_dir model/mask --genderage_model_dir model/ga photo.jpg

Folders are searched (with their subfolders) for .jpg/.jpeg/.png files; hidden files and folders
are skipped. Preprocessing, soft vote, CV folders and decision offsets work as in inference.py, so
the first class shown is the class inference.py writes to output.csv. The probabilities shown are
after the checkpoints' decision offsets (renormalised; `--offsets none` shows the model's own);
the mask, gender and age readings are their sums over the other two sub-tasks.
A bad file (missing, unreadable, not an image, damaged data that does not decode) gets one line on
stderr and the others are still predicted; the exit code is 0 when at least one image was predicted.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

import dataset as data
from maskcls import cli, faces, imaging
from maskcls.checkpoint import check_state_name, expand_runs
from maskcls.predictor import VOTES, load_for_task, load_members, mask_genderage_pair, vote
from maskcls.runtime import resolve_device
from maskcls.task import NUM_CLASSES, apply_offsets, decode18, task_of

SUBTASKS = ("mask", "gender", "age")  # decode18's order


class PredictError(cli.ToolkitError, ValueError):
    """Bad input to predict.py; one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", help="image files and folders")
    p.add_argument("--model_dir", nargs="+", default=[],
                   help="run folder(s) or .pth file(s); several = soft vote; a --fold all folder = its folds")
    p.add_argument("--mask_model_dir", default=None, help="with --genderage_model_dir: a 3-class mask model ...")
    p.add_argument("--genderage_model_dir", default=None, help="... and a 6-class gender-age model, combined")
    p.add_argument("--state", default="best_f1", help="best|best_f1|last (.pth optional; default best_f1)")
    p.add_argument("--weights", nargs="+", type=float, default=None, help="soft-vote weight per --model_dir")
    p.add_argument("--vote", choices=VOTES, default="mean",
                   help="how several models combine, as inference.py --vote")
    p.add_argument("--topk", type=cli.positive_int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout (messages go to stderr)")
    p.add_argument("--offsets", choices=["auto", "none"], default="auto",
                   help="auto: apply the checkpoints' decision offsets, as inference.py does")
    p.add_argument("--tta", choices=["none", "hflip"], default="none")
    p.add_argument("--batch_size", type=cli.positive_int, default=64)
    p.add_argument("--num_workers", type=cli.non_negative_int, default=0, help="loader processes (default 0: a few "
                   "photos decode faster than workers start; raise it for large folders)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    return p


# --------------------------------------------------------------------------- inputs
def is_model(path: str) -> bool:
    """A checkpoint, a run folder (holding .pth files) or a cross-validation folder."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".pth"
    return p.is_dir() and (any(p.glob("*.pth")) or expand_runs([p])[0] != [p])


def split_models(model_dirs: Sequence[str], images: Sequence[str]) -> tuple[list[str], list[str]]:
    """`--model_dir RUN photo.jpg dir/` gives argparse's nargs="+" everything: the models are the
    first entry and those after it that are runs or checkpoints; the rest are images."""
    models = list(model_dirs[:1])
    rest = list(model_dirs[1:])
    while rest and is_model(rest[0]):
        models.append(rest.pop(0))
    return models, [*images, *rest]


def collect_images(inputs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(image paths in the order given, without repeats; [(path, why it is bad)])."""
    found: dict[str, None] = {}
    bad: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = [f for f in sorted(path.rglob("*")) if f.suffix.lower() in data.IMAGE_EXTENSIONS
                     and not any(part.startswith(".") for part in f.relative_to(path).parts) and f.is_file()]
            if not files:
                bad.append((item, "no .jpg/.jpeg/.png images in folder"))
        elif path.exists():
            files = [path]
        else:
            bad.append((item, "no such file"))
            files = []
        for f in files:
            # decode too: a file whose compressed data is damaged passes the header check and would
            # stop the whole run in the loader (about a millisecond an image)
            reason = imaging.check_image(f, decode=True)
            if reason:
                bad.append((str(f), reason))
            else:
                found.setdefault(str(f))
    return list(found), bad


# --------------------------------------------------------------------------- reading probabilities
def readable_names(classes: Sequence[str]) -> list[str]:
    """A checkpoint's class names without their id prefix: "4 wear/female/30-59" -> "wear/female/30-59"."""
    return [re.sub(r"^\d+ ", "", name) for name in classes]


def subtask_readings(probs: np.ndarray, names: Sequence[str]) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per sub-task, (value names, [N, values] marginal probabilities) of 18-class probabilities;
    the value names come from the class names (so age groups follow the checkpoint's age bins)."""
    out = {}
    for k, (field, index) in enumerate(zip(SUBTASKS, decode18(np.arange(NUM_CLASSES)))):
        values = range(int(index.max()) + 1)
        labels = [names[int(np.flatnonzero(index == v)[0])].split("/")[k] for v in values]
        out[field] = (labels, np.stack([probs[:, index == v].sum(1) for v in values], axis=1))
    return out


def predictions(paths: Sequence[str], probs: np.ndarray, pred: np.ndarray, names: Sequence[str],
                topk: int, face: Sequence[str] | None = None) -> list[dict]:
    """One dict per image: class (inference.py's), name, top-k, sub-task readings, all probabilities, and with
    a face stage where the crop came from (`face`: detected or fallback)."""
    readings = subtask_readings(probs, names)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :topk]
    rows = []
    for i, path in enumerate(paths):
        top = [int(pred[i])] + [int(c) for c in order[i] if c != pred[i]][:topk - 1]
        rows.append({
            "path": path, "class": int(pred[i]), "name": names[pred[i]], "probability": float(probs[i, pred[i]]),
            "top": [{"class": c, "name": names[c], "probability": float(probs[i, c])} for c in top],
            **{field: dict(zip(labels, map(float, p[i]))) for field, (labels, p) in readings.items()},
            "probs": [float(v) for v in probs[i]],
            **({"face": face[i]} if face is not None else {}),
        })
    return rows


def format_text(rows: Sequence[dict]) -> str:
    width = max(len(t["name"]) for row in rows for t in row["top"]) + 6
    lines = []
    for row in rows:
        lines.append(row["path"] + (f"  (face {row['face']})" if "face" in row else ""))
        lines += [f"  {t['class']:>2}  {t['name'].replace('/', ' / '):<{width}} {t['probability']:.3f}" for t in row["top"]]
        lines += [f"  {field + ':':<8}" + "  ".join(f"{name} {p:.3f}" for name, p in row[field].items())
                  for field in SUBTASKS]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def predict(args: argparse.Namespace, models: list[str], paths: list[str], run: dict
            ) -> tuple[np.ndarray, np.ndarray, list[str], bool]:
    """(shown probabilities [N, 18], classes, class names, whether offsets were applied)."""
    if args.mask_model_dir:
        _, _, probs = mask_genderage_pair(args.mask_model_dir, args.genderage_model_dir, args.state, paths, **run)
        mask, ga = (readable_names(load_for_task(d, args.state)[0]["classes"])
                    for d in (args.mask_model_dir, args.genderage_model_dir))
        return probs, probs.argmax(1), [f"{m}/{g}" for m in mask for g in ga], False  # m * 6 + g, as the pair
    members = load_members(models, args.state, args.weights)  # checks --weights too
    task = task_of(members[0].ckpt)
    if not task.predicts_18:  # before predicting: the readings below decode 18 classes
        raise PredictError(f"predict.py needs 18-class models (task all or multi), got a {task.name!r} model; "
                           f"combine a mask and a gender-age model with --mask_model_dir and --genderage_model_dir")
    probs, pred, rule, ckpts = vote(members, paths, args.offsets, how=args.vote, **run)
    return apply_offsets(probs, rule), pred, readable_names(ckpts[0]["classes"]), rule is not None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_state_name(args.state)
    models, inputs = split_models(args.model_dir, args.images)
    if bool(args.mask_model_dir) != bool(args.genderage_model_dir):
        raise PredictError("--mask_model_dir and --genderage_model_dir go together")
    if args.mask_model_dir and models:
        raise PredictError("give --model_dir or the pair --mask_model_dir/--genderage_model_dir, not both")
    if not models and not args.mask_model_dir:
        raise PredictError("no model: pass --model_dir RUN (or --mask_model_dir and --genderage_model_dir)")
    if not inputs:
        raise PredictError("no images: pass image files or folders after the flags")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise PredictError(str(e)) from None

    paths, bad = collect_images(inputs)
    for path, reason in bad:
        print(f"warning: {reason}: {path} (skipped)", file=sys.stderr, flush=True)
    if not paths:
        raise PredictError(f"no image to predict ({len(bad)} input(s) skipped)")
    face_run = faces.FaceRun()
    run = dict(batch_size=args.batch_size, num_workers=args.num_workers, tta=args.tta, device=device,
               face_run=face_run)
    # with --json, stdout carries the document only; what inference prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        probs, pred, names, offsets = predict(args, models, paths, run)
    rows = predictions(paths, probs, pred, names, min(args.topk, probs.shape[1]), face_run.sources())
    if args.json:
        print(json.dumps({"models": models or [args.mask_model_dir, args.genderage_model_dir],
                          "offsets_applied": offsets, "classes": names, "predictions": rows,
                          "skipped": [{"path": p, "reason": r} for p, r in bad]}))
    else:
        print(format_text(rows))
    return 0


if __name__ == "__main__":
    cli.run(main)
