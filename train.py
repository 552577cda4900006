"""Train a mask / gender / age classifier.

    python train.py                                   # synthetic demo data, small CNN
    python train.py --data_dir /data/train --model EfficientNetLite0 --resize 128 128
    torchrun --nproc_per_node 4 train.py ...          # DistributedDataParallel, same flags

Reads top to bottom: arguments, data, model, optimisation, the epoch loop (train,
validate, checkpoint, track). Outputs go to <model_dir>/<name>[N]/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dataset as data
from checkpoint import atomic_save, atomic_write_text, load_checkpoint

DEMO_DIR = Path("data/demo")


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes", "y", "on"):
        return True
    if value.lower() in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def optional_bool(value: str) -> bool | None:
    return None if value.lower() in ("auto", "none") else str2bool(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default=env("SM_CHANNEL_TRAIN"),
                   help="training set: train/ or train/images (default $SM_CHANNEL_TRAIN; if unset, synthetic demo "
                        f"data generated once under ./{DEMO_DIR})")
    g.add_argument("--model_dir", default=env("SM_MODEL_DIR", "./model"), help="where run folders go (default $SM_MODEL_DIR or ./model)")
    g.add_argument("--dataset", default="MaskSplitByProfileDataset", help=f"split/label scheme: {', '.join(data.DATASETS)}")
    g.add_argument("--task", default=None, choices=list(data.TASK_CLASSES),
                   help="labels to learn: all (18), mask (3), genderage (6), multi (three heads); default from --dataset")
    g.add_argument("--augmentation", default="BaseAugmentation", help=f"one of {', '.join(data.AUGMENTATIONS)}")
    g.add_argument("--resize", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="input height and width (default: the model's documented size)")
    g.add_argument("--age_bins", nargs=2, type=int, default=list(data.DEFAULT_AGE_BINS), metavar=("A", "B"),
                   help="age cut points: <A, A..B-1, >=B (default 30 60); labels come from raw ages")
    g.add_argument("--score_age_bins", nargs=2, type=int, default=None, metavar=("A", "B"),
                   help="cut points of the validation labels (default: --age_bins). E.g. train with --age_bins 30 58 "
                        "but score with 30 60 as the competition does; splits are stratified with these")
    g.add_argument("--val_ratio", type=float, default=0.2, help="share of people (or images) held out (default 0.2)")
    g.add_argument("--kfold", type=int, default=0, help="K for person-level K-fold (0 = off); use with --fold")
    g.add_argument("--fold", type=int, default=0, help="which fold (0..K-1) is validation")
    g.add_argument("--mode", choices=["split", "all"], default="split", help="split: train/val; all: train on every image, no validation")
    g.add_argument("--sampler", choices=["none", "weighted"], default="none", help="weighted: sample classes by inverse frequency")
    g.add_argument("--cache", type=str2bool, default=False, help="decode+resize each image once into a uint8 memmap reused across epochs and runs")
    g.add_argument("--cache_dir", default=None, help="where the cache lives (default ~/.cache/mask-toolkit)")
    g.add_argument("--num_workers", type=int, default=data.default_num_workers(), help="DataLoader workers (default from the CPU count)")
    g.add_argument("--skip_bad_images", type=str2bool, default=False, nargs="?", const=True,
                   help="warn about and drop unreadable/truncated images instead of stopping")
    g = p.add_argument_group("model and loss")
    g.add_argument("--model", default="SmallCNN",
                   help="a model.py name (SmallCNN, BaseModel, ResNet18, EfficientNetLite0, ...) or timm:<name> (default SmallCNN)")
    g.add_argument("--pretrained", type=str2bool, default=True, help="ImageNet weights where the model has them (default True)")
    g.add_argument("--criterion", default="cross_entropy", help="cross_entropy, focal, label_smoothing, f1")
    g.add_argument("--smoothing", type=float, default=0.1, help="label_smoothing strength (default 0.1)")
    g.add_argument("--focal_gamma", type=float, default=2.0, help="focal loss gamma (default 2)")
    g.add_argument("--head_weights", nargs=3, type=float, default=[1.0, 1.0, 1.0], metavar=("MASK", "GENDER", "AGE"),
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
    g.add_argument("--scheduler", choices=["none", "step", "cosine", "plateau", "onecycle"], default="onecycle", help="LR schedule (default onecycle)")
    g.add_argument("--lr_decay_step", type=int, default=20, help="step scheduler: epochs between x0.5 decays")
    g.add_argument("--warmup_epochs", type=float, default=0.0, help="linear warm-up (step/cosine)")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off); with --mixup, one of the two per batch")
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights, e.g. 0.999 (0 = off); validation uses the EMA")
    g.add_argument("--accum_steps", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--clip_grad", type=float, default=0.0, help="clip the gradient norm (0 = off)")
    g.add_argument("--early_stopping", type=int, default=0, help="stop after N epochs without a better val F1 (0 = off)")
    g.add_argument("--resume", default=None, help="continue from a last.pth")
    g.add_argument("--amp", type=optional_bool, default=None, help="mixed precision (default: on with CUDA, off on CPU)")
    g.add_argument("--channels_last", type=optional_bool, default=None, help="NHWC memory format (default: on with CUDA)")
    g.add_argument("--compile", type=str2bool, default=False, help="torch.compile the model")
    g.add_argument("--sync_bn", type=str2bool, default=False, help="SyncBatchNorm under torchrun")
    g.add_argument("--dist_timeout", type=int, default=600, help="seconds before a stuck distributed op aborts")
    g = p.add_argument_group("logging")
    g.add_argument("--name", default="exp", help="run folder name; a number is appended if it exists")
    g.add_argument("--log_interval", type=int, default=20, help="batches between training log lines")
    g.add_argument("--user", default=os.environ.get("USER"), help="recorded as the MLflow tag 'user'")
    g.add_argument("--experiment", default="mask-classification", help="MLflow experiment name")
    g.add_argument("--tracking_uri", default=None,
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db); 'none' disables")
    return p


# --------------------------------------------------------------------------- helpers
class UsageError(Exception):
    """A bad flag or an unusable setting; reported as one line with exit code 2."""


def log(*args) -> None:
    if is_main():
        print(*args, flush=True)


def is_main() -> bool:
    """Rank 0 under torchrun, else True. Read from torchrun's env, not dist.get_rank(), so it
    stays right after destroy_process_group (otherwise every rank would print the summary)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    return int(os.environ.get("RANK", "0")) == 0


def setup_distributed(args) -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.dist_timeout))
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def unique_dir(model_dir: str, name: str) -> Path:
    """<model_dir>/<name>, or <name>2, <name>3, ... if taken (never overwrite a run)."""
    base = Path(model_dir) / name
    path, n = base, 2
    while path.exists():
        path, n = base.with_name(f"{name}{n}"), n + 1
    path.mkdir(parents=True)
    return path


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


def mix_batch(images: torch.Tensor, targets: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix on the device batch; returns (images, targets_a, targets_b, lam)."""
    use_cutmix = args.cutmix > 0 and (args.mixup <= 0 or random.random() < 0.5)
    alpha = args.cutmix if use_cutmix else args.mixup
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


def make_scheduler(optimizer, args, steps_per_epoch: int):
    """Stepped once per optimizer step (plateau: once per epoch on val F1)."""
    total = max(1, args.epochs * steps_per_epoch)
    warmup = int(args.warmup_epochs * steps_per_epoch)
    if args.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total,
                                                   pct_start=max(warmup / total, 0.05) if warmup else 0.3)
    if args.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
    if args.scheduler == "none":
        return None
    if args.scheduler == "step":
        step = args.lr_decay_step * steps_per_epoch
        main = lambda s: 0.5 ** (s // step)  # noqa: E731
    else:  # cosine
        main = lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup))))  # noqa: E731
    # LambdaLR keeps no function in its state dict, so checkpoints stay weights_only-loadable.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else main(s))


def amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from loss import class_weights_from_labels, compute_loss, create_criterion, mixed_loss
    from metrics import class_names, evaluate_predictions, per_class_table, save_confusion_matrix_png, write_per_class_csv
    from model import (HEAD_SIZES, PretrainedUnavailable, check_pretrained, create_model, logits_to_probs, model_info,
                       size_options, trainable_parameters)
    from tracking import Tracker, TrackingError, resolve_tracking_uri

    try:  # unknown names fail here, listing the known ones, before any work
        spec = data.dataset_spec(args.dataset)
        augmentation = data.create_augmentation(args.augmentation)
        info = model_info(args.model)
        model_options = size_options(args.model, tuple(args.resize or info.input_size))
        if args.pretrained and not args.resume:
            check_pretrained(args.model)  # offline without cached weights: fail now, not after data setup
    except (ValueError, PretrainedUnavailable) as e:
        raise UsageError(str(e)) from None
    if not args.age_bins[0] < args.age_bins[1]:
        raise UsageError(f"--age_bins must be increasing, got {args.age_bins}")
    rank, world, device = setup_distributed(args)
    cuda = device.type == "cuda"
    args.amp = cuda if args.amp is None else args.amp
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    args.age_bins = tuple(args.age_bins)
    args.score_age_bins = tuple(args.score_age_bins or args.age_bins)
    task = args.task or spec["task"]
    num_classes = data.TASK_CLASSES[task]  # 18 for multi: the heads combine into the 18 classes
    resize = tuple(args.resize) if args.resize else tuple(info.input_size)
    args.resize = list(resize)

    resumed = None
    if args.resume:
        resumed = load_checkpoint(args.resume)
        if "optimizer" not in resumed:
            raise UsageError(f"--resume needs a last.pth (with optimizer state): {args.resume}")

    if not args.data_dir:
        from demo_data import ensure_demo_data
        if is_main():
            ensure_demo_data(DEMO_DIR)
        if world > 1:
            dist.barrier()
        args.data_dir = str(DEMO_DIR / "train")
        log(f"no --data_dir or $SM_CHANNEL_TRAIN: training on synthetic demo data in {args.data_dir}")

    # Tracking first: an unreachable server stops the run before any work is done.
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    config.update(task=task, world_size=world, global_batch=args.batch_size * world * args.accum_steps)
    tracker = Tracker(resolve_tracking_uri(args.tracking_uri), args.experiment, args.name, args.user, enabled=is_main())
    try:
        saved = (resumed or {}).get("tracking") or {}
        tracker.start(config, resume_run_id=saved.get("run_id") if saved.get("uri") == tracker.uri else None)
    except TrackingError as e:
        raise UsageError(str(e)) from None
    seed_everything(args.seed + rank)  # distinct dropout/mixup draws per process; data order is seeded apart
    try:
        # ---- data
        samples = data.discover(args.data_dir, skip_bad_images=args.skip_bad_images, age_bins=args.age_bins,
                                verbose=is_main())
        if args.mode == "all":
            train_idx, val_idx = list(range(len(samples))), []
        else:
            train_idx, val_idx = data.split_indices(samples, args.dataset, args.val_ratio, args.seed, args.score_age_bins,
                                                    args.kfold, args.fold)
            if not val_idx:
                raise UsageError("the validation split is empty; raise --val_ratio or use --mode all")
        log(f"split: {len(train_idx)} train / {len(val_idx)} validation images "
            f"({len({samples[i].person for i in train_idx})} / {len({samples[i].person for i in val_idx})} people)")
        store = data.ImageStore([s.path for s in samples], resize, augmentation.crop,
                                (args.cache_dir or data.default_cache_dir()) if args.cache else None)
        if args.cache:
            log(f"image cache: {'warm, no decoding' if store.is_complete() else 'cold, filled during the first epoch'} "
                f"({store.cache_files[0]})")
        train_set = data.MaskDataset(samples, store, train_idx, task, args.age_bins, augmentation, train=True, seed=args.seed)
        val_set = data.MaskDataset(samples, store, val_idx, task, args.score_age_bins, train=False)
        train_labels = np.array(train_set.targets)  # [N], or [N, 3] head labels for multi
        sampler_weights = None
        if args.sampler == "weighted":
            label_for_sampling = np.array(train_set.labels18()) if task == "multi" else train_labels
            counts = np.bincount(label_for_sampling, minlength=18)
            sampler_weights = torch.tensor(1.0 / counts[label_for_sampling], dtype=torch.double)
        sampler = EpochSampler(len(train_set), args.seed, sampler_weights, rank, world)
        train_loader = data.make_loader(train_set, args.batch_size, sampler=sampler, num_workers=args.num_workers,
                                        pin_memory=cuda)
        val_sampler = list(range(rank, len(val_set), world))  # exact shards: no padding, nothing dropped
        val_loader = data.make_loader(val_set, args.valid_batch_size, sampler=val_sampler, num_workers=args.num_workers,
                                      pin_memory=cuda) if val_idx else None

        # ---- model, loss, optimiser
        mean, std = info.mean, info.std
        model = create_model(args.model, num_classes,
                             pretrained=args.pretrained and not resumed, multihead=task == "multi",
                             **model_options).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        transform = data.BatchTransform(mean, std, augmentation.jitter, augmentation.noise_std, args.channels_last)
        if args.class_weights == "auto":
            if task == "multi":
                weights = tuple(class_weights_from_labels(train_labels[:, i], n).to(device) for i, n in enumerate(HEAD_SIZES))
            else:
                weights = class_weights_from_labels(train_labels, num_classes).to(device)
        else:
            weights = None
        criterion = create_criterion(args.criterion, num_classes, task=task,
                                     class_weights=weights, smoothing=args.smoothing, gamma=args.focal_gamma,
                                     head_weights=tuple(args.head_weights))
        params = trainable_parameters(model)
        try:
            optimizer = getattr(torch.optim, args.optimizer)(params, lr=args.lr, weight_decay=args.weight_decay)
        except AttributeError:
            raise UsageError(f"unknown --optimizer {args.optimizer!r} (a torch.optim class, e.g. SGD, Adam, AdamW)") from None
        steps_per_epoch = math.ceil(len(train_loader) / args.accum_steps)
        scheduler = make_scheduler(optimizer, args, steps_per_epoch)
        dtype = amp_dtype(device)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp and dtype == torch.float16)
        ema = None
        if args.ema > 0:
            ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema),
                                                      use_buffers=True)
        if world > 1:
            if args.sync_bn and not cuda:  # SyncBatchNorm has no CPU kernel: it would fail at the first batch
                log("warning: --sync_bn needs CUDA; training with per-process BatchNorm on CPU")
            elif args.sync_bn:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        else:
            ddp_model = model
        forward_model = torch.compile(ddp_model) if args.compile else ddp_model

        start_epoch, best = 0, {"acc": -1.0, "f1": -1.0, "epoch": -1, "stale": 0}
        if resumed:
            model.load_state_dict(resumed["state_dict_train"] if "state_dict_train" in resumed else resumed["state_dict"])
            optimizer.load_state_dict(resumed["optimizer"])
            if scheduler is not None and resumed.get("scheduler"):
                if args.scheduler == "plateau":
                    scheduler.load_state_dict(resumed["scheduler"])
                else:  # a function of the step: keep this run's length (--epochs, processes may have changed)
                    scheduler.last_epoch = (resumed["epoch"] + 1) * steps_per_epoch
            if resumed.get("scaler"):
                scaler.load_state_dict(resumed["scaler"])
            if ema is not None and resumed.get("ema"):
                ema.load_state_dict(resumed["ema"])
            set_rng_state(resumed["rng"])
            best = dict(resumed["best"])
            start_epoch = resumed["epoch"] + 1
            run_dir = Path(args.resume).parent
            log(f"resuming from {args.resume} at epoch {start_epoch + 1}")
        else:
            run_dir = None
        if is_main() and run_dir is None:
            run_dir = unique_dir(args.model_dir, args.name)
        if world > 1:
            holder = [str(run_dir) if run_dir else None]
            dist.broadcast_object_list(holder, src=0)
            run_dir = Path(holder[0])
        config["run_dir"] = str(run_dir)
        writer = None
        if is_main():
            atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2))
            tracker.log_artifact(run_dir / "config.json")
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(run_dir)
            n_params = sum(p.numel() for p in model.parameters())
            log(f"model {args.model} ({n_params / 1e6:.2f}M parameters, {sum(p.numel() for p in params) / 1e6:.2f}M trainable), "
                f"task {task} ({num_classes} classes), input {resize[0]}x{resize[1]}, device {device}, "
                f"{world} process(es), global batch {config['global_batch']}, amp {args.amp}, channels_last {args.channels_last}")
            log(f"outputs: {run_dir}")

        names = class_names(task, args.age_bins)
        metadata = {
            "format": "mask-toolkit/1",
            "model": {"name": args.model, "num_classes": num_classes, "multihead": task == "multi",
                      "options": model_options},
            "task": task, "classes": names, "age_bins": list(args.age_bins),
            "preprocess": {"resize": list(resize), "crop": list(augmentation.crop) if augmentation.crop else None,
                           "mean": list(mean), "std": list(std)},
            "class_offsets": None, "args": config,
        }

        def eval_model() -> nn.Module:
            return ema.module if ema is not None else model

        def save(filename: str, epoch: int, metrics: dict, full: bool = False) -> None:
            ckpt = dict(metadata, state_dict=eval_model().state_dict(), epoch=epoch, metrics=metrics)
            if full:  # everything --resume needs to continue exactly
                ckpt.update(state_dict_train=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict() if scheduler is not None else None,
                            scaler=scaler.state_dict(), ema=ema.state_dict() if ema is not None else None,
                            rng=rng_state(), best=best, tracking={"uri": tracker.uri, "run_id": tracker.run_id})
            atomic_save(ckpt, run_dir / filename)

        def predict_val() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
            """Score this rank's shard, gather all shards on every rank, restore dataset order."""
            net = eval_model().eval()
            if world > 1:  # BatchNorm running stats drift apart (each rank sees its own batches):
                for buffer in net.buffers():  # score with rank 0's copy, the one that gets saved
                    dist.broadcast(buffer, src=0)
            probs, loss_sum = [], 0.0
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=args.amp):
                for images, targets in progress(val_loader, "val"):
                    images = transform(images.to(device, non_blocking=True), train=False)
                    targets = targets.to(device, non_blocking=True)
                    logits = net(images).float()
                    loss_sum += float(criterion(logits, targets)) * images.shape[0]
                    probs.append(logits_to_probs(logits, task == "multi").cpu())
            probs = torch.cat(probs).numpy() if probs else np.zeros((0, num_classes))
            mine = (val_sampler, probs, loss_sum)
            if world > 1:
                gathered = [None] * world
                dist.all_gather_object(gathered, mine)
            else:
                gathered = [mine]
            order = np.concatenate([np.asarray(g[0], dtype=np.int64) for g in gathered])
            all_probs = np.concatenate([g[1] for g in gathered])[np.argsort(order)]
            loss = sum(g[2] for g in gathered) / max(1, len(order))
            truth = np.array(val_set.labels18() if task == "multi" else val_set.targets)
            return all_probs, all_probs.argmax(1), truth, loss

        def progress(loader, desc):
            if is_main() and sys.stderr.isatty():
                from tqdm import tqdm
                return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
            return loader

        interrupted = False

        def on_sigterm(signum, frame):
            raise KeyboardInterrupt

        # Only the main thread may set handlers; in-process callers (tests) get theirs back afterwards.
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
        epoch = start_epoch - 1
        saved_epoch = start_epoch - 1  # the epoch whose full state last.pth holds
        status = "FINISHED"
        metrics: dict = {}
        try:
            for epoch in range(start_epoch, args.epochs):
                sampler.set_epoch(epoch)
                train_set.set_epoch(epoch)
                ddp_model.train()
                started = time.perf_counter()
                loss_sum = correct = seen = 0
                optimizer.zero_grad(set_to_none=True)
                for step, (images, targets) in enumerate(progress(train_loader, f"epoch {epoch + 1}/{args.epochs}")):
                    images = transform(images.to(device, non_blocking=True), train=True)
                    targets = targets.to(device, non_blocking=True)
                    mixing = args.mixup > 0 or args.cutmix > 0
                    if mixing:
                        images, targets_a, targets_b, lam = mix_batch(images, targets, args)
                    with torch.autocast(device.type, dtype=dtype, enabled=args.amp):
                        output = forward_model(images)
                        loss = (mixed_loss(criterion, output, targets_a, targets_b, lam) if mixing
                                else compute_loss(criterion, output, targets))
                    scaler.scale(loss / args.accum_steps).backward()
                    last_step = step + 1 == len(train_loader)
                    if (step + 1) % args.accum_steps == 0 or last_step:
                        if args.clip_grad > 0:
                            scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        if ema is not None:
                            ema.update_parameters(model)
                        if scheduler is not None and args.scheduler != "plateau":
                            scheduler.step()
                    logits = output[0] if isinstance(output, tuple) else output
                    with torch.no_grad():
                        pred = logits_to_probs(logits.float(), task == "multi").argmax(1)
                        truth = data.encode_class(*targets.unbind(1)) if task == "multi" else targets
                        correct += int((pred == truth).sum())
                    loss_sum += float(loss.detach()) * images.shape[0]
                    seen += images.shape[0]
                    if (step + 1) % args.log_interval == 0 and not sys.stderr.isatty():
                        log(f"epoch {epoch + 1} [{step + 1}/{len(train_loader)}] loss {loss_sum / seen:.4f} "
                            f"acc {correct / seen:.2%} lr {optimizer.param_groups[0]['lr']:.2e}")
                elapsed = time.perf_counter() - started
                if args.cache and epoch == start_epoch:
                    if world > 1:
                        dist.barrier()
                    if is_main():
                        store.fill(range(len(store)))  # rows no loader touched (e.g. --mode all leaves none)
                        store.finalize()
                if world > 1:  # every rank's share, so the logged figures cover the whole epoch
                    totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
                    dist.all_reduce(totals)
                    loss_sum, correct, seen = totals[0].item(), int(totals[1].item()), int(totals[2].item())
                metrics = {"train_loss": loss_sum / max(1, seen), "train_acc": correct / max(1, seen),
                           "lr": optimizer.param_groups[0]["lr"], "epoch_time": elapsed,
                           "train_images": seen, "train_images_per_s": seen / elapsed}
                log(f"epoch {epoch + 1}/{args.epochs}: train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.2%} "
                    f"({elapsed:.1f}s, {metrics['train_images_per_s']:.0f} img/s)")

                improved_f1 = False
                if val_loader is not None:
                    probs, pred, truth, val_loss = predict_val()
                    truth18 = truth  # multi-head: already the 18-class labels
                    report_task = "all" if task == "multi" else task
                    scores = evaluate_predictions(truth18, pred, report_task)
                    metrics.update({"val_loss": val_loss, "val_acc": scores["accuracy"], "val_f1": scores["f1"]})
                    metrics.update({f"val_{k}": v for k, v in scores.items() if k.startswith("f1_")})
                    improved_acc = scores["accuracy"] > best["acc"]
                    improved_f1 = scores["f1"] > best["f1"]
                    if improved_acc:
                        best["acc"] = scores["accuracy"]
                    if improved_f1:
                        best.update(f1=scores["f1"], epoch=epoch, stale=0)
                    else:
                        best["stale"] += 1
                    if is_main():
                        log(per_class_table(truth18, pred, report_task, args.score_age_bins))
                        extra = " ".join(f"{k} {v:.4f}" for k, v in scores.items() if k.startswith("f1_"))
                        log(f"[val] epoch {epoch + 1}: acc {scores['accuracy']:.2%} loss {val_loss:.4f} "
                            f"macro F1 {scores['f1']:.4f} {extra} || best acc {best['acc']:.2%} best F1 {best['f1']:.4f}")
                        if improved_acc:
                            save("best.pth", epoch, metrics)
                        if improved_f1:
                            save("best_f1.pth", epoch, metrics)
                            save_confusion_matrix_png(run_dir / "confusion_matrix.png", truth18, pred, report_task,
                                                      args.score_age_bins)
                            write_per_class_csv(run_dir / "per_class.csv", truth18, pred, report_task, args.score_age_bins)
                            # Out-of-fold material for calibrate.py (decision offsets tuned for macro F1).
                            np.save(run_dir / "val_probs.npy", probs)
                            np.save(run_dir / "val_labels.npy", truth18)
                            tracker.log_artifact(run_dir / "confusion_matrix.png")
                            tracker.log_artifact(run_dir / "per_class.csv")
                    if scheduler is not None and args.scheduler == "plateau":
                        scheduler.step(scores["f1"])
                if is_main():
                    save("last.pth", epoch, metrics, full=True)
                    saved_epoch = epoch
                    for key, value in metrics.items():
                        writer.add_scalar(key, value, epoch)
                    writer.flush()
                    tracker.log_metrics(metrics, step=epoch)
                if args.early_stopping and val_loader is not None and best["stale"] >= args.early_stopping:
                    log(f"early stopping: no better val F1 for {args.early_stopping} epochs (best {best['f1']:.4f} "
                        f"at epoch {best['epoch'] + 1})")
                    break
        except KeyboardInterrupt:
            interrupted, status = True, "KILLED"
            # last.pth is rewritten after every epoch; a half-done epoch is not saved over it, because
            # resuming from mid-epoch weights would skip the rest of that epoch's batches.
            last = run_dir / "last.pth" if run_dir is not None else None
            if is_main() and last is not None and saved_epoch >= 0 and last.exists():
                log(f"\ninterrupted in epoch {epoch + 1}: {last} holds epoch {saved_epoch + 1}; "
                    f"continue with --resume {last}")
            elif is_main():
                log(f"\ninterrupted in epoch {epoch + 1}, before any epoch completed: nothing to resume")
        except BaseException:
            status = "FAILED"
            raise
        finally:
            if previous_sigterm is not None:
                signal.signal(signal.SIGTERM, previous_sigterm)
            if is_main():
                if writer is not None:
                    writer.close()
                tracker.finish(status)
            if world > 1 and not interrupted:
                dist.destroy_process_group()
        if is_main() and not interrupted:
            summary = f"best val macro F1 {best['f1']:.4f} (epoch {best['epoch'] + 1}), " if val_loader else ""
            log(f"done: {summary}checkpoints in {run_dir}"
                + (f"; MLflow run {tracker.run_id} at {tracker.uri}" if tracker.run_id else ""))
        return 130 if interrupted else 0
    except BaseException:
        tracker.finish("FAILED")  # idempotent; no-op when the run already ended
        raise


if __name__ == "__main__":
    from checkpoint import CheckpointError

    try:
        sys.exit(main())
    except (UsageError, data.DataError, CheckpointError) as e:
        # Bad input, not a bug: one line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
