"""Train a mask / gender / age classifier.

    python train.py                                   # synthetic demo data, small CNN
    python train.py --data_dir /data/train --model EfficientNetLite0 --resize 128 128
    python train.py --config model/exp/config.json    # re-run a run (flags still win)
    torchrun --nproc_per_node 4 train.py ...          # DistributedDataParallel, same flags

Reads top to bottom: arguments, then `main` builds data, model, optimisation and tracking and
runs the epoch loop (`train_one_epoch`, `validate`, checkpoints, tracking). Outputs go to
<model_dir>/<name>[N]/.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import io
import json
import math
import os
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from maskcls import cli
import dataset as data
from maskcls import faces
from maskcls.checkpoint import (VALIDATION_SAMPLES, CheckpointSaver, build_metadata, check_resumable, cross_validation_config,
                        load_resumable, present_checkpoints)
from maskcls.cli import UsageError, optional_bool, str2bool
from maskcls.overrides import read_label_overrides
from maskcls.fileio import atomic_write_text
from maskcls.task import AGE_HEADS, AGE_THRESHOLDS, TASK_CLASSES, Task, check_age_bins, get_task
from maskcls.tracking import DEFAULT_EXPERIMENT
from maskcls import imaging
from maskcls import augment
from maskcls import loaders

DEMO_DIR = Path("data/demo")
SCHEDULERS = ("none", "step", "cosine", "plateau", "onecycle")


# --------------------------------------------------------------------------- arguments
def fold_value(value: str | int) -> int | str:
    if isinstance(value, int) or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"expected a fold number or all, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get
    p.add_argument("--config", default=None,
                   help="JSON or YAML file of flag values (e.g. a run's config.json); flags on the command line win")
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default=env("SM_CHANNEL_TRAIN"),
                   help="training set: train/ or train/images (default $SM_CHANNEL_TRAIN; if unset, synthetic demo "
                        f"data generated once under ./{DEMO_DIR})")
    g.add_argument("--model_dir", default=env("SM_MODEL_DIR", "./model"), help="where run folders go (default $SM_MODEL_DIR or ./model)")
    g.add_argument("--dataset", default="MaskSplitByProfileDataset", help=f"split/label scheme: {', '.join(data.DATASETS)}")
    g.add_argument("--task", default=None, choices=list(TASK_CLASSES),
                   help="labels to learn: all (18), mask (3), genderage (6), multi (three heads); default from --dataset")
    g.add_argument("--age_head", default="bins", choices=AGE_HEADS,
                   help="multi-head age head: bins (softmax over the 3 groups) or years (ordinal over ages "
                        f"{AGE_THRESHOLDS[0]}..{AGE_THRESHOLDS[-1]} from the raw age; cut points applied at prediction)")
    g.add_argument("--age_sigma", type=float, default=0.0, metavar="YEARS",
                   help="multi-head: train the age head on each age spread over neighbouring years by a Gaussian of "
                        "this many years (a label distribution: age 29 trains partly on 30-59); 0 = hard labels")
    g.add_argument("--augmentation", default="BaseAugmentation", help=f"one of {', '.join(data.AUGMENTATIONS)}")
    g.add_argument("--face_crop", default="none", choices=list(faces.FACE_CROPS),
                   help="photos of a person -> aligned face crops before anything else: chip (dlib's face chip, "
                        "DlibFaceResNet's own input), wide (the same alignment with more margin, for CNNs), none "
                        "(default: the whole photo). The face is found by MTCNN (weights from facenet-pytorch); its "
                        "landmarks are cached beside the image cache; a training photo without a face takes its "
                        "sitting's, others a fallback crop. Recorded in the checkpoint: prediction crops alike "
                        "(docs/face-stage.md)")
    g.add_argument("--resize", nargs="+", type=int, default=None, metavar="H W",
                   help="input height and width, e.g. 224 224 (default: the model's documented size)")
    g.add_argument("--age_bins", nargs="+", type=int, default=list(data.DEFAULT_AGE_BINS), metavar="A B",
                   help="age cut points: <A, A..B-1, >=B (default 30 60); labels come from raw ages")
    g.add_argument("--score_age_bins", nargs="+", type=int, default=None, metavar="A B",
                   help="cut points of the validation labels (default: --age_bins). E.g. train with --age_bins 30 58 "
                        "but score with 30 60 as the competition does; splits are stratified with these")
    g.add_argument("--val_ratio", type=float, default=0.2, help="share of people (or images) held out (default 0.2)")
    g.add_argument("--kfold", type=int, default=0, help="K for person-level K-fold (0 = off); use with --fold")
    g.add_argument("--fold", type=fold_value, default=0,
                   help="which fold (0..K-1) is validation, or all: train every fold in turn into <name>/fold<i> and "
                        "report the mean and spread (cv.json)")
    g.add_argument("--mode", choices=["split", "all"], default="split", help="split: train/val; all: train on every image, no validation")
    g.add_argument("--sampler", choices=["none", "weighted"], default="none", help="weighted: sample classes by inverse frequency")
    g.add_argument("--cache", type=str2bool, default=False, help="decode+resize each image once into a uint8 memmap reused across epochs and runs")
    g.add_argument("--cache_dir", default=None, help="where the cache lives (default ~/.cache/mask-toolkit)")
    g.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader workers (default: none with --cache, where decoding is done once, or when training on "
                        "a CPU of 2 cores or fewer; else from the CPU count)")
    g.add_argument("--skip_bad_images", type=str2bool, default=False, nargs="?", const=True,
                   help="warn about and drop unreadable/truncated images instead of stopping")
    g.add_argument("--label_overrides", default=None, metavar="FILE",
                   help="label corrections without renaming data: an audit.csv of audit.py, the rows you confirmed "
                        "(gender/age per person, mask swaps, dropped images); recorded in the checkpoints")
    g = p.add_argument_group("model and loss")
    g.add_argument("--model", default="SmallCNN",
                   help="a model.py name (SmallCNN, BaseModel, ResNet18, EfficientNetLite0, ...) or timm:<name> (default SmallCNN)")
    g.add_argument("--pretrained", type=str2bool, default=True, help="ImageNet weights where the model has them (default True)")
    g.add_argument("--dropout", type=float, default=None,
                   help="dropout on the pooled features before the head (default: the model's own)")
    g.add_argument("--drop_path", type=float, default=None,
                   help="stochastic depth rate, e.g. 0.2 (EfficientNet / timm models; default: the model's own, off)")
    g.add_argument("--freeze_blocks", type=int, default=0, metavar="N",
                   help="freeze the stem and the first N stages of an EfficientNet / timm EfficientNet-style backbone "
                        "(default 0: everything trains); 2 nearly doubles a CPU training step at 128x128 and cost F1 (README)")
    g.add_argument("--criterion", default="cross_entropy", help="cross_entropy, focal, label_smoothing, f1")
    g.add_argument("--smoothing", type=float, default=0.1, help="label_smoothing strength (default 0.1)")
    g.add_argument("--focal_gamma", type=float, default=2.0, help="focal loss gamma (default 2)")
    g.add_argument("--head_weights", nargs="+", type=float, default=[1.0, 1.0, 1.0], metavar="MASK GENDER AGE",
                   help="multi-head loss weights")
    g.add_argument("--class_weights", choices=["none", "auto"], default="none", help="auto: inverse class frequency of the training split")
    g = p.add_argument_group("optimisation")
    g.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    g.add_argument("--epochs", type=int, default=12, help="number of epochs (default 12)")
    g.add_argument("--batch_size", type=int, default=64, help="per-process batch (global = batch x processes x accum_steps)")
    g.add_argument("--valid_batch_size", type=int, default=256, help="validation batch size")
    g.add_argument("--optimizer", default="AdamW", help="any torch.optim class: SGD, Adam, AdamW, ... (default AdamW)")
    g.add_argument("--lr", type=float, default=3e-3, help="(peak) learning rate (default 3e-3; ~1e-3 suits fine-tuning)")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="weight decay (default 1e-4)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default="onecycle", help="LR schedule (default onecycle)")
    g.add_argument("--lr_decay_step", type=int, default=20, help="step scheduler: epochs between x0.5 decays")
    g.add_argument("--warmup_epochs", type=float, default=0.0, help="linear warm-up (step/cosine)")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off); with --mixup, one of the two per batch")
    g.add_argument("--ema", type=float, default=0.0,
                   help="EMA decay of the weights, e.g. 0.999 (0 = off; warmed up: min(decay, (1+n)/(10+n)) after n "
                        "updates); validation uses the EMA")
    g.add_argument("--accum_steps", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--clip_grad", type=float, default=0.0, help="clip the gradient norm (0 = off)")
    g.add_argument("--early_stopping", type=int, default=0, help="stop after N epochs without a better val F1 (0 = off)")
    g.add_argument("--resume", default=None, help="continue from a last.pth")
    g.add_argument("--amp", type=optional_bool, default=None,
                   help="mixed precision (default: on with CUDA; off on CPU, where bf16 is faster on CPUs with "
                        "AVX-512 BF16/AMX but lost F1 in one of two CVs, see README)")
    g.add_argument("--channels_last", type=optional_bool, default=None,
                   help="NHWC memory format (default: on; measured faster on CPU and CUDA, see bench.py)")
    g.add_argument("--reuse_memory", type=optional_bool, default=None,
                   help="on a CPU, let malloc keep freed memory for reuse rather than unmapping it (default: on "
                        "with a CPU device and glibc; training steps 7-9%% faster, resident memory stays at its "
                        "peak; see bench.py)")
    g.add_argument("--compile", type=str2bool, default=False, help="torch.compile the model")
    g.add_argument("--sync_bn", type=str2bool, default=False, help="SyncBatchNorm under torchrun")
    g.add_argument("--dist_timeout", type=int, default=600, help="seconds before a stuck distributed op aborts")
    g = p.add_argument_group("logging")
    g.add_argument("--name", default="exp", help="run folder name (also the MLflow run name); a number is appended if it exists")
    g.add_argument("--log_interval", type=int, default=20, help="batches between training log lines")
    g.add_argument("--user", default=None, help="recorded as the MLflow tag 'user' (default $USER, else the account name)")
    g.add_argument("--experiment", default=None,
                   help=f"MLflow experiment (default $MLFLOW_EXPERIMENT_NAME, else {DEFAULT_EXPERIMENT})")
    g.add_argument("--tracking_uri", default=None,
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db); 'none' disables")
    g.add_argument("--register_model", default=None, metavar="NAME",
                   help="register the run's MLflow model (runs:/<run_id>/model) as a new version of NAME in the "
                        "Model Registry (default: logged, not registered)")
    return p


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Flag values from a JSON or YAML file (a run's config.json holds them plus a `resolved` part)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config file not found: {file}")
    text = file.read_text()
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as e:
        raise UsageError(f"cannot parse --config ({e.__class__.__name__}: {str(e).splitlines()[0][:100]}): {file}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config must hold a mapping of flag names to values: {file}")
    if values.get("resume") and file.name != "config.json":  # a run's config.json always records its resume
        print(f"warning: --config {file}: its resume key is ignored (a config starts a run); continue a run "
              f"with --resume on the command line", file=sys.stderr)
    values = {k: v for k, v in values.items() if k not in ("resolved", "config", "resume")}
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UsageError(f"--config has unknown keys {', '.join(unknown)}: {file}")
    return {key: config_value(actions[key], value, file) for key, value in values.items()}


def config_value(action: argparse.Action, value: object, file: Path) -> object:
    """A config file's value as the flag would parse it: argparse applies neither `type`, `nargs` nor
    `choices` to defaults, so without this `epochs: 1.5` or `scheduler: cosin` would reach the run."""
    def fail(why: str) -> NoReturn:
        raise UsageError(f"--config {action.dest}: {why}: {file}")

    def convert(item: object) -> object:
        if isinstance(item, (list, dict)):
            fail(f"expected one value, got {item!r}")
        if action.type is None:
            converted = item if isinstance(item, str) else str(item)
        elif isinstance(item, bool) and action.type not in (str2bool, optional_bool):
            fail(f"expected a number, got {item!r}")  # int(True) would pass as 1
        else:
            try:  # as on the command line: 16.0 is not an int, "2e-3" (YAML 1.1 reads it as text) is a float
                converted = item if isinstance(item, bool) else action.type(str(item))
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                kind = getattr(action.type, "__name__", "")
                fail(f"expected {'an' if kind == 'int' else 'a'} {kind}, got {item!r}" if kind in ("int", "float")
                     else str(e))
        if action.choices is not None and converted not in action.choices:
            fail(f"unknown value {converted!r} (known: {', '.join(map(str, action.choices))})")
        return converted

    if value is None:
        if action.default is None:
            return None
        fail(f"needs a value (default {action.default!r})")
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        if not isinstance(value, list) or (action.nargs == "+" and not value):
            form = ", ".join(str(action.metavar or "...").split())
            fail(f"expected a list [{form}] as {action.option_strings[0]} takes, got {value!r}")
        return [convert(item) for item in value]
    return convert(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags; `--resume RUN/last.pth` (that run's config.json), then `--config FILE` set the parser's
    defaults, so flags given still win."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--resume", default=None)
    first, _ = pre.parse_known_args(argv)
    resume = resume_file(first.resume) if first.resume else None
    saved = resume.parent / "config.json" if resume else None
    if saved is not None and saved.is_file():  # `--resume <run>/last.pth` alone continues the run as it was
        parser.set_defaults(**load_config(saved, parser))
        if is_fold_of_cross_validation(resume):  # a fold of --fold all: the folds after it follow
            parser.set_defaults(fold="all")
    if first.config:
        parser.set_defaults(**load_config(first.config, parser))
    args = parser.parse_args(argv)
    if resume is not None:
        args.resume = str(resume)
    validate_args(args)
    return args


def resume_file(value: str) -> Path:
    """--resume's last.pth (a run folder stands for its last.pth), checked before anything runs."""
    path = Path(value)
    if path.is_dir():
        if not (path / "last.pth").is_file():
            raise UsageError(f"--resume: no last.pth in {path} (present: {present_checkpoints(path)})")
        return path / "last.pth"
    if not path.is_file():
        raise UsageError(f"--resume: file not found: {path}")
    return path


def is_fold_of_cross_validation(resume: Path) -> bool:
    """Whether a last.pth is in fold<i>/ of a --fold all folder."""
    return bool(re.fullmatch(r"fold\d+", resume.parent.name)) and cross_validation_config(resume.parent.parent) is not None


def validate_args(args: argparse.Namespace) -> None:
    """Every name and number, before any work: one line each, with the known names."""
    import loss
    import model as zoo

    pairs = {"--resize": (args.resize, "H W, e.g. 224 224"), "--age_bins": (args.age_bins, "A B, e.g. 30 60"),
             "--score_age_bins": (args.score_age_bins, "A B, e.g. 30 60")}
    for flag, (value, form) in pairs.items():
        if value is not None and len(value) != 2:
            raise UsageError(f"{flag} takes two numbers, {form}; got {' '.join(map(str, value))}")
    if len(args.head_weights) != 3:
        raise UsageError(f"--head_weights takes three numbers MASK GENDER AGE, e.g. 1 1 1; got {args.head_weights}")
    if args.resize is not None and min(args.resize) < 8:
        raise UsageError(f"--resize must be at least 8 8, got {args.resize[0]} {args.resize[1]}")
    try:
        for flag in ("--age_bins", "--score_age_bins"):
            if pairs[flag][0] is not None:
                check_age_bins(pairs[flag][0], flag)
    except ValueError as e:
        raise UsageError(str(e)) from None
    args.dataset = cli.choose(args.dataset, data.DATASETS, "--dataset")
    args.augmentation = cli.choose(args.augmentation, data.AUGMENTATIONS, "--augmentation")
    if not args.model.startswith(zoo.TIMM_PREFIX):
        args.model = cli.choose(args.model, zoo.MODELS, "model")  # "unknown model ..." as model.py says it
    args.criterion = cli.choose(args.criterion, loss.CRITERIA, "--criterion")
    optimizers = [n for n, c in vars(torch.optim).items() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
                  and c is not torch.optim.Optimizer]
    args.optimizer = cli.choose(args.optimizer, optimizers, "--optimizer")
    positive = {"--epochs": args.epochs, "--batch_size": args.batch_size, "--valid_batch_size": args.valid_batch_size,
                "--accum_steps": args.accum_steps, "--log_interval": args.log_interval,
                "--lr_decay_step": args.lr_decay_step, "--dist_timeout": args.dist_timeout}
    for flag, value in positive.items():
        cli.positive(value, flag)
    at_least_zero = {"--lr": args.lr, "--weight_decay": args.weight_decay, "--warmup_epochs": args.warmup_epochs, "--mixup": args.mixup,
                     "--cutmix": args.cutmix, "--clip_grad": args.clip_grad, "--early_stopping": args.early_stopping,
                     "--smoothing": args.smoothing, "--focal_gamma": args.focal_gamma}
    for flag, value in at_least_zero.items():
        if not value >= 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    if args.name.strip() in ("", ".", "..") or "/" in args.name or os.sep in args.name:
        raise UsageError(f"--name must be a folder name (not empty, no {os.sep}), got {args.name!r}")
    if args.num_workers is not None and args.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0, got {args.num_workers}")
    if not 0 <= args.ema < 1:
        raise UsageError(f"--ema must be a decay in [0, 1), e.g. 0.999; got {args.ema}")
    if args.smoothing >= 1:
        raise UsageError(f"--smoothing must be below 1, got {args.smoothing}")
    if args.mode == "split" and not args.kfold and not 0 < args.val_ratio < 1:
        raise UsageError(f"--val_ratio must lie between 0 and 1, got {args.val_ratio}")
    if args.kfold == 1 or args.kfold < 0:
        raise UsageError(f"--kfold must be 0 (off) or at least 2, got {args.kfold}")
    if args.fold == "all" and (not args.kfold or args.mode == "all"):
        raise UsageError("--fold all trains every fold of a --kfold K split (K >= 2, --mode split)")
    if args.kfold and args.fold != "all" and not 0 <= args.fold < args.kfold:
        raise UsageError(f"--fold must lie in 0..{args.kfold - 1} for --kfold {args.kfold}, got {args.fold}")
    if args.fold == "all" and args.resume and not re.fullmatch(r"fold\d+", Path(args.resume).parent.name):
        raise UsageError(f"--fold all resumes from a fold's last.pth (<run>/fold<i>/last.pth), got {args.resume}")
    if min(args.head_weights) < 0:
        raise UsageError(f"--head_weights must be >= 0, got {args.head_weights}")
    if args.register_model is not None:
        from maskcls.tracking import check_model_name, require_tracking

        check_model_name(args.register_model)
        require_tracking(args.tracking_uri, "--register_model needs MLflow tracking")
    if args.label_overrides:
        read_label_overrides(args.label_overrides)  # the file's own faults, before any work


@dataclass
class Settings:
    """What the run derived from its arguments (kept apart from them in config.json)."""

    task: Task
    resize: tuple[int, int]
    age_bins: tuple[int, int]
    score_age_bins: tuple[int, int]
    amp: bool
    channels_last: bool
    reuse_memory: bool
    num_workers: int
    model_options: dict
    data_dir: str
    world: int
    global_batch: int
    mean: tuple = ()
    std: tuple = ()
    run_dir: str | None = None
    face: dict | None = None  # the face stage's settings (faces.FaceSettings), before training learns its fallback

    def to_dict(self) -> dict:
        out = {k: v for k, v in vars(self).items() if k != "task"}
        out.update(task=self.task.name, age_head=self.task.age_head, age_sigma=self.task.age_sigma, world_size=self.world)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items() if k != "world"}


def resolve_settings(args: argparse.Namespace, device: torch.device, world: int) -> Settings:
    """Defaults that depend on the model, the task or the hardware; unknown names fail here."""
    from model import check_pretrained, model_info, regularization_options, size_options
    from maskcls.hub import PretrainedUnavailable
    from maskcls.runtime import default_amp, default_reuse_memory, slow_amp_warning

    cuda = device.type == "cuda"
    try:
        spec = data.dataset_spec(args.dataset)
        augmentation = data.create_augmentation(args.augmentation)
        info = model_info(args.model)
        resize = tuple(args.resize or info.input_size)
        model_options = {**size_options(args.model, resize),
                         **regularization_options(args.model, args.dropout, args.drop_path, args.freeze_blocks)}
        task = get_task(args.task or spec["task"], args.age_head, args.age_sigma)
        if args.pretrained and not args.resume:
            check_pretrained(args.model)  # offline without cached weights: fail now, not after data setup
    except (ValueError, PretrainedUnavailable) as e:
        raise UsageError(str(e)) from None
    if augmentation.crop and min(augmentation.crop[1:]) < 1:  # (mode, height, width)
        raise UsageError(f"--augmentation {args.augmentation} has an empty crop")
    if augmentation.crop and args.face_crop != "none":
        raise UsageError(f"--face_crop {args.face_crop} cuts the face from the photo, --augmentation {args.augmentation} "
                         f"crops the photo's frame ({augmentation.crop[0]} {augmentation.crop[1]}x{augmentation.crop[2]}): "
                         f"choose one (e.g. --augmentation FastAugmentation)")
    age_bins = tuple(args.age_bins)
    if args.amp and (note := slow_amp_warning(device)):
        log(f"warning: --amp True: {note}")
    # With the cache nothing is decoded after the first epoch: a worker only adds IPC (bench.py).
    cpu_training = device.type == "cpu"
    workers = args.num_workers if args.num_workers is not None else \
        (0 if args.cache else loaders.default_num_workers(cpu_training))
    return Settings(task=task, resize=resize, age_bins=age_bins, score_age_bins=tuple(args.score_age_bins or age_bins),
                    amp=default_amp(device) if args.amp is None else args.amp,
                    channels_last=True if args.channels_last is None else args.channels_last,
                    reuse_memory=default_reuse_memory(device) if args.reuse_memory is None else args.reuse_memory,
                    num_workers=workers, model_options=model_options, data_dir=args.data_dir or str(DEMO_DIR / "train"),
                    world=world, global_batch=args.batch_size * world * args.accum_steps,
                    mean=tuple(info.mean), std=tuple(info.std),
                    face=faces.FaceSettings(args.face_crop).to_dict() if args.face_crop != "none" else None)


# --------------------------------------------------------------------------- process helpers
def log(*args) -> None:
    if is_main():
        print(*args, flush=True)


def is_main() -> bool:
    """Rank 0 under torchrun, else True. Read from torchrun's env, not dist.get_rank(), so it
    stays right after destroy_process_group (otherwise every rank would print the summary)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    return int(os.environ.get("RANK", "0")) == 0


def setup_distributed(timeout_s: int) -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def broadcast(value: Any, world: int) -> Any:
    """Rank 0's value on every rank."""
    if world == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def free_run_dir(model_dir: str, name: str) -> Path:
    """<model_dir>/<name>, or <name>2, <name>3, ... if taken (never overwrite a run)."""
    base = Path(model_dir) / name
    path, n = base, 2
    while path.exists():
        path, n = base.with_name(f"{name}{n}"), n + 1
    return path


def unique_dir(model_dir: str, name: str) -> Path:
    """Create and return the first free run folder (see free_run_dir)."""
    while True:
        path = free_run_dir(model_dir, name)
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:  # another run took it meanwhile
            continue


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def progress(loader, desc: str):
    if is_main() and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    return loader


# --------------------------------------------------------------------------- data
class EpochSampler(torch.utils.data.Sampler):
    """Shuffled (or class-weighted, with replacement) order for one epoch, sharded over
    processes. Seeded by (seed, epoch), so every rank agrees and --resume replays it."""

    def __init__(self, n: int, seed: int, weights: torch.Tensor | None = None, rank: int = 0, world: int = 1):
        self.n, self.seed, self.weights, self.rank, self.world = n, seed, weights, rank, world
        self.epoch = 0
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.per_rank * self.world, replacement=True, generator=g)
        else:
            order = torch.randperm(self.n, generator=g)
            order = torch.cat([order, order[: self.per_rank * self.world - self.n]])  # pad so shards are equal
        return iter(order[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return self.per_rank


@dataclass
class Data:
    samples: list
    store: Any
    train_set: Any
    val_set: Any
    train_loader: Any
    val_loader: Any
    sampler: EpochSampler
    val_order: list[int]  # this rank's validation rows, in loader order
    augmentation: Any
    label_overrides: list[dict] = field(default_factory=list)  # applied by discover; stored in the checkpoints
    preprocess: dict = field(default_factory=dict)  # the checkpoints' `preprocess`
    located: Any = None  # faces.Located of every sample, with a face stage
    split: dict = field(default_factory=dict)  # recorded_split: what --resume compares


def sample_key(sample) -> str:
    """How a run records an image of its split: person folder and file name (not the absolute path, so a
    moved dataset still matches)."""
    return f"{sample.person}/{Path(sample.path).name}"


def recorded_split(samples: list, train_idx: list[int], val_idx: list[int]) -> dict:
    """What last.pth keeps of the split, for --resume to compare: the training and validation images."""
    return {"train": sorted(sample_key(samples[i]) for i in train_idx),
            "val": sorted(sample_key(samples[i]) for i in val_idx)}


def _people(keys) -> str:
    names = sorted({k.split("/", 1)[0] for k in keys})
    return f"{len(names)} ({cli.examples(names)})"


def keep_recorded_split(samples: list, train_idx: list[int], val_idx: list[int], recorded: dict | None,
                        cross_validation: bool) -> tuple[list[int], list[int]]:
    """On --resume: the split the run started with, whatever the data holds now. Images gone since are
    named and dropped; images new since are left out (validation must stay people the model never trained
    on, and the first epochs never saw them). A --fold all resume on changed data stops: its later folds
    would be drawn from other people than its earlier ones. A last.pth from before splits were recorded
    resumes as before."""
    if recorded is None:
        return train_idx, val_idx
    now = {sample_key(x): i for i, x in enumerate(samples)}
    before = {"train": set(recorded["train"]), "val": set(recorded["val"])}
    if before["train"] == {sample_key(samples[i]) for i in train_idx} and \
            before["val"] == {sample_key(samples[i]) for i in val_idx}:
        return train_idx, val_idx
    gone = (before["train"] | before["val"]) - set(now)
    new = set(now) - before["train"] - before["val"]
    changes = "; ".join(part for part in (f"{len(gone)} image(s) of {_people(gone)} people are gone" if gone else "",
                                          f"{len(new)} image(s) of {_people(new)} people are new" if new else "")
                        if part) or "the same images fall otherwise into training and validation"
    if cross_validation:
        raise UsageError(f"the data changed since this cross-validation started ({changes}): its remaining folds "
                         f"would split other people; start it over without --resume (a new --name)")
    log(f"warning: the data changed since this run started ({changes}); keeping the run's recorded split: "
        f"gone images dropped, new ones left out of training and validation")
    return ([now[k] for k in sorted(before["train"] & set(now))], [now[k] for k in sorted(before["val"] & set(now))])


def build_data(args: argparse.Namespace, s: Settings, rank: int, world: int, pin_memory: bool,
               recorded: dict | None = None, cross_validation: bool = False) -> Data:
    overrides = read_label_overrides(args.label_overrides) if args.label_overrides else None
    samples = data.discover(s.data_dir, skip_bad_images=args.skip_bad_images, age_bins=s.age_bins, verbose=is_main(),
                            label_overrides=overrides)
    if args.mode == "all":
        train_idx, val_idx = list(range(len(samples))), []
    else:
        train_idx, val_idx = data.split_indices(samples, args.dataset, args.val_ratio, args.seed, s.score_age_bins,
                                                args.kfold, args.fold)
    train_idx, val_idx = keep_recorded_split(samples, train_idx, val_idx, recorded, cross_validation)
    if not train_idx:
        raise UsageError("no training image is left of the run's recorded split")
    if args.mode != "all" and not val_idx:
        raise UsageError("the validation split is empty; raise --val_ratio or use --mode all")
    log(f"split: {len(train_idx)} train / {len(val_idx)} validation images "
        f"({len({samples[i].person for i in train_idx})} / {len({samples[i].person for i in val_idx})} people)")
    augmentation = data.create_augmentation(args.augmentation)
    cache_dir = args.cache_dir or imaging.default_cache_dir()
    train_people = {samples[i].person for i in train_idx}
    # Only training photos lean on their sitting: validation photos stand alone, as at prediction.
    # what the checkpoints record; face_store adds the face stage's fallback, learnt from the training photos
    preprocess = {"resize": s.resize, "crop": augmentation.crop, "mean": s.mean, "std": s.std,
                  "face": dict(s.face) if s.face else None}
    store, located = imaging.face_store(
        [x.path for x in samples], preprocess, cache_dir if args.cache else None, faces.FaceRun(cache_dir),
        groups=[x.person if x.person in train_people else None for x in samples],
        progress=lambda items: progress(items, "face stage"))
    if located is not None:
        log(located.summary())
    if args.cache:
        log(f"image cache: {'warm, no decoding' if store.is_complete() else 'cold, filled during the first epoch'} "
            f"({store.cache_files[0]})")
    train_set = data.MaskDataset(samples, store, train_idx, s.task, s.age_bins, augmentation, train=True, seed=args.seed)
    val_set = data.MaskDataset(samples, store, val_idx, s.task, s.score_age_bins, train=False)
    weights = None
    if args.sampler == "weighted":
        labels = np.array(train_set.labels())
        weights = torch.tensor(1.0 / np.bincount(labels)[labels], dtype=torch.double)
    sampler = EpochSampler(len(train_set), args.seed, weights, rank, world)
    # Each loader draws its workers' base seed from a generator of its own: from the global RNG, the
    # draw would happen once per run with persistent workers, so a resumed run's dropout would differ.
    train_loader = loaders.make_loader(train_set, args.batch_size, sampler=sampler, num_workers=s.num_workers,
                                    pin_memory=pin_memory, seed=args.seed + rank)
    val_order = list(range(rank, len(val_set), world))  # exact shards: no padding, nothing dropped
    val_loader = loaders.make_loader(val_set, args.valid_batch_size, sampler=val_order, num_workers=s.num_workers,
                                  pin_memory=pin_memory, seed=args.seed + rank) if val_idx else None
    return Data(samples, store, train_set, val_set, train_loader, val_loader, sampler, val_order, augmentation,
                overrides.records() if overrides else [], preprocess, located,
                recorded_split(samples, train_idx, val_idx))


# --------------------------------------------------------------------------- optimisation
class ModelEma(nn.Module):
    """Exponential moving average of the weights (and buffers) with a warmed-up decay,
    min(decay, (1 + n) / (10 + n)) after n updates, as timm's ModelEmaV3 does: a fixed 0.999
    would still hold mostly the initial weights after the few hundred steps of a short run."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.updates)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for ema_v, v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.is_floating_point():
                ema_v.lerp_(v.detach(), 1.0 - d)
            else:
                ema_v.copy_(v)
        self.updates += 1


def make_scheduler(optimizer, name: str, lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
                   decay_step_epochs: int = 20):
    """Stepped once per optimizer step (plateau: once per epoch on val F1)."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(warmup_epochs * steps_per_epoch)
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total,
                                                   pct_start=max(warmup / total, 0.05) if warmup else 0.3)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
    if name == "none":
        return None
    if name == "step":
        step = decay_step_epochs * steps_per_epoch
        main = lambda s: 0.5 ** (s // step)  # noqa: E731
    else:  # cosine
        main = lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup))))  # noqa: E731
    # LambdaLR keeps no function in its state dict, so checkpoints stay weights_only-loadable.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else main(s))


@dataclass
class Optimisation:
    """Everything that changes the weights, stepped by `train_one_epoch`."""

    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: ModelEma | None
    params: list
    accum_steps: int = 1
    clip_grad: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    per_step_scheduler: bool = True

    def resume_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None}

    def restore(self, ckpt: dict, steps_done: int) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler"):
            if self.per_step_scheduler:  # a function of the step: keep this run's length (--epochs may change)
                self.scheduler.last_epoch = steps_done
            else:
                self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema.load_state_dict(ckpt["ema"])


def build_optimisation(args: argparse.Namespace, model: nn.Module, task: Task, train_targets: np.ndarray,
                       steps_per_epoch: int, device: torch.device, amp: bool) -> Optimisation:
    from loss import class_weights_from_labels
    from model import trainable_parameters
    from maskcls.runtime import amp_dtype

    weights = None
    if args.class_weights == "auto":
        weights = [class_weights_from_labels(labels, n).to(device)
                   for labels, n in zip(task.head_labels(train_targets), task.head_classes())]
        weights = tuple(weights) if task.multihead else weights[0]
    criterion = task.criterion(args.criterion, class_weights=weights, age_bins=tuple(args.age_bins), smoothing=args.smoothing,
                               gamma=args.focal_gamma, head_weights=tuple(args.head_weights))
    params = trainable_parameters(model)
    optimizer = getattr(torch.optim, args.optimizer)(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args.scheduler, args.lr, args.epochs, steps_per_epoch, args.warmup_epochs,
                               args.lr_decay_step)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype(device) == torch.float16)
    ema = ModelEma(model, args.ema) if args.ema > 0 else None
    return Optimisation(criterion, optimizer, scheduler, scaler, ema, params, args.accum_steps, args.clip_grad,
                        args.mixup, args.cutmix, per_step_scheduler=args.scheduler != "plateau")


def mix_batch(images: torch.Tensor, targets: torch.Tensor, mixup: float, cutmix: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix on the device batch; returns (images, targets_a, targets_b, lam)."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or random.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(np.random.beta(alpha, alpha))
    perm = torch.randperm(images.shape[0], device=images.device)
    if use_cutmix:
        h, w = images.shape[2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = np.random.randint(h), np.random.randint(w)
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = lam * images + (1 - lam) * images[perm]
    return images, targets, targets[perm], lam


# --------------------------------------------------------------------------- one epoch
def train_one_epoch(model: nn.Module, loader, opt: Optimisation, transform, task: Task, age_bins: Sequence[int],
                    device: torch.device, amp: bool = False, epoch: int = 0, epochs: int = 1, log_interval: int = 20,
                    world: int = 1, ema_source: nn.Module | None = None) -> dict[str, float]:
    """One pass over `loader`; returns train_loss, train_acc, lr, epoch_time, train_images(_per_s),
    summed over all processes. `model` is what runs forward (DDP / compiled); `ema_source` the
    plain module the EMA follows (default `model`)."""
    from loss import compute_loss, mixed_loss
    from maskcls.runtime import amp_dtype

    dtype = amp_dtype(device)
    mixing = opt.mixup > 0 or opt.cutmix > 0
    model.train()
    started = time.perf_counter()
    loss_sum = correct = seen = 0
    opt.optimizer.zero_grad(set_to_none=True)
    for step, (images, targets) in enumerate(progress(loader, f"epoch {epoch + 1}/{epochs}")):
        images = transform(images.to(device, non_blocking=True), train=True)
        targets = targets.to(device, non_blocking=True)
        if mixing:
            images, targets_a, targets_b, lam = mix_batch(images, targets, opt.mixup, opt.cutmix)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            output = model(images)
            loss = (mixed_loss(opt.criterion, output, targets_a, targets_b, lam) if mixing
                    else compute_loss(opt.criterion, output, targets))
        opt.scaler.scale(loss / opt.accum_steps).backward()
        if (step + 1) % opt.accum_steps == 0 or step + 1 == len(loader):
            if opt.clip_grad > 0:
                opt.scaler.unscale_(opt.optimizer)
                torch.nn.utils.clip_grad_norm_(opt.params, opt.clip_grad)
            opt.scaler.step(opt.optimizer)
            opt.scaler.update()
            opt.optimizer.zero_grad(set_to_none=True)
            if opt.ema is not None:
                opt.ema.update(ema_source or model)
            if opt.scheduler is not None and opt.per_step_scheduler:
                opt.scheduler.step()
        logits = output[0] if isinstance(output, tuple) else output
        with torch.no_grad():
            correct += int((task.probs(logits.float(), age_bins).argmax(1) == task.batch_labels(targets, age_bins)).sum())
        loss_sum += float(loss.detach()) * images.shape[0]
        seen += images.shape[0]
        if (step + 1) % log_interval == 0 and not sys.stderr.isatty():
            log(f"epoch {epoch + 1} [{step + 1}/{len(loader)}] loss {loss_sum / seen:.4f} "
                f"acc {correct / seen:.2%} lr {opt.optimizer.param_groups[0]['lr']:.2e}")
    elapsed = time.perf_counter() - started
    if world > 1:  # every rank's share, so the logged figures cover the whole epoch
        totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        loss_sum, correct, seen = totals[0].item(), int(totals[1].item()), int(totals[2].item())
    return {"train_loss": loss_sum / max(1, seen), "train_acc": correct / max(1, seen),
            "lr": opt.optimizer.param_groups[0]["lr"], "epoch_time": elapsed,
            "train_images": seen, "train_images_per_s": seen / elapsed}


@dataclass
class Validation:
    """Validation outputs in dataset order: logits [N, outputs], probabilities [N, classes]."""

    logits: np.ndarray
    probs: np.ndarray
    loss: float
    pred: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.pred = self.probs.argmax(1)


@torch.inference_mode()
def validate(model: nn.Module, loader, criterion: nn.Module, transform, task: Task, age_bins: Sequence[int],
             device: torch.device, order: Sequence[int] | None = None, amp: bool = False, world: int = 1) -> Validation:
    """Score this rank's shard (rows `order` of the dataset), gather every shard, restore dataset order."""
    from maskcls.runtime import amp_dtype

    model.eval()
    if world > 1:  # BatchNorm running stats drift apart (each rank sees its own batches):
        for buffer in model.buffers():  # score with rank 0's copy, the one that gets saved
            dist.broadcast(buffer, src=0)
    logits_all, loss_sum = [], 0.0
    with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
        for images, targets in progress(loader, "val"):
            images = transform(images.to(device, non_blocking=True), train=False)
            logits = model(images).float()
            loss_sum += float(criterion(logits, targets.to(device, non_blocking=True))) * images.shape[0]
            logits_all.append(logits.cpu())
    logits = torch.cat(logits_all) if logits_all else torch.zeros(0, 1)
    mine = (list(order if order is not None else range(len(logits))), logits.numpy(), loss_sum)
    gathered = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    rows = np.concatenate([np.asarray(g[0], dtype=np.int64) for g in gathered])
    all_logits = np.concatenate([g[1] for g in gathered])[np.argsort(rows)]
    probs = task.probs(torch.from_numpy(all_logits), age_bins).numpy()
    return Validation(all_logits, probs, sum(g[2] for g in gathered) / max(1, len(rows)))


# --------------------------------------------------------------------------- outputs of a validation
def report_validation(val: Validation, truth: np.ndarray, task: Task, age_bins, epoch: int, best: dict) -> dict:
    """Per-class table and scores; updates `best`; returns the val_* metrics."""
    from maskcls.metrics import evaluate_predictions, per_class_table

    scores = evaluate_predictions(truth, val.pred, task.report_task)
    metrics = {"val_loss": val.loss, "val_acc": scores["accuracy"], "val_f1": scores["f1"]}
    metrics.update({f"val_{k}": v for k, v in scores.items() if k.startswith("f1_")})
    best["improved_acc"] = scores["accuracy"] > best["acc"]
    best["improved_f1"] = scores["f1"] > best["f1"]
    if best["improved_acc"]:
        best["acc"] = scores["accuracy"]
    if best["improved_f1"]:
        best.update(f1=scores["f1"], epoch=epoch, stale=0)
    else:
        best["stale"] += 1
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
    from maskcls.gallery import save_error_gallery
    from maskcls.metrics import save_confusion_matrix_png, write_per_class_csv

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


# --------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace, s: Settings, device: torch.device, pretrained: bool) -> nn.Module:
    """The network, on the device, in the run's memory format: what is saved and what the EMA follows."""
    from model import create_model

    model = create_model(args.model, s.task.num_classes, pretrained=pretrained, multihead=s.task.head_sizes or False,
                         **s.model_options).to(device)
    return model.to(memory_format=torch.channels_last) if s.channels_last else model


def forward_module(model: nn.Module, device: torch.device, world: int, sync_bn: bool, compile: bool) -> nn.Module:
    """What runs forward in training: the model under DistributedDataParallel and/or torch.compile."""
    cuda = device.type == "cuda"
    if world > 1 and sync_bn and not cuda:  # SyncBatchNorm has no CPU kernel: it would fail at once
        log("warning: --sync_bn needs CUDA; training with per-process BatchNorm on CPU")
    elif world > 1 and sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    return torch.compile(model) if compile else model


def start_tracking(args: argparse.Namespace, s: Settings, run_dir: Path, resumed: dict | None,
                   parent: Any = None) -> Any:
    """The MLflow run of `run_dir` (a child of `parent` for a fold of --fold all), started before any
    data work so that an unreachable server stops the run at once."""
    from maskcls.tracking import Tracker, TrackingError, resolve_experiment, resolve_tracking_uri, resolve_user

    name = f"{parent.run_name}/{run_dir.name}" if parent is not None else run_dir.name
    tracker = Tracker(resolve_tracking_uri(args.tracking_uri), resolve_experiment(args.experiment, DEFAULT_EXPERIMENT),
                      name, resolve_user(args.user), enabled=is_main())
    saved = (resumed or {}).get("tracking") or {}
    try:
        tracker.start({**vars(args), **{f"resolved.{k}": v for k, v in s.to_dict().items()}, "run_dir": str(run_dir)},
                      resume_run_id=saved.get("run_id") if saved.get("uri") == tracker.uri else None, parent=parent)
    except TrackingError as e:
        raise UsageError(str(e)) from None
    return tracker


@dataclass
class RunResult:
    """What one training run leaves: its folder, best scores and its last epoch's metrics."""

    run_dir: Path
    best: dict
    metrics: dict
    exit_code: int = 0  # 130 / 143 when Ctrl-C / SIGTERM stopped it


# --------------------------------------------------------------------------- one run
def train_run(args: argparse.Namespace, rank: int, world: int, device: torch.device, parent: Any = None) -> RunResult:
    """Build data, model, optimisation and tracking for `args`, then run the epoch loop."""
    resumed = load_resumable(args.resume) if args.resume else None
    s = resolve_settings(args, device, world)
    if s.reuse_memory:  # before the loaders fork their workers; what config.json records is what took effect
        from maskcls.runtime import reuse_freed_memory
        s.reuse_memory = reuse_freed_memory()
    if resumed:
        check_resumable(resumed, args.model, s.model_options, s.task, s.resize, args.resume, args.face_crop)
        if resumed["epoch"] + 1 >= args.epochs and parent is None:  # nothing to train: leave the run as it is
            raise UsageError(f"nothing to resume: {args.resume} holds epoch {resumed['epoch'] + 1} of "
                             f"{args.epochs} (--epochs); give a larger --epochs to train on")
    run_dir = Path(broadcast(str(Path(args.resume).parent if args.resume else free_run_dir(args.model_dir, args.name)),
                             world))
    tracker = start_tracking(args, s, run_dir, resumed, parent)
    task, epoch, saved_epoch, metrics = s.task, -1, -1, {}
    best = {"acc": -1.0, "f1": -1.0, "epoch": -1, "stale": 0}
    d = None
    try:
        with tracker:
            seed_everything(args.seed + rank)  # distinct dropout/mixup draws per process; data order is seeded apart
            d = build_data(args, s, rank, world, pin_memory=device.type == "cuda",
                           recorded=resumed.get("split") if resumed else None, cross_validation=parent is not None)
            if d.located is not None and is_main():
                tracker.log_metrics({**{f"face_{k}": v for k, v in d.located.counts().items()},
                                     "face_seconds": d.located.seconds}, step=0)
            if not args.resume:  # the folder is made once the data is known to be usable
                run_dir = Path(broadcast(str(unique_dir(args.model_dir, run_dir.name)) if is_main() else None, world))
            s.run_dir = str(run_dir)
            model = build_model(args, s, device, pretrained=args.pretrained and not resumed)
            transform = augment.BatchTransform(s.mean, s.std, d.augmentation.noise_std, s.channels_last)
            steps_per_epoch = math.ceil(len(d.train_loader) / args.accum_steps)
            opt = build_optimisation(args, model, task, np.array(d.train_set.targets), steps_per_epoch, device, s.amp)
            forward_model = forward_module(model, device, world, args.sync_bn, args.compile)
            if resumed:
                model.load_state_dict(resumed.get("state_dict_train", resumed["state_dict"]))
                opt.restore(resumed, (resumed["epoch"] + 1) * steps_per_epoch)
                set_rng_state(resumed["rng"])
                best.update(resumed["best"])
                saved_epoch = resumed["epoch"]
                log(f"resuming from {args.resume} at epoch {saved_epoch + 2}")
            saver = CheckpointSaver(run_dir, build_metadata(
                args.model, s.model_options, task, s.age_bins,
                d.preprocess,
                args=vars(args), resolved=s.to_dict(), age_cuts=s.score_age_bins, label_overrides=d.label_overrides))
            eval_model = opt.ema.module if opt.ema is not None else model
            if is_main():
                atomic_write_text(run_dir / "config.json", json.dumps({**vars(args), "resolved": s.to_dict()}, indent=2))
                tracker.log_artifact(run_dir / "config.json")
                log(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                    f"{sum(p.numel() for p in opt.params):,} trainable), task {task.describe()}, "
                    f"input {s.resize[0]}x{s.resize[1]}, device {device}, {world} process(es), global batch "
                    f"{s.global_batch}, amp {s.amp}, channels_last {s.channels_last}, workers {s.num_workers}, "
                    f"reuse_memory {s.reuse_memory}\n"
                    f"outputs: {run_dir}")
            writer = None
            if is_main():
                from torch.utils.tensorboard import SummaryWriter
                writer = SummaryWriter(run_dir)
            truth = np.array(d.val_set.labels())
            try:
                for epoch in range(saved_epoch + 1, args.epochs):
                    d.sampler.set_epoch(epoch)
                    d.train_set.set_epoch(epoch)
                    metrics = train_one_epoch(forward_model, d.train_loader, opt, transform, task, s.age_bins, device,
                                              s.amp, epoch, args.epochs, args.log_interval, world, ema_source=model)
                    log(f"epoch {epoch + 1}/{args.epochs}: train loss {metrics['train_loss']:.4f} acc "
                        f"{metrics['train_acc']:.2%} ({metrics['epoch_time']:.1f}s, {metrics['train_images_per_s']:.0f} img/s)")
                    if args.cache and epoch == saved_epoch + 1:
                        finish_cache(d.store, world)
                    if d.val_loader is not None:
                        val = validate(eval_model, d.val_loader, opt.criterion, transform, task, s.score_age_bins,
                                       device, d.val_order, s.amp, world)
                        val_metrics = report_validation(val, truth, task, s.score_age_bins, epoch, best) if is_main() else {}
                        best, val_metrics = broadcast((best, val_metrics), world)  # every rank decides alike
                        metrics.update(val_metrics)
                        if is_main() and best["improved_acc"]:
                            saver.save("best.pth", eval_model.state_dict(), epoch, metrics)
                        if is_main() and best["improved_f1"]:
                            saver.save("best_f1.pth", eval_model.state_dict(), epoch, metrics)
                            write_validation_outputs(run_dir, val, truth, d.val_set, task, s.score_age_bins, tracker,
                                                     writer, epoch, face_crops=d.located is not None)
                        if opt.scheduler is not None and not opt.per_step_scheduler:
                            opt.scheduler.step(metrics["val_f1"])
                    if is_main():
                        resume = {**opt.resume_state(), "state_dict_train": model.state_dict(), "rng": rng_state(),
                                  "split": d.split,
                                  "best": {k: best[k] for k in ("acc", "f1", "epoch", "stale")},
                                  "tracking": {"uri": tracker.uri, "run_id": tracker.run_id,
                                               "parent_run_id": parent.run_id if parent is not None else None}}
                        saver.save("last.pth", eval_model.state_dict(), epoch, metrics, resume=resume)
                        log_epoch(writer, tracker, metrics, epoch)
                    saved_epoch = epoch
                    if args.early_stopping and d.val_loader is not None and best["stale"] >= args.early_stopping:
                        log(f"early stopping: no better val F1 for {args.early_stopping} epochs (best {best['f1']:.4f} "
                            f"at epoch {best['epoch'] + 1})")
                        break
            finally:
                if writer is not None:
                    writer.close()
            if is_main() and parent is None and tracker.active:  # a fold's model is in its parent's soft vote
                from maskcls.pyfunc import log_model
                log_model(tracker, run_dir, args.register_model)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the tracker ended the run as KILLED
        # Only the exit code leaves, not the traceback and the frames it holds; `finally` stops the
        # loaders' workers (they ignore SIGTERM, so interpreter exit would wait for them forever).
        log(interrupted_message(run_dir, epoch, saved_epoch))
        return RunResult(run_dir, best, metrics, exit_code=cli.exit_code(e))
    finally:
        if d is not None:
            loaders.close_loaders(d.train_loader, d.val_loader)
    summary = f"best val macro F1 {best['f1']:.4f} (epoch {best['epoch'] + 1}), " if d.val_loader else ""
    log(f"done: {summary}checkpoints in {run_dir}"
        + (f"; MLflow run {tracker.run_id} at {tracker.uri}" if tracker.run_id else "")
        + f"\n  predict: python inference.py --model_dir {shlex.quote(str(run_dir))} "  # pasteable with spaces
          f"--state {'best_f1' if d.val_loader else 'last'} --data_dir <eval folder>")
    return RunResult(run_dir, best, metrics)


def finish_cache(store, world: int) -> None:
    """After the first epoch: decode what no loader touched (e.g. --mode all leaves none) and seal the cache."""
    if world > 1:
        dist.barrier()
    if is_main():
        store.fill(range(len(store)))
        store.finalize()


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


# --------------------------------------------------------------------------- K-fold in one command
def cross_validate(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> RunResult:
    """--kfold K --fold all: train every fold in turn into <model_dir>/<name>/fold<i>, one MLflow child
    run each under one parent run, then report the mean and spread over folds and the pooled
    out-of-fold score in cv.json. With --resume <parent>/fold<i>/last.pth, folds before i are taken as done."""
    first = 0
    if args.resume:
        parent_dir = Path(args.resume).parent.parent
        first = int(Path(args.resume).parent.name.removeprefix("fold"))
    else:
        parent_dir = Path(broadcast(str(unique_dir(args.model_dir, args.name)) if is_main() else None, world))
    s = resolve_settings(args, device, world)
    # a resumed cross-validation continues its parent MLflow run, which the fold's last.pth names
    saved = (load_resumable(args.resume).get("tracking") or {}) if args.resume else {}
    parent = start_tracking(args, s, parent_dir, {"tracking": {"uri": saved.get("uri"),
                                                               "run_id": saved.get("parent_run_id")}})
    try:
        with parent:
            summary = train_folds(args, s, parent_dir, first, parent, rank, world, device)
    except KeyboardInterrupt as e:  # the interrupted fold said how to resume
        return RunResult(parent_dir, {}, {}, exit_code=cli.exit_code(e))
    return RunResult(parent_dir, {}, summary)


def train_folds(args: argparse.Namespace, s: Settings, parent_dir: Path, first: int, parent: Any, rank: int,
                world: int, device: torch.device) -> dict:
    from maskcls.metrics import evaluate_predictions

    later = [parent_dir / f"fold{fold}" for fold in range(first + 1, args.kfold) if (parent_dir / f"fold{fold}").exists()]
    if args.resume and later:
        raise UsageError(f"{later[0]} exists already: resume from the last fold that has a last.pth")
    if is_main():
        atomic_write_text(parent_dir / "config.json", json.dumps({**vars(args), "resolved": s.to_dict()}, indent=2))
    for fold in range(first, args.kfold):
        log(f"=== fold {fold + 1}/{args.kfold} ===")
        fold_args = argparse.Namespace(**{**vars(args), "fold": fold, "model_dir": str(parent_dir),
                                          "name": f"fold{fold}", "resume": args.resume if fold == first else None})
        result = train_run(fold_args, rank, world, device, parent=parent)
        if result.exit_code:  # ends the parent MLflow run as KILLED too
            raise cli.Interrupted(result.exit_code - 128)
    summary = summarise_folds([parent_dir / f"fold{fold}" for fold in range(args.kfold)], s.task, evaluate_predictions)
    if is_main():
        atomic_write_text(parent_dir / "cv.json", json.dumps(summary, indent=2))
        parent.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)}, step=0)
        parent.log_artifact(parent_dir / "cv.json")
        if parent.active:  # one model: the soft vote of every fold's best_f1.pth
            from maskcls.pyfunc import log_model
            log_model(parent, parent_dir, args.register_model)
        log(cv_report(summary, args.kfold) + f"\n  folds in {parent_dir}; predict with all of them: "
            f"python inference.py --model_dir {shlex.quote(str(parent_dir))} --data_dir <eval folder>")
    return summary


def summarise_folds(runs: Sequence[Path], task: Task, evaluate) -> dict:
    """Mean and sample standard deviation over folds of each best-F1 epoch's scores, and the macro F1
    of all out-of-fold predictions pooled (every person scored once, by the fold that never saw them)."""
    from maskcls.checkpoint import load_checkpoint

    per_fold, probs, labels = [], [], []
    for run in runs:
        ckpt = load_checkpoint(run / "best_f1.pth")
        last = load_checkpoint(run / "last.pth")
        per_fold.append({"run": str(run), "best_epoch": ckpt["epoch_number"], **{k: ckpt["metrics"][k] for k in
                         ckpt["metrics"] if k.startswith("val_")}, "last_val_f1": last["metrics"].get("val_f1")})
        probs.append(np.load(run / "val_probs.npy"))
        labels.append(np.load(run / "val_labels.npy"))
    pooled = evaluate(np.concatenate(labels), np.concatenate(probs).argmax(1), task.report_task)
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


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.dist_timeout)
    if not args.data_dir:
        from demo_data import ensure_demo_data
        if is_main():
            ensure_demo_data(DEMO_DIR)
        if world > 1:
            dist.barrier()
        log(f"no --data_dir or $SM_CHANNEL_TRAIN: training on synthetic demo data in {DEMO_DIR / 'train'}")
    result = (cross_validate if args.fold == "all" else train_run)(args, rank, world, device)
    if result.exit_code:
        return result.exit_code
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    cli.run(main)
