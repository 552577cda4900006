"""Predicting with checkpoints: a network built from its checkpoint (`prepare_model`), class probabilities for
image files preprocessed exactly as in training (`predict_probs`), and the soft vote of several models with
their decision offsets (`vote`). inference.py, predict.py, export.py and the served model share it."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import dataset as data
from maskcls import augment, cli, faces, imaging, loaders
from maskcls.checkpoint import build_model, decision_age_cuts, expand_runs, load_checkpoint, resolve_state_path
from maskcls.runtime import amp_dtype
from maskcls.task import NUM_CLASSES, decide, task_of
# Imported where used, being heavy or optional: tqdm (only on a terminal).

VOTES = ("mean", "geometric")  # how a soft vote combines its members' probabilities (combine_probs)


class InferenceError(cli.ToolkitError, ValueError):
    """Bad input to inference; one line naming the file."""


def prepare_model(ckpt: dict, device: torch.device) -> torch.nn.Module:
    """The checkpoint's network in eval mode on `device`, channels_last (measured faster for inference
    on CPU too, bench.py); build it once to predict many batches (a served model)."""
    return build_model(ckpt).to(device).eval().to(memory_format=torch.channels_last)


def predict_probs(ckpt: dict, paths: list[str], batch_size: int = 256, num_workers: int = 0, tta: str = "none",
                  device: torch.device | None = None, cache_dir: str | None = None, progress: bool = True,
                  model: torch.nn.Module | None = None, face_run: faces.FaceRun | None = None) -> np.ndarray:
    """Class probabilities [N, classes] for images, preprocessed exactly as in training
    (uint8 pipeline, normalised on the device; a face stage's crops where the checkpoint has one), in eval
    mode under inference_mode. `model`: the checkpoint's network from `prepare_model` (built here when not
    given). `face_run`: shares detections between the models of a vote and collects what the face stage
    found (the detections are cached on disk beside the image cache, `cache_dir`)."""
    device = device or torch.device("cpu")
    cuda = device.type == "cuda"
    pre = ckpt["preprocess"]
    task, age_cuts = task_of(ckpt), decision_age_cuts(ckpt)
    model = model if model is not None else prepare_model(ckpt, device)
    transform = augment.BatchTransform(pre["mean"], pre["std"], channels_last=True)
    face_run = face_run if face_run is not None else faces.FaceRun(cache_dir)
    store, located = imaging.face_store(paths, dict(pre), cache_dir, face_run)
    if located is not None and progress:
        print(located.summary())
    loader = loaders.make_loader(data.TestDataset(store), batch_size, num_workers=num_workers, pin_memory=cuda)
    batches = loader
    if progress and sys.stderr.isatty():
        from tqdm import tqdm
        batches = tqdm(loader, desc=f"predict {ckpt['model']['name']}", leave=False)
    out = []
    try:
        # Autocast on CUDA as in training: bf16 where the GPU has it, else fp16 (bf16 on a T4 or V100 is
        # emulated or refused). Off on a CPU (fp32, as train.py's CPU default).
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype(device), enabled=cuda):
            for images, _ in batches:
                x = transform(images.to(device, non_blocking=True))
                probs = task.probs(model(x).float(), age_cuts)
                if tta == "hflip":
                    probs = (probs + task.probs(model(torch.flip(x, dims=[3])).float(), age_cuts)) / 2
                out.append(probs.cpu())
    finally:
        loaders.close_loaders(loader)
    if cache_dir:
        store.finalize()
    return torch.cat(out).numpy()


def ensemble_offsets(ckpts: list[dict], weights: np.ndarray) -> np.ndarray | None:
    """Decision offsets for a soft vote: the weighted mean of each model's `class_offsets`
    (each fitted on its own validation people). None unless every model carries them."""
    have = [c.get("class_offsets") is not None for c in ckpts]
    if not any(have):
        return None
    if not all(have):
        print(f"warning: only {sum(have)} of {len(ckpts)} models carry decision offsets; using plain arg-max")
        return None
    offsets = np.array([c["class_offsets"] for c in ckpts], dtype=np.float64)
    return (offsets * weights[:, None]).sum(0) / weights.sum()


def load_for_task(model_dir: str, state: str, expected_task: str | None = None) -> tuple[dict, Path]:
    path = resolve_state_path(model_dir, state)
    ckpt = load_checkpoint(path)
    if expected_task is not None and ckpt["task"] != expected_task:
        raise InferenceError(f"checkpoint is a {ckpt['task']!r} model ({len(ckpt['classes'])} classes), "
                             f"this slot needs a {expected_task!r} model: {path}")
    return ckpt, path


@dataclass
class Member:
    """One model of a soft vote: its checkpoint, where it came from, its weight, and (once
    `prepare_model` has run, e.g. in a served model) its network."""

    ckpt: dict
    path: Path
    weight: float
    model: torch.nn.Module | None = None


def load_members(model_dirs: list[str], state: str, weights: list[float] | None = None) -> list[Member]:
    """The checkpoints of a soft vote, checked to predict the same classes; a cross-validation
    folder stands for its folds, which share its weight."""
    if weights and len(weights) != len(model_dirs):
        raise InferenceError(f"--weights has {len(weights)} values for {len(model_dirs)} --model_dir")
    if weights:  # the vote divides by their sum: negative or all-zero weights give NaN or nonsense
        bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
        if bad:
            raise InferenceError(f"--weights must be finite and >= 0, got {cli.examples(bad)}")
        if not sum(weights) > 0:
            raise InferenceError("--weights are all 0: give at least one model a weight > 0")
    members = [Member(*load_for_task(run, state), weight / len(group))
               for group, weight in zip(expand_runs(model_dirs), weights or [1.0] * len(model_dirs)) for run in group]
    tasks = {task_of(m.ckpt).num_classes if task_of(m.ckpt).predicts_18 else task_of(m.ckpt).name for m in members}
    if len(tasks) > 1:
        raise InferenceError("cannot soft-vote models of different tasks: "
                             + ", ".join(f"{m.path} ({m.ckpt['task']})" for m in members))
    return members


def check_submission_task(members: list[Member]) -> None:
    """Refuse a plain run of a mask (3-class) or gender-age (6-class) model: evaluation scores
    output.csv's `ans` as the 18 competition classes, so its task-local ids would be scored wrong."""
    task = task_of(members[0].ckpt)  # load_members made them all one task
    if not task.predicts_18:
        slot = "--mask_model_dir" if task.name == "mask" else "--genderage_model_dir"
        raise InferenceError(f"{members[0].path} is a {task.name!r} model ({task.num_classes} classes), but "
                             f"output.csv holds the 18 competition classes: use --isEnsemble True with a mask model "
                             f"(--mask_model_dir) and a gender-age model (--genderage_model_dir); this model goes "
                             f"in {slot}")


def combine_probs(probs: list[np.ndarray], weights: np.ndarray, how: str = "mean") -> np.ndarray:
    """One soft vote of the members' [N, C] probabilities. "mean": their weighted mean. "geometric": the
    weighted mean of their log-probabilities, renormalised (a product of experts): a class one member rules
    out loses even where another favours it. Multi-head models' classes are products of head probabilities,
    so the geometric vote decides mask, gender and age each on its own: a face model's vague mask head does
    not blur a CNN's sure one (docs/results.md, "A face-recognition network in the vote")."""
    if how not in VOTES:
        raise InferenceError(f"unknown vote {how!r}; known: {', '.join(VOTES)}")
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    if how == "mean":
        return sum(wi * p for wi, p in zip(w, probs))
    logs = sum(wi * np.log(np.clip(p, 1e-12, None)) for wi, p in zip(w, probs))
    logs -= logs.max(axis=1, keepdims=True)
    combined = np.exp(logs)
    return (combined / combined.sum(axis=1, keepdims=True)).astype(probs[0].dtype)


def vote(members: list[Member], paths: list[str], offsets: str = "auto", verbose: bool = True,
         how: str = "mean", **run) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[dict]]:
    """The members' soft vote (`combine_probs`: weighted mean, or `how="geometric"`) and the decided
    classes, with the checkpoints' decision offsets unless `offsets` is "none". Returns (probabilities,
    classes, the offsets used or None, checkpoints); `task.apply_offsets(probs, offsets)` gives
    probabilities whose arg-max is the class."""
    w = np.array([m.weight for m in members], dtype=np.float64)
    each = []
    for m in members:
        if verbose:
            print(f"model {m.path}: {m.ckpt['model']['name']} task {m.ckpt['task']} input {m.ckpt['preprocess']['resize']}")
        each.append(predict_probs(m.ckpt, paths, model=m.model, **run))
    probs = combine_probs(each, w, how)
    ckpts = [m.ckpt for m in members]
    rule = ensemble_offsets(ckpts, w) if offsets == "auto" else None
    if rule is not None and verbose:
        print("applying the checkpoints' per-class decision offsets (--offsets none to disable)")
    return probs, decide(probs, rule), rule, ckpts


def soft_vote(model_dirs: list[str], state: str, paths: list[str], weights: list[float] | None = None,
              offsets: str = "auto", verbose: bool = True, how: str = "mean", **run
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[dict]]:
    """`vote` of the models in `model_dirs` (run folders, .pth files, CV folders) at `state`."""
    return vote(load_members(model_dirs, state, weights), paths, offsets, verbose, how, **run)


def mask_genderage_pair(mask_dir: str, genderage_dir: str, state: str, paths: list[str], verbose: bool = True,
                        **run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A mask model (3 classes) and a gender-age model (6) -> (p_mask, p_genderage, p_18)."""
    mask_ckpt, mask_path = load_for_task(mask_dir, state, "mask")
    ga_ckpt, ga_path = load_for_task(genderage_dir, state, "genderage")
    if mask_ckpt["age_bins"] != ga_ckpt["age_bins"] and verbose:
        print(f"warning: age bins differ ({mask_ckpt['age_bins']} vs {ga_ckpt['age_bins']}); using the gender-age model's")
    if verbose:
        print(f"mask model {mask_path}, gender-age model {ga_path}")
    p_mask = predict_probs(mask_ckpt, paths, **run)
    p_ga = predict_probs(ga_ckpt, paths, **run)
    # p(class = m*6 + g) = p_mask(m) * p_ga(g): combine probabilities, not arg-max labels.
    return p_mask, p_ga, (p_mask[:, :, None] * p_ga[:, None, :]).reshape(len(paths), NUM_CLASSES)
