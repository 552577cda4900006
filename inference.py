"""Predict the evaluation set and write a submission.

    python inference.py --data_dir eval/ --model_dir model/exp            # output.csv + output_probs.csv
    python inference.py --model_dir model/fold0 model/fold1 model/fold2   # soft vote
    python inference.py --isEnsemble True --mask_model_dir model/mask --genderage_model_dir model/ga
    python inference.py ... --tracking_uri http://server:5000 --run_id checkpoint   # log into the training run

Everything about preprocessing (size, crop, normalisation), the model and its classes
comes from the checkpoint, so nothing here can disagree with training.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from maskcls import cli
import dataset as data
from maskcls import faces
from maskcls.checkpoint import (CheckpointError, build_model, check_state_name, decision_age_cuts, expand_runs,
                        load_checkpoint, resolve_state_path)
from maskcls.fileio import atomic_write_text
from maskcls.runtime import amp_dtype
from maskcls.task import NUM_CLASSES, decide, task_of
from maskcls.tracking import add_tracking_flags, class_metrics, step_tracker
from maskcls import imaging
from maskcls import augment
from maskcls import loaders


VOTES = ("mean", "geometric")  # how a soft vote combines its members' probabilities (combine_probs)


class InferenceError(cli.ToolkitError, ValueError):
    """Bad input to inference; one line naming the file."""


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=env("SM_CHANNEL_EVAL"), help="eval folder with info.csv and images/ (default $SM_CHANNEL_EVAL)")
    p.add_argument("--model_dir", nargs="+", default=[env("SM_CHANNEL_MODEL")] if env("SM_CHANNEL_MODEL") else None,
                   help="run folder(s) or .pth file(s); several = soft vote; a --fold all folder = its folds "
                        "(default $SM_CHANNEL_MODEL)")
    p.add_argument("--output_dir", default=env("SM_OUTPUT_DATA_DIR", "./output"), help="default $SM_OUTPUT_DATA_DIR or ./output")
    p.add_argument("--state", default="best_f1", help="best|best_f1|last (.pth optional; default best_f1: the competition scores macro F1)")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="soft-vote weight per --model_dir, >= 0 and not all 0 (default equal)")
    p.add_argument("--vote", choices=VOTES, default="mean",
                   help="how several models' probabilities combine: mean (default) or geometric (the weighted "
                        "mean of log-probabilities, renormalised)")
    p.add_argument("--batch_size", type=cli.positive_int, default=256)
    p.add_argument("--num_workers", type=cli.non_negative_int, default=loaders.default_num_workers())
    p.add_argument("--tta", choices=["none", "hflip"], default="none", help="hflip: average with the mirrored image")
    p.add_argument("--offsets", choices=["auto", "none"], default="auto",
                   help="auto: apply the per-class decision offsets saved in the checkpoint, if any")
    p.add_argument("--cache_dir", default=None, help="reuse/keep decoded eval images in a uint8 memmap cache")
    p.add_argument("--isEnsemble", type=cli.str2bool, default=False,
                   help="True: combine --mask_model_dir (3 classes) and --genderage_model_dir (6 classes)")
    p.add_argument("--mask_model_dir", default=None)
    p.add_argument("--genderage_model_dir", default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    add_tracking_flags(p, checkpoint_run=True)  # logs the parameters and the predicted class counts
    return p


ENSEMBLE_STEMS = ("output_mask", "output_genderAge", "output_ensemble")  # --isEnsemble's files beside output.csv


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


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def write_outputs(info: pd.DataFrame, probs: np.ndarray, pred: np.ndarray, out_dir: Path, stem: str = "output",
                  face: Sequence[str] | None = None) -> Path:
    """`<stem>.csv` (ImageID,ans in info.csv order) and `<stem>_probs.csv` (one column per class, and with a face
    stage a column `face`: where each photo's crop came from, `detected` or `fallback`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    submission = info[["ImageID"]].copy()
    submission["ans"] = pred.astype(int)
    write_csv(submission, out_dir / f"{stem}.csv")
    prob_frame = pd.DataFrame(probs, columns=[f"p{i}" for i in range(probs.shape[1])])
    prob_frame.insert(0, "ImageID", info["ImageID"].values)
    if face is not None:
        prob_frame.insert(1, "face", list(face))
    write_csv(prob_frame, out_dir / f"{stem}_probs.csv")
    return out_dir / f"{stem}.csv"


def class_count_summary(pred: np.ndarray, num_classes: int) -> str:
    counts = np.bincount(pred, minlength=num_classes)
    return "predicted per class: " + " ".join(f"{c}:{n}" for c, n in enumerate(counts))


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
    not blur a CNN's sure one (README "Recipes")."""
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


def main(argv: list[str] | None = None) -> int:
    from maskcls.runtime import resolve_device

    args = build_parser().parse_args(argv)
    check_state_name(args.state)  # before any image is read
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise InferenceError(str(e)) from None
    if args.isEnsemble and not (args.mask_model_dir and args.genderage_model_dir):
        raise InferenceError("--isEnsemble True needs --mask_model_dir and --genderage_model_dir")
    if not args.isEnsemble and not args.model_dir:
        raise InferenceError("no model: pass --model_dir or set SM_CHANNEL_MODEL")
    if not args.data_dir:
        raise InferenceError("no evaluation data: pass --data_dir or set SM_CHANNEL_EVAL")
    if not args.isEnsemble:
        members = load_members(args.model_dir, args.state, args.weights)
        check_submission_task(members)  # before any image is read
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InferenceError(f"--output_dir exists and is not a folder: {out_dir}")
    info, paths = data.read_eval_info(args.data_dir)
    bad = [f"{reason}: {p}" for p in paths if (reason := imaging.check_image(p))]
    if bad:  # every listed image needs a prediction: name them all before any work
        raise InferenceError(data.listed_images_error(bad, len(paths)))
    face_run = faces.FaceRun(args.cache_dir)
    run = dict(batch_size=args.batch_size, num_workers=args.num_workers, tta=args.tta, device=device,
               cache_dir=args.cache_dir, face_run=face_run)
    models = [args.mask_model_dir, args.genderage_model_dir] if args.isEnsemble else args.model_dir

    def training_run(client) -> str:  # --run_id checkpoint
        from serving import training_run
        return training_run(models, client)

    tracker = step_tracker(args, "inference", {"data_dir": args.data_dir, "model_dir": models, "state": args.state,
                                               "weights": args.weights, "vote": args.vote, "tta": args.tta, "offsets": args.offsets,
                                               "isEnsemble": args.isEnsemble, "images": len(paths)}, training_run)
    print(f"{len(paths)} images from {args.data_dir}, device {device}, tta {args.tta}")
    with tracker:
        if args.isEnsemble:
            p_mask, p_ga, probs = mask_genderage_pair(args.mask_model_dir, args.genderage_model_dir, args.state, paths,
                                                      **run)
            write_outputs(info, p_mask, p_mask.argmax(1), out_dir, ENSEMBLE_STEMS[0], face_run.sources())
            write_outputs(info, p_ga, p_ga.argmax(1), out_dir, ENSEMBLE_STEMS[1], face_run.sources())
            pred = probs.argmax(1)
            write_outputs(info, probs, pred, out_dir, ENSEMBLE_STEMS[2], face_run.sources())
        else:
            probs, pred, _, _ = vote(members, paths, args.offsets, how=args.vote, **run)
            stale = [f"{stem}.csv" for stem in ENSEMBLE_STEMS if (out_dir / f"{stem}.csv").exists()]
            if stale:  # left by an earlier --isEnsemble run into this folder: not this run's answers
                print(f"note: {out_dir} also holds {', '.join(stale)} from an earlier --isEnsemble run; "
                      f"this run's answers are output.csv")
        written = write_outputs(info, probs, pred, out_dir, "output", face_run.sources())
        print(class_count_summary(pred, probs.shape[1]))
        print(f"wrote {written} and {written.with_name(written.stem + '_probs.csv')}")
        face_counts = {f"inference_face_{k}": v for k, v in face_run.located[0].counts().items()} if face_run.located else {}
        tracker.log_metrics({"inference_images": len(pred), **face_counts,
                             **class_metrics("inference_predicted", np.bincount(pred, minlength=probs.shape[1]))},
                            step=0)
    return 0


if __name__ == "__main__":
    cli.run(main)
