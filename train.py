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
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import dataset as data
import loss
import model as zoo
from demo_data import ensure_demo_data
from loss import class_weights_from_labels, compute_loss, mixed_loss
from maskcls import augment, cli, faces, imaging, loaders, runtime
from maskcls.checkpoint import (build_metadata, check_resumable, cross_validation_config, load_resumable,
                                present_checkpoints)
from maskcls.cli import UsageError, optional_bool, str2bool
from maskcls.config import Settings, load_config, resolve_settings
from maskcls.crossval import cv_report, summarise_folds
from maskcls.distributed import (broadcast, is_main, log, progress, rng_state, seed_everything, set_rng_state,
                                 setup_distributed)
from maskcls.ema import ModelEma
from maskcls.fileio import atomic_write_text, free_run_dir, unique_dir
from maskcls.mixing import mix_batch
from maskcls.optim import Optimisation
from maskcls.overrides import read_label_overrides
from maskcls.reports import Validation, interrupted_message, log_epoch, report_validation, write_validation_outputs
from maskcls.samplers import EpochSampler
from maskcls.saver import CheckpointSaver, new_best
from maskcls.schedulers import SCHEDULERS, make_scheduler, scheduler_info
from maskcls.task import AGE_HEADS, AGE_THRESHOLDS, DEFAULT_AGE_BINS, TASK_CLASSES, Task, check_age_bins
from maskcls.tracking import (DEFAULT_EXPERIMENT, Tracker, TrackingError, check_model_name, require_tracking,
                              resolve_experiment, resolve_tracking_uri, resolve_user)
# Imported where used, being heavy: maskcls.pyfunc (mlflow's model flavour; only a tracked run logs a model).

DEMO_DIR = Path("data/demo")


# --------------------------------------------------------------------------- arguments
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
    g.add_argument("--age_bins", nargs="+", type=int, default=list(DEFAULT_AGE_BINS), metavar="A B",
                   help="age cut points: <A, A..B-1, >=B (default 30 60); labels come from raw ages")
    g.add_argument("--score_age_bins", nargs="+", type=int, default=None, metavar="A B",
                   help="cut points of the validation labels (default: --age_bins). E.g. train with --age_bins 30 58 "
                        "but score with 30 60 as the competition does; splits are stratified with these")
    g.add_argument("--val_ratio", type=float, default=0.2, help="share of people (or images) held out (default 0.2)")
    g.add_argument("--kfold", type=int, default=0, help="K for person-level K-fold (0 = off); use with --fold")
    g.add_argument("--fold", type=cli.fold_value, default=0,
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
                        "(default 0: everything trains); 2 nearly doubles a CPU training step at 128x128 and cost F1 (docs/results.md)")
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
    g.add_argument("--scheduler", choices=list(SCHEDULERS), default="onecycle", help="LR schedule (default onecycle)")
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
                        "AVX-512 BF16/AMX but lost F1 in one of two CVs, see docs/results.md)")
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
        check_model_name(args.register_model)
        require_tracking(args.tracking_uri, "--register_model needs MLflow tracking")
    if args.label_overrides:
        read_label_overrides(args.label_overrides)  # the file's own faults, before any work


# --------------------------------------------------------------------------- data
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
    train_idx, val_idx = data.keep_recorded_split(samples, train_idx, val_idx, recorded, cross_validation)
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
                data.recorded_split(samples, train_idx, val_idx))


# --------------------------------------------------------------------------- optimisation
def build_optimisation(args: argparse.Namespace, model: nn.Module, task: Task, train_targets: np.ndarray,
                       steps_per_epoch: int, device: torch.device, amp: bool) -> Optimisation:
    weights = None
    if args.class_weights == "auto":
        weights = [class_weights_from_labels(labels, n).to(device)
                   for labels, n in zip(task.head_labels(train_targets), task.head_classes())]
        weights = tuple(weights) if task.multihead else weights[0]
    criterion = loss.criterion_for(task, args.criterion, class_weights=weights, age_bins=tuple(args.age_bins),
                                   smoothing=args.smoothing, gamma=args.focal_gamma, head_weights=tuple(args.head_weights))
    params = zoo.trainable_parameters(model)
    optimizer = getattr(torch.optim, args.optimizer)(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args.scheduler, args.lr, args.epochs, steps_per_epoch, args.warmup_epochs,
                               args.lr_decay_step)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and runtime.amp_dtype(device) == torch.float16)
    ema = ModelEma(model, args.ema) if args.ema > 0 else None
    return Optimisation(criterion, optimizer, scheduler, scaler, ema, params, args.accum_steps, args.clip_grad,
                        args.mixup, args.cutmix, per_step_scheduler=scheduler_info(args.scheduler).per_step)


# --------------------------------------------------------------------------- one epoch
def train_one_epoch(model: nn.Module, loader, opt: Optimisation, transform, task: Task, age_bins: Sequence[int],
                    device: torch.device, amp: bool = False, epoch: int = 0, epochs: int = 1, log_interval: int = 20,
                    world: int = 1, ema_source: nn.Module | None = None) -> dict[str, float]:
    """One pass over `loader`; returns train_loss, train_acc, lr, epoch_time, train_images(_per_s),
    summed over all processes. `model` is what runs forward (DDP / compiled); `ema_source` the
    plain module the EMA follows (default `model`)."""
    dtype = runtime.amp_dtype(device)
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


@torch.inference_mode()
def validate(model: nn.Module, loader, criterion: nn.Module, transform, task: Task, age_bins: Sequence[int],
             device: torch.device, order: Sequence[int] | None = None, amp: bool = False, world: int = 1) -> Validation:
    """Score this rank's shard (rows `order` of the dataset), gather every shard, restore dataset order."""
    model.eval()
    if world > 1:  # BatchNorm running stats drift apart (each rank sees its own batches):
        for buffer in model.buffers():  # score with rank 0's copy, the one that gets saved
            dist.broadcast(buffer, src=0)
    logits_all, loss_sum = [], 0.0
    with torch.autocast(device.type, dtype=runtime.amp_dtype(device), enabled=amp):
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


# --------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace, s: Settings, device: torch.device, pretrained: bool) -> nn.Module:
    """The network, on the device, in the run's memory format: what is saved and what the EMA follows."""
    model = zoo.create_model(args.model, s.task.num_classes, pretrained=pretrained, multihead=s.task.head_sizes or False,
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
    s = resolve_settings(args, device, world, str(DEMO_DIR / "train"))
    if s.reuse_memory:  # before the loaders fork their workers; what config.json records is what took effect
        s.reuse_memory = runtime.reuse_freed_memory()
    if resumed:
        check_resumable(resumed, args.model, s.model_options, s.task, s.resize, args.resume, args.face_crop)
        if resumed["epoch"] + 1 >= args.epochs and parent is None:  # nothing to train: leave the run as it is
            raise UsageError(f"nothing to resume: {args.resume} holds epoch {resumed['epoch'] + 1} of "
                             f"{args.epochs} (--epochs); give a larger --epochs to train on")
    run_dir = Path(broadcast(str(Path(args.resume).parent if args.resume else free_run_dir(args.model_dir, args.name)),
                             world))
    tracker = start_tracking(args, s, run_dir, resumed, parent)
    task, epoch, saved_epoch, metrics = s.task, -1, -1, {}
    best = new_best()
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
                args=vars(args), resolved=s.to_dict(), age_cuts=s.score_age_bins, label_overrides=d.label_overrides),
                best)
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
                        val_metrics = report_validation(val, truth, task, s.score_age_bins, epoch, saver) if is_main() else {}
                        scored, saver.improved, val_metrics = broadcast((best, saver.improved, val_metrics), world)
                        best.update(scored)  # every rank decides alike
                        metrics.update(val_metrics)
                        if is_main():
                            saver.save_best(eval_model.state_dict(), epoch, metrics)
                        if is_main() and "best_f1.pth" in saver.improved:
                            write_validation_outputs(run_dir, val, truth, d.val_set, task, s.score_age_bins, tracker,
                                                     writer, epoch, face_crops=d.located is not None)
                        if opt.scheduler is not None and not opt.per_step_scheduler:
                            opt.scheduler.step(metrics["val_f1"])
                    if is_main():
                        resume = {**opt.resume_state(), "state_dict_train": model.state_dict(), "rng": rng_state(),
                                  "split": d.split,
                                  "tracking": {"uri": tracker.uri, "run_id": tracker.run_id,
                                               "parent_run_id": parent.run_id if parent is not None else None}}
                        saver.save_last(eval_model.state_dict(), epoch, metrics, resume)
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
    s = resolve_settings(args, device, world, str(DEMO_DIR / "train"))
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
    summary = summarise_folds([parent_dir / f"fold{fold}" for fold in range(args.kfold)], s.task)
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


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.dist_timeout)
    if not args.data_dir:
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
