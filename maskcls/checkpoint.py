"""The checkpoint format, in one place: self-describing files (the weights plus everything
inference needs: model, task, classes, age bins, image size, crop, normalisation, decision rule),
written atomically and loadable with `torch.load(weights_only=True)`.

Format `mask-toolkit/1` (a dict):
    format, model {name, num_classes, multihead, heads, options}, task, task_options {name, age_head, age_sigma},
    classes, age_bins, preprocess {resize, crop, mean, std, face (faces.FaceSettings or None; absent in files
    written before it)}, class_offsets, age_cuts,
    args (the run's config: what was asked), resolved (what the run derived from it),
    label_overrides (the corrections --label_overrides applied: person, image, kind, label, suggested;
    [] for none; absent in files written before it, read with .get),
    state_dict, epoch (0-based index of the last completed epoch, as PyTorch schedulers count),
    epoch_number (the same epoch as the console printed it: epoch + 1), metrics;
    last.pth adds what --resume needs (state_dict_train, optimizer, scheduler, scaler, ema, rng,
    best, tracking, split: the training and validation images as person/file, compared on resume).
`build_metadata` makes the descriptive part, `CheckpointSaver` (maskcls/saver.py) writes every file of a run,
`load_checkpoint` reads and checks one, `set_decision` updates the decision rule in place.
`run_folder` and `load_array` check a run folder and read the arrays train.py leaves beside its
checkpoints (val_probs.npy, val_labels.npy, val_logits.npy); every error names the file.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from maskcls.cli import ToolkitError
from maskcls.fileio import atomic_write_bytes, within
from maskcls.task import Task, task_of
from model import create_model

FORMAT = "mask-toolkit/1"
STATE_FILES = ("best.pth", "best_f1.pth", "last.pth")
RESUME_KEYS = ("state_dict_train", "optimizer", "scheduler", "scaler", "ema", "rng", "best", "tracking", "split")


class CheckpointError(ToolkitError, ValueError):
    """A missing, unreadable or unsuitable checkpoint; the message names the file."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through the project's atomic write: a crash never leaves a half-written file.
    Serialised in memory first, because torch.save reports a full disk as a RuntimeError;
    the file write then fails as an OSError naming the path (one `error:` line)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def model_spec(model_name: str, model_options: dict, task: Task) -> dict:
    """The network a checkpoint holds (its "model" entry): what `build_model` rebuilds."""
    return {"name": model_name, "num_classes": task.num_classes, "multihead": task.multihead,
            "heads": list(task.head_sizes) if task.head_sizes else None, "options": dict(model_options)}


def build_metadata(model_name: str, model_options: dict, task: Task, age_bins: Sequence[int],
                   preprocess: dict, args: dict, resolved: dict, age_cuts: Sequence[int] | None = None,
                   label_overrides: Sequence[dict] | None = None) -> dict:
    """Everything about a run that inference needs, without weights."""
    return {
        "format": FORMAT,
        "model": model_spec(model_name, model_options, task),
        "task": task.name, "task_options": task.to_dict(),
        "classes": task.class_names(age_bins), "age_bins": list(age_bins),
        "preprocess": {"resize": list(preprocess["resize"]),
                       "crop": list(preprocess["crop"]) if preprocess.get("crop") else None,
                       "mean": list(preprocess["mean"]), "std": list(preprocess["std"]),
                       "face": preprocess.get("face")},
        "class_offsets": None,
        "age_cuts": list(age_cuts) if age_cuts is not None and task.age_head == "years" else None,
        "args": args, "resolved": resolved,
        "label_overrides": [dict(o) for o in label_overrides or ()],
    }


def run_folder(path: str | os.PathLike) -> Path:
    """`path` as a run folder (what train.py writes), else CheckpointError saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"not a run folder (a file; give the folder train.py wrote, e.g. {path.parent}): {path}")
    raise CheckpointError(f"run folder not found: {path}")


VALIDATION_SAMPLES = "val_samples.csv"  # which image each validation row is: path, person, kind, age


def validation_samples(run: str | os.PathLike, ckpt: dict) -> list[dict]:
    """The rows of a run's val_samples.csv ([] when it has none), each path checked to lie inside the
    training data the checkpoint records (`resolved.data_dir`) before anything opens it: the file is
    text anyone can edit or send, and must not steer reads elsewhere. CheckpointError names the line."""
    path = Path(run) / VALIDATION_SAMPLES
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    root = (ckpt.get("resolved") or {}).get("data_dir")
    for line, row in enumerate(rows, start=2):
        image = row.get("path") or ""
        if image and (root is None or not within(root, image)):
            raise CheckpointError(f"{path} line {line}: {image!r} lies outside the training data the run records "
                                  f"({root or 'none recorded'}); its rows must name the run's own images")
    return rows


def load_array(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """One of the arrays train.py leaves beside a run's checkpoints (val_probs.npy, val_labels.npy,
    val_logits.npy): CheckpointError naming the file when it is empty, cut short (an interrupted run)
    or no such array, instead of numpy's EOFError or ValueError. An OSError is left to name the path."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path.name} is empty (0 bytes: an interrupted run?); train again: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (EOFError, ValueError) as e:
        raise CheckpointError(f"{path.name} is not a complete .npy array ({brief(e)}); train again: {path}") from None
    if not isinstance(array, np.ndarray):  # a .npz archive under a .npy name
        array.close()
        raise CheckpointError(f"{path.name} is an .npz archive, not a .npy array: {path}")
    if ndim is not None and array.ndim != ndim:
        raise CheckpointError(f"{path.name} has shape {array.shape}, expected {ndim} dimension(s): {path}")
    return array


def resolve_state_path(model_dir: str | os.PathLike, state: str = "best_f1.pth") -> Path:
    """`model_dir` may be a run folder or a .pth file; `state` accepts best|best_f1|last with or without .pth."""
    path = Path(model_dir)
    check_state_name(state)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    file = path / state_file(state)
    if not file.is_file():
        have = present_checkpoints(path)
        runs = sorted({p.parent.name for p in path.glob("*/*.pth")})
        hint = (f"; it holds run folders ({', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''}): pass one of them"
                if runs and have == "none" else "")
        raise CheckpointError(f"checkpoint not found: {file} (present: {have}){hint}")
    return file


def present_checkpoints(folder: Path) -> str:
    """The .pth files in `folder`, for an error that did not find the one it wanted ("none" if none)."""
    return ", ".join(p.name for p in sorted(folder.glob("*.pth"))) or "none"


def cross_validation_config(folder: Path) -> dict | None:
    """The config.json of a `train.py --kfold K --fold all` folder, or None when `folder` is not one."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("fold") == "all" else None


def expand_runs(paths: Iterable[str | os.PathLike]) -> list[list[Path]]:
    """Per path given, the run folders it stands for: itself, or for a cross-validation folder
    (`train.py --kfold K --fold all`: fold0/ .. fold<K-1>/ and no checkpoint of its own) its folds."""
    out = []
    for path in map(Path, paths):
        folds = [f for f in path.glob("fold*") if re.fullmatch(r"fold\d+", f.name) and f.is_dir()] \
            if path.is_dir() and not any(path.glob("*.pth")) else []
        folds = sorted(folds, key=lambda f: int(f.name[4:]))
        if folds and not (path / "cv.json").is_file():
            print(f"warning: {path} has no cv.json (an unfinished --fold all?): using its "
                  f"{len(folds)} fold(s) {', '.join(f.name for f in folds)}{_of_k_folds(path)}", file=sys.stderr)
        out.append(folds or [path])
    return out


def _of_k_folds(cv_dir: Path) -> str:
    """" of K" from the folder's --fold all config.json, or "" when it cannot say."""
    try:
        return f" of {int(cross_validation_config(cv_dir)['kfold'])}"
    except (KeyError, TypeError, ValueError):
        return ""


def state_file(state: str) -> str:
    return state if state.endswith(".pth") else f"{state}.pth"


def check_state_name(state: str) -> str:
    """Validate a --state value before any work; returns the file name."""
    name = state_file(state)
    if name not in STATE_FILES:
        near = difflib.get_close_matches(name, STATE_FILES, n=1)
        hint = f" (did you mean {near[0].removesuffix('.pth')!r}?)" if near else ""
        raise CheckpointError(f"unknown --state {state!r}; choose one of best, best_f1, last{hint}")
    return name


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by train.py and check its format; errors say what is wrong."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{unreadable(path, e)}: {path}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        kind = "a bare state_dict" if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor)
                                                                     for v in ckpt.values()) else type(ckpt).__name__
        raise CheckpointError(f"not a checkpoint written by train.py ({kind}, no model description): {path}")
    version = ckpt.get("format")
    if version is None:
        raise CheckpointError(f"checkpoint has no format version (written by an older or foreign tool; "
                              f"this toolkit reads {FORMAT}): {path}")
    if version != FORMAT:
        raise CheckpointError(f"checkpoint format {version!r} is not {FORMAT!r} (another tool or version): {path}")
    missing = [k for k in ("model", "task", "classes", "preprocess") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint lacks {', '.join(missing)}: {path}")
    try:
        task_of(ckpt)
    except ValueError as e:
        raise CheckpointError(f"{e}: {path}") from None
    return ckpt


def unreadable(path: str | os.PathLike, exc: BaseException) -> str:
    """Why torch.load could not read `path`, in a few words: its own text is empty for an empty file
    (EOFError) and a page of advice for a file that is no checkpoint (weights_only's UnpicklingError)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        head = None
    if head == b"":
        return "checkpoint is empty (0 bytes: an interrupted save or copy?)"
    # torch.save writes a zip archive; PyTorch before 1.6 a pickle (protocol marker 0x80)
    if head is not None and not head.startswith((b"PK\x03\x04", b"\x80")):
        kind = "a text file" if _looks_like_text(head) else "neither a zip archive nor a pickle"
        return f"not a PyTorch checkpoint ({kind}; give a run folder or a .pth that train.py wrote)"
    message = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if refused:
        return (f"checkpoint holds a Python object that a safe load refuses, {refused[1]} (a whole pickled model? "
                "this toolkit reads the checkpoints train.py writes)")
    if "PytorchStreamReader" in message:
        return f"checkpoint is truncated or corrupt ({brief(exc)})"
    return f"cannot read checkpoint ({brief(exc)})"


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # more than a character cut at the end of what was read
            return False
    return b"\x00" not in head


def brief(exc: BaseException, limit: int = 120) -> str:
    """`Type: first sentence of the message`, cut at a word: never empty, never cut mid-word."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = re.split(r"(?<=\.)\s", lines[0], maxsplit=1)[0].rstrip(".:")
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(exc).__name__}: {text}"


def load_resumable(path: str | os.PathLike) -> dict:
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt:
        raise CheckpointError(f"--resume needs a last.pth (with optimizer state): {path}")
    return ckpt


def check_resumable(ckpt: dict, model_name: str, model_options: dict, task: Task, resize: Sequence[int],
                    path: str | os.PathLike, face_crop: str = "none") -> None:
    """The network a resumed run builds must be the one its last.pth holds (else loading its weights
    fails with a page of missing keys), and it must see images of the same size (else one run folder
    holds checkpoints of two input sizes): one line naming what differs."""
    saved = {"options": {}, **ckpt["model"], "task": ckpt["task"], "resize": list(ckpt["preprocess"]["resize"]),
             "face_crop": (ckpt["preprocess"].get("face") or {}).get("geometry", "none")}
    wanted = {**model_spec(model_name, model_options, task), "task": task.name, "resize": list(resize),
              "face_crop": face_crop}
    labels = {"name": "model", "options": "model options", "num_classes": "classes", "resize": "--resize",
              "face_crop": "--face_crop"}
    differ = [f"{labels.get(key, key)} {saved.get(key)!r} there, {value!r} here"
              for key, value in wanted.items() if saved.get(key) != value]
    if differ:
        raise CheckpointError(f"--resume {path} holds another network or input ({'; '.join(differ)}): give the flags "
                              f"it was trained with, or none (they are read from its config.json)")


def set_decision(path: str | os.PathLike, class_offsets: Sequence[float] | None = None,
                 age_cuts: Sequence[int] | None = None) -> dict:
    """Store a decision rule (per-class log offsets and/or fitted age cut points) in a checkpoint."""
    ckpt = load_checkpoint(path)
    task = task_of(ckpt)
    if class_offsets is not None:
        if len(class_offsets) != task.num_classes:
            raise CheckpointError(f"{path} has {task.num_classes} classes, offsets have {len(class_offsets)}")
        ckpt["class_offsets"] = [float(v) for v in class_offsets]
    if age_cuts is not None:
        if task.age_head != "years":
            raise CheckpointError(f"age cut points need a model with a years age head: {path}")
        ckpt["age_cuts"] = [int(c) for c in age_cuts]
    atomic_save(ckpt, path)
    return ckpt


def decision_age_cuts(ckpt: dict) -> list[int]:
    """The cut points a years age head predicts with: fitted ones, else the labels' age bins."""
    return list(ckpt.get("age_cuts") or ckpt["age_bins"])


def build_model(ckpt: dict) -> nn.Module:
    """Rebuild the network a checkpoint describes (random init, then its weights)."""
    spec = ckpt["model"]
    heads = tuple(spec["heads"]) if spec.get("heads") else spec.get("multihead", False)
    model = create_model(spec["name"], spec["num_classes"], pretrained=False, multihead=heads, **spec.get("options", {}))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


# --------------------------------------------------------------------------- which training run
def recorded_run(run: Path) -> dict:
    """The MLflow run a run folder (or a checkpoint in it) trained in, as its last.pth records it:
    {uri, run_id, parent_run_id}; {} when it was trained without tracking."""
    last = (run if run.is_dir() else run.parent) / "last.pth"
    return (load_checkpoint(last).get("tracking") or {}) if last.is_file() else {}


def training_run(paths: Sequence[str | Path], client) -> str:
    """The one training run behind `paths`: a run's own, or the parent of several folds (a
    --fold all folder, or its fold folders listed). CheckpointError when there is none or several."""
    runs = [run for group in expand_runs(paths) for run in group]
    records = [recorded_run(run) for run in runs]
    missing = [run for run, rec in zip(runs, records) if not rec.get("run_id")]
    if missing:
        raise CheckpointError(f"no MLflow run recorded in {missing[0]}/last.pth (trained without tracking?); "
                           "pass --run_id ID")
    ids = {rec["run_id"] for rec in records}
    if len(ids) == 1:
        return ids.pop()
    # folds record their parent; older checkpoints do not, the server's tag does
    parents = {rec.get("parent_run_id") or client.get_run(rec["run_id"]).data.tags.get("mlflow.parentRunId")
               for rec in records}
    if len(parents) == 1 and None not in parents:
        return parents.pop()
    raise CheckpointError(f"the models come from {len(ids)} training runs, not the folds of one; pass --run_id ID")
