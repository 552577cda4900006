"""Input-pipeline and model throughput, side by side, in one run.

    python bench.py                                  # 512 generated 384x512 JPEGs, 224x224, ResNet18
    python bench.py --resize 128 96 --model ResNet18
    python bench.py --data_dir /data/train --n 2000  # real photos (any folder of images)

Measures, on the same images:
- reference: the original baseline, per sample PIL decode -> torchvision Resize, RandomHorizontalFlip,
  ColorJitter(0.1, 0.1, 0.1, 0.1), ToTensor, Normalize in a DataLoader; one epoch;
- toolkit: ImageStore (decode once, uint8 memmap cache) -> MaskDataset with flip (p 0.5) and the same
  colour jitter strength on uint8 in the workers -> uint8 batch to the device -> BatchTransform (the
  normalisation, batched, on the device; its time counts). cold = the first epoch, decoding and filling
  a fresh cache; warm = later epochs; second run = a new ImageStore on the completed cache (a new
  training run), whose decode count must be 0;
- for num_workers 0 and each --num_workers value (default: 0 and maskcls.loaders.default_num_workers()).
  The ratios (toolkit / reference, "one worker") use num_workers 0 for both: one process does all the
  work, so they compare the pipelines' cost rather than how many cores the machine has;
- a real training loop (the loader feeding the default training step) for --loop_steps batches, with
  the warm cache and decoding every image, for each worker count: what train.py's --num_workers
  default rests on (no worker with --cache, cores - 1 without);
- the model (random weights, random input): a training step (forward + backward + AdamW) and
  inference for --model at --resize: fp32 contiguous, fp32 channels_last and autocast (bf16 where the
  hardware has it, else fp16 with a scaler) channels_last; the median of --train_steps steps, the
  variants taking turns. infer_eager_ips is the plain fp32 eager loop under torch.no_grad. The rows
  train.py and inference.py use by default on this device are marked (train_ips, infer_ips).
Pipelines run with one torch thread in the main process (workers always have one), so num_workers 0
is one core for both pipelines; the training loop and the model run with torch's default thread count.
Allocator: the reference runs first, as the original ran (glibc's default malloc), then, where
train.py would (--reuse_memory, on with a CPU: malloc keeps freed memory for reuse), again with that
setting (reference_reuse_ips, for comparison); then everything else runs as train.py would. The
ratios are against the first, the original as it was. The setting is process-wide and cannot be
undone, so compare the toolkit without it by a second run with --reuse_memory False.
Prints a table, then, as its last line, one JSON object with every number.

    python bench.py --serve model/exp [--clients 8 --seconds 30]   # the served model under load

serves a run's model with `mlflow models serve` on 127.0.0.1 and sends bounded concurrent requests, good
and bad, checking every answer (requests/s, p50/p99 latency, problems; last line JSON).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import dataset as data
import model as zoo
from maskcls import augment, cli, imaging, loaders, predictor, pyfunc, runtime
from maskcls.checkpoint import load_checkpoint, validation_samples
from maskcls.runtime import amp_dtype, default_amp, reuse_freed_memory, slow_amp_warning
from maskcls.task import NUM_CLASSES
from model import create_model, trainable_parameters
# Imported where used, being heavy or optional: torchvision's transforms (only the reference pipeline).

REQUIRED_KEYS = ("reference_ips", "cold_ips", "warm_ips", "cold_ratio", "warm_ratio", "train_ips", "infer_ips",
                 "infer_eager_ips", "resize", "model", "device")
JITTER = (0.1, 0.1, 0.1, 0.1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", default=None, help="images to use (searched recursively); default: generate --n")
    p.add_argument("--n", type=int, default=512, help="number of images (with --data_dir: the first n; 0 = all)")
    p.add_argument("--resize", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    p.add_argument("--model", default="ResNet18", help="a model.py registry name (random weights)")
    p.add_argument("--num_workers", type=int, nargs="+", default=None,
                   help="DataLoader worker counts to measure (0 is always added; default: 0 and the toolkit default)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--warm_epochs", type=int, default=2, help="warm epochs averaged for warm_ips")
    p.add_argument("--train_steps", type=int, default=3,
                   help="timed model steps per variant, variants taking turns (after 1 warm-up step each)")
    p.add_argument("--loop_steps", type=int, default=4,
                   help="timed batches of the training-loop comparison (cache/decode x workers; 0 = skip)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--freeze_blocks", type=int, default=0, metavar="N",
                   help="also time the fp32 channels_last train step with train.py's --freeze_blocks N (stem + first "
                        "N stages frozen; EfficientNet-style models), side by side with the others")
    p.add_argument("--reuse_memory", type=cli.optional_bool, default=None,
                   help="let malloc keep freed memory for reuse, for the whole run (default: as train.py, on with a "
                        "CPU device)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("the served model under load (instead of everything above)")
    g.add_argument("--serve", default=None, metavar="RUN_DIR",
                   help="log RUN_DIR's model to a temporary MLflow store, serve it with `mlflow models serve` on "
                        "127.0.0.1 and send --clients concurrent clients for --seconds: requests of --images good "
                        "photos (its validation images, else generated), requests with a bad image among good ones "
                        "and requests without the image column; every answer checked; prints requests/s and latency")
    g.add_argument("--clients", type=int, default=8)
    g.add_argument("--seconds", type=float, default=30.0)
    g.add_argument("--images", type=int, default=4, help="photos per request")
    return p


# --------------------------------------------------------------------------- images
def make_images(out_dir: Path, n: int, size: tuple[int, int] = (384, 512), seed: int = 0) -> list[str]:
    """n noisy drawn JPEGs of size (W, H) like the competition photos: a gradient, random shapes,
    sensor-like noise, quality 92 (noise makes them about as costly to decode as real photos)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / (w + h) + 0.5
        img = np.ascontiguousarray((a + (b - a) * t[..., None]).clip(0, 255).astype(np.uint8))
        for _ in range(int(rng.integers(5, 10))):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
            kind = rng.integers(3)
            if kind == 0:
                axes = (int(rng.integers(10, w // 2)), int(rng.integers(10, h // 2)))
                cv2.ellipse(img, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
            elif kind == 1:
                cv2.rectangle(img, (cx, cy), (cx + int(rng.integers(10, w // 2)), cy + int(rng.integers(10, h // 2))),
                              colour, -1)
            else:
                cv2.line(img, (cx, cy), (int(rng.integers(0, w)), int(rng.integers(0, h))), colour,
                         int(rng.integers(2, 12)), cv2.LINE_AA)
        noisy = img.astype(np.float32) + rng.normal(0, 6, img.shape).astype(np.float32)
        path = out_dir / f"img_{i:05d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=92)
        paths.append(str(path))
    return paths


def find_images(data_dir: str | os.PathLike, n: int) -> list[str]:
    root = Path(data_dir)
    if not root.is_dir():
        raise cli.DataError(f"--data_dir not found: {root}")
    paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in data.IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(root).parts) and p.is_file())
    if not paths:
        raise cli.DataError(f"no .jpg/.jpeg/.png images under {root}")
    return paths[:n] if n > 0 else paths


# --------------------------------------------------------------------------- pipelines
class ReferenceDataset(Dataset):
    """The original baseline: PIL opens the file, torchvision transforms it, per sample, every epoch."""

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(Image.open(self.paths[i])), 0


class CountingStore(imaging.ImageStore):
    """ImageStore that counts decodes in shared memory, so the count includes the workers'."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # one slot per image: each index is decoded by one worker at a time, so no lost updates
        self.decoded = torch.zeros(len(self.paths), dtype=torch.int32).share_memory_()

    def decode(self, index: int) -> np.ndarray:
        self.decoded[index] += 1
        return super().decode(index)

    @property
    def decodes(self) -> int:
        return int(self.decoded.sum())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_epoch(paths: Sequence[str], resize: Sequence[int], mean, std, batch_size: int, num_workers: int,
                    device: torch.device, seed: int) -> float:
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(tuple(resize), T.InterpolationMode.BILINEAR), T.RandomHorizontalFlip(),
                           T.ColorJitter(*JITTER), T.ToTensor(), T.Normalize(mean, std)])
    loader = DataLoader(ReferenceDataset(paths, transform), batch_size=batch_size, shuffle=True,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    count, start = 0, time.perf_counter()
    for images, _ in loader:  # workers start inside the epoch: the original paid that every epoch
        images = images.to(device, non_blocking=True)
        count += len(images)
    sync(device)
    return count / (time.perf_counter() - start)


def toolkit_epochs(store: imaging.ImageStore, resize: Sequence[int], mean, std, batch_size: int, num_workers: int,
                   device: torch.device, epochs: int, seed: int) -> list[float]:
    """images/s of each epoch of the toolkit's training pipeline; the cache is finalized after the first."""
    augmentation = augment.Augmentation("bench", hflip=0.5, jitter=JITTER)
    samples = [data.Sample(p, f"p{i}", "mask1", 0, 0, 20) for i, p in enumerate(store.paths)]  # labels unused
    train_set = data.MaskDataset(samples, store, range(len(samples)), "all", augmentation=augmentation, train=True,
                                 seed=seed)
    cuda = device.type == "cuda"
    transform = augment.BatchTransform(mean, std, augmentation.noise_std, channels_last=cuda)
    loader = loaders.make_loader(train_set, batch_size, shuffle=True, num_workers=num_workers, pin_memory=cuda, seed=seed)
    rates = []
    for epoch in range(epochs):
        train_set.set_epoch(epoch)
        count, start = 0, time.perf_counter()
        for images, _ in loader:
            x = transform(images.to(device, non_blocking=True), train=True)
            count += len(x)
        sync(device)
        rates.append(count / (time.perf_counter() - start))
        if epoch == 0:
            store.finalize()  # as train.py does after the first epoch
    del loader  # stops persistent workers
    return rates


def bench_pipelines(paths: list[str], args, mean, std, device: torch.device, workdir: Path,
                    reuse_memory: bool) -> tuple[dict[int, dict], bool]:
    """The pipelines' rates by worker count, and whether --reuse_memory took effect (it is switched
    on here, after the original's reference epochs, when `reuse_memory`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for p in paths:  # into the OS page cache, so no pipeline pays for the disk
            Path(p).read_bytes()
        results = {nw: {"reference_ips": reference_epoch(paths, args.resize, mean, std, args.batch_size, nw, device,
                                                         args.seed)} for nw in args.num_workers}
        reused = reuse_memory and reuse_freed_memory()
        for nw in args.num_workers:
            if reused:
                results[nw]["reference_reuse_ips"] = reference_epoch(paths, args.resize, mean, std, args.batch_size,
                                                                     nw, device, args.seed)
            cache = workdir / f"cache-w{nw}"
            store = CountingStore(paths, args.resize, None, cache_dir=cache)
            rates = toolkit_epochs(store, args.resize, mean, std, args.batch_size, nw, device,
                                   1 + max(1, args.warm_epochs), args.seed)
            second = CountingStore(paths, args.resize, None, cache_dir=cache)  # a second training run
            complete = second.is_complete()
            second_rate = toolkit_epochs(second, args.resize, mean, std, args.batch_size, nw, device, 1, args.seed)[0]
            warm = len(rates[1:]) / sum(1 / r for r in rates[1:])  # all warm images / all warm time
            results[nw].update({"cold_ips": rates[0], "warm_ips": warm, "second_run_ips": second_rate,
                                "cold_decodes": store.decodes, "second_run_decodes": second.decodes,
                                "cache_complete_before_second_run": complete})
        return results, reused
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- model
def time_interleaved(steps: dict[str, Callable[[], None]], rounds: int, device: torch.device,
                     warmup: int = 1) -> dict[str, float]:
    """Median seconds per step of each variant, the variants taking turns step by step, so a
    burst of other jobs on a shared machine hits them alike (and the median shrugs it off)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(max(1, rounds)):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# Model variants: (channels_last, autocast). The toolkit's defaults: channels_last, and autocast where
# runtime.default_amp says (CUDA only: on a CPU bf16 is faster but was not F1-safe).
TRAIN_VARIANTS = {"train_fp32_ips": (False, False), "train_fp32_channels_last_ips": (True, False),
                  "train_amp_channels_last_ips": (True, True)}
FREEZE_VARIANT = "train_fp32_channels_last_frozen_ips"  # with --freeze_blocks N: only the later stages learn
INFER_VARIANTS = {"infer_contiguous_ips": (False, False), "infer_channels_last_ips": (True, False),
                  "infer_amp_channels_last_ips": (True, True)}


def default_variant(device: torch.device, variants: dict[str, tuple[bool, bool]]) -> str:
    """The one of `variants` train.py and inference.py use by default here: channels_last, and autocast
    where runtime.default_amp says (CUDA)."""
    return next(name for name, variant in variants.items() if variant == (True, default_amp(device)))


def bench_model(args, device: torch.device) -> dict:
    b, (h, w) = args.batch_size, args.resize
    gen = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(b, 3, h, w, generator=gen).to(device)
    targets = torch.randint(0, NUM_CLASSES, (b,), generator=gen).to(device)
    dtype = amp_dtype(device)

    def build(channels_last: bool, train: bool, **options) -> tuple[torch.nn.Module, torch.Tensor]:
        torch.manual_seed(args.seed)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = create_model(args.model, NUM_CLASSES, **options).to(device).to(memory_format=fmt)
        return model.train(train), inputs.contiguous(memory_format=fmt)

    def train_step(channels_last: bool, amp: bool, **options) -> Callable[[], None]:
        model, x = build(channels_last, True, **options)
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = torch.nn.functional.cross_entropy(model(x).float(), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return step

    def infer_step(channels_last: bool, amp: bool, context: Callable) -> Callable[[], None]:
        model, x = build(channels_last, False)

        def step() -> None:
            with context(), torch.autocast(device.type, dtype=dtype, enabled=amp):
                model(x)
        return step

    train = {name: train_step(*variant) for name, variant in TRAIN_VARIANTS.items()}
    if args.freeze_blocks:
        train[FREEZE_VARIANT] = train_step(True, False, freeze_blocks=args.freeze_blocks)
    infer = {"infer_eager_ips": infer_step(False, False, torch.no_grad),  # the plain fp32 eager loop
             **{name: infer_step(*variant, torch.inference_mode) for name, variant in INFER_VARIANTS.items()}}
    out: dict = {}
    for steps in (train, infer):
        out.update({name: b / seconds for name, seconds in time_interleaved(steps, args.train_steps, device).items()})
        steps.clear()  # frees the models before the next group
    out["amp_dtype"] = str(dtype).replace("torch.", "")
    out["amp_emulated"] = slow_amp_warning(device) is not None
    out["train_default"], out["infer_default"] = default_variant(device, TRAIN_VARIANTS), default_variant(device, INFER_VARIANTS)
    out["train_ips"], out["infer_ips"] = out[out["train_default"]], out[out["infer_default"]]
    return out


def bench_loop(paths: list[str], args, mean, std, device: torch.device, workdir: Path) -> dict[str, float]:
    """A real training loop (loader + the default model step) for a few batches: with the warm cache
    or decoding every image, in the main process or in workers, at torch's thread count: the choices
    behind train.py's `--num_workers` default. images/s after one warm-up batch."""
    amp, dtype = default_amp(device), amp_dtype(device)
    augmentation = augment.Augmentation("bench", hflip=0.5, jitter=JITTER)
    samples = [data.Sample(p, f"p{i}", "mask1", 0, 0, 20) for i, p in enumerate(paths)]  # labels unused
    transform = augment.BatchTransform(mean, std, augmentation.noise_std, channels_last=True)
    results = {}
    for cached in (True, False):
        store = imaging.ImageStore(paths, args.resize, None, cache_dir=workdir / "cache-w0" if cached else None)
        for workers in args.num_workers:
            torch.manual_seed(args.seed)
            model = create_model(args.model, NUM_CLASSES).to(device).to(memory_format=torch.channels_last).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            train_set = data.MaskDataset(samples, store, range(len(samples)), "all", augmentation=augmentation,
                                         train=True, seed=args.seed)
            loader = loaders.make_loader(train_set, args.batch_size, shuffle=True, num_workers=workers,
                                      pin_memory=device.type == "cuda", seed=args.seed)
            count, start = 0, None
            for step, (images, targets) in enumerate(loader):
                if step == 1:
                    sync(device)
                    start = time.perf_counter()
                x = transform(images.to(device, non_blocking=True), train=True)
                with torch.autocast(device.type, dtype=dtype, enabled=amp):
                    loss = torch.nn.functional.cross_entropy(model(x).float(), targets.to(device))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                count += len(x) if step >= 1 else 0
                if step >= args.loop_steps:
                    break
            sync(device)
            if start is not None:  # at least two batches
                results[f"loop_{'cache' if cached else 'decode'}_w{workers}_ips"] = count / (time.perf_counter() - start)
            del loader
    return results


# --------------------------------------------------------------------------- report
def table(result: dict) -> str:
    res = result["pipeline"]
    cols = list(res)
    h, w = result["resize"]
    lines = [f"device {result['device']} | {result['n_images']} images {result['image_source']} -> {h}x{w} | "
             f"batch {result['batch_size']} | torch threads {result['torch_threads']} | reuse_memory "
             f"{result['reuse_memory']} | load average "
             f"{result['load_avg_start']} -> {result['load_avg_end']}",
             "",
             f"{'input pipeline, images/s':46s}" + "".join(f"{'workers ' + c:>12s}" for c in cols)]
    rows = [("reference  PIL + torchvision, per epoch", "reference_ips")]
    if result["reuse_memory"]:
        rows.append(("reference  the same, with --reuse_memory", "reference_reuse_ips"))
    rows += [("toolkit    cold (decode, fill the cache)", "cold_ips"),
             ("toolkit    warm (later epochs, memmap)", "warm_ips"),
             ("toolkit    second run (new store, same cache)", "second_run_ips")]
    for label, key in rows:
        lines.append(f"{label:46s}" + "".join(f"{res[c][key]:12.1f}" for c in cols))
    lines.append(f"{'decodes: cold epoch / second run':46s}"
                 + "".join(f"{str(res[c]['cold_decodes']) + ' / ' + str(res[c]['second_run_decodes']):>12s}"
                           for c in cols))
    lines.append(f"ratios toolkit / reference (default malloc), one worker (num_workers 0 for both): "
                 f"cold x{result['cold_ratio']:.2f}, warm x{result['warm_ratio']:.2f}")
    amp = f"AMP {result['amp_dtype']}" + (" (emulated)" if result.get("amp_emulated") else "")
    lines += ["", f"model {result['model']} at {h}x{w}, batch {result['batch_size']}, images/s (median step); "
                  "<- marks what train.py / inference.py use by default here"]
    labels = {"train_fp32_ips": "train step  fp32, contiguous",
              "train_fp32_channels_last_ips": "train step  fp32, channels_last",
              "train_amp_channels_last_ips": f"train step  {amp}, channels_last",
              FREEZE_VARIANT: f"train step  fp32, channels_last, --freeze_blocks {result.get('freeze_blocks')}",
              "infer_eager_ips": "inference   fp32 eager loop, no_grad (infer_eager_ips)",
              "infer_contiguous_ips": "inference   inference_mode, fp32, contiguous",
              "infer_channels_last_ips": "inference   inference_mode, fp32, channels_last",
              "infer_amp_channels_last_ips": f"inference   inference_mode, {amp}, channels_last"}
    for key, label in labels.items():
        if key not in result:  # the frozen variant, when not asked for
            continue
        mark = "  <- default" if key in (result["train_default"], result["infer_default"]) else ""
        lines.append(f"  {label:58s}{result[key]:10.1f}{mark}")
    loops = {k: v for k, v in result.items() if k.startswith("loop_")}
    if loops:
        lines += ["", f"training loop (loader + the default step), images/s; train.py's default workers: "
                      f"{result['default_workers_cache']} with --cache, {result['default_workers_decode']} without"]
        for key, value in loops.items():
            _, source, workers, _ = key.split("_")
            label = f"{'warm cache' if source == 'cache' else 'decoding every epoch'}, {workers[1:]} worker(s)"
            lines.append(f"  {label:58s}{value:10.1f}")
    return "\n".join(lines)


def _rounded(value):
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


# --------------------------------------------------------------------------- the served model under load
@dataclass
class Case:
    """One kind of request and what its answer must be: `status`, and for a 200 the `classes` of its rows,
    for a 400 a `message` fragment (the row or column at fault)."""
    name: str
    payload: dict
    status: int
    classes: list[int] | None = None
    message: str = ""

    def problem(self, status: int, body: dict) -> str | None:
        if status != self.status:
            return f"{self.name}: HTTP {status}, expected {self.status}: {str(body)[:200]}"
        if self.classes is not None and [row.get("class") for row in body.get("predictions", [])] != self.classes:
            return f"{self.name}: other classes than inference.py's"
        if self.message and self.message not in str(body.get("message", "")):
            return f"{self.name}: the message does not say {self.message!r}: {str(body)[:200]}"
        return None


def post(url: str, payload: dict, timeout: float = 120.0) -> tuple[int, dict]:
    request = urllib.request.Request(url.rstrip("/") + "/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def serve_cases(paths: Sequence[str], classes: Sequence[int]) -> list[Case]:
    """Good requests (their classes known), a bad image at row 1 among good ones, no image column."""
    encoded = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]
    garbage = base64.b64encode(b"not an image at all").decode()
    return [Case("good", {"dataframe_records": [{"image": e} for e in encoded]}, 200, list(map(int, classes))),
            Case("bad image", {"dataframe_records": [{"image": encoded[0]}, {"image": garbage}]}, 400, message="row 1"),
            Case("no image column", {"dataframe_records": [{"picture": encoded[0]}]}, 400, message="'image'")]


def serve_load(url: str, cases: Sequence[Case], clients: int = 8, seconds: float = 30.0) -> dict:
    """`clients` threads post the cases in turn (good ones twice as often) until `seconds` have passed: a
    bounded load on a local server. Returns counts, requests/s, latency percentiles, every problem seen
    (a wrong answer, a dropped connection) and whether /ping still answers afterwards."""
    order = [c for c in cases for _ in range(2 if c.status == 200 else 1)]
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    problems: list[str] = []
    counts: dict[str, int] = {c.name: 0 for c in cases}
    lock = threading.Lock()

    def client(k: int) -> None:
        i = k
        while time.monotonic() < deadline:
            case = order[i % len(order)]
            i += 1
            start = time.perf_counter()
            try:
                status, body = post(url, case.payload)
                problem = case.problem(status, body)
            except (OSError, ValueError) as e:  # refused, reset, timed out, not JSON: a dropped answer
                problem = f"{case.name}: {e.__class__.__name__}: {e}"
            with lock:
                latencies.append(time.perf_counter() - start)
                counts[case.name] += 1
                if problem:
                    problems.append(problem)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/ping", timeout=10) as response:
            alive = response.status == 200
    except OSError:
        alive = False
    ms = np.array(latencies) * 1000
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(latencies), "by_case": counts,
            "requests_per_s": round(len(latencies) / elapsed, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
            "problems": problems, "alive_after": alive}


def serve_bench(args: argparse.Namespace) -> dict:
    """--serve RUN_DIR: the run's model logged to a temporary sqlite store, served on a free 127.0.0.1 port
    (its own process group, stopped by its pid), loaded by `serve_load`."""
    run_dir = Path(args.serve)
    ckpt = load_checkpoint(pyfunc.model_checkpoints([run_dir])[0])
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        listed = [r["path"] for r in validation_samples(run_dir, ckpt) if os.path.isfile(r.get("path") or "")]
        paths = listed[:args.images] or make_images(tmp / "images", args.images, seed=args.seed)
        classes = predictor.soft_vote([str(run_dir)], "best_f1", paths, verbose=False, progress=False)[1]
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        with contextlib.redirect_stdout(sys.stderr):
            model_uri = pyfunc.log_model_for(run_dir, tracking_uri=uri, experiment="bench-serve")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        with open(tmp / "serve.log", "wb") as log:
            server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                                       "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                      cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise cli.ToolkitError(f"mlflow models serve did not start: {(tmp / 'serve.log').read_text()[-500:]}")
                try:
                    with urllib.request.urlopen(url + "/ping", timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
            print(f"serving {run_dir} at {url}: {args.clients} clients for {args.seconds:g} s ...", file=sys.stderr)
            result = serve_load(url, serve_cases(paths, classes), args.clients, args.seconds)
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(server.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(timeout=10)
    result.update(run_dir=str(run_dir), url=url, images_per_request=len(paths), model=ckpt["model"]["name"])
    print(f"{result['requests']} requests in {result['seconds']} s from {result['clients']} clients "
          f"({result['by_case']}): {result['requests_per_s']} requests/s, latency p50 {result['p50_ms']} ms, "
          f"p99 {result['p99_ms']} ms; problems: {len(result['problems'])}; answering afterwards: {result['alive_after']}")
    for problem in result["problems"][:10]:
        print(f"  {problem}")
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.serve:
        cli.positive_int(args.clients, "--clients")
        cli.positive(args.seconds, "--seconds")
        cli.positive_int(args.images, "--images")
        return serve_bench(args)
    # every flag checked before any work, one line each
    cli.non_negative(args.n, "--n")
    if not args.n and not args.data_dir:  # 0 means "all of --data_dir"; there is no "all" to generate
        raise cli.UsageError("--n 0 (every image) needs --data_dir; to generate images give --n >= 1")
    cli.positive_int(args.batch_size, "--batch_size")
    cli.non_negative(args.warm_epochs, "--warm_epochs")  # 0 still measures one warm epoch
    cli.non_negative(args.train_steps, "--train_steps")  # 0 still times one step
    cli.non_negative(args.loop_steps, "--loop_steps")
    for size in args.resize:
        cli.positive_int(size, "--resize")
    for nw in args.num_workers or ():
        cli.non_negative(nw, "--num_workers")

    try:
        device = runtime.resolve_device(args.device)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    workers = args.num_workers if args.num_workers is not None else [loaders.default_num_workers()]
    args.num_workers = sorted({0, *(int(nw) for nw in workers)})
    if not args.model.startswith(zoo.TIMM_PREFIX):  # a typo: one line with the known names, before any work
        args.model = cli.choose(args.model, zoo.MODELS, "--model")
    info = zoo.model_info(args.model)
    try:
        zoo.regularization_options(args.model, freeze_blocks=args.freeze_blocks)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        if args.data_dir:
            paths, source = find_images(args.data_dir, args.n), f"from {args.data_dir}"
        else:
            print(f"generating {args.n} 384x512 JPEGs ...", file=sys.stderr)
            paths, source = make_images(workdir / "images", args.n, seed=args.seed), "generated 384x512 JPEG"
        print("input pipelines ...", file=sys.stderr)
        reuse_memory = runtime.default_reuse_memory(device) if args.reuse_memory is None else args.reuse_memory
        pipeline, reuse_memory = bench_pipelines(paths, args, info.mean, info.std, device, workdir, reuse_memory)
        print("training loop ...", file=sys.stderr)
        loop = bench_loop(paths, args, info.mean, info.std, device, workdir) if args.loop_steps else {}
    print("model ...", file=sys.stderr)
    model_result = bench_model(args, device)
    one = pipeline[0]
    result = {
        "reference_ips": one["reference_ips"], "cold_ips": one["cold_ips"], "warm_ips": one["warm_ips"],
        "cold_ratio": one["cold_ips"] / one["reference_ips"], "warm_ratio": one["warm_ips"] / one["reference_ips"],
        "ratio_num_workers": 0, "reference_reuse_ips": one.get("reference_reuse_ips"),
        "second_run_ips": one["second_run_ips"],
        "second_run_decodes": one["second_run_decodes"],
        **model_result, **loop,
        "default_workers_cache": loaders.default_num_workers(cached=True),
        "default_workers_decode": loaders.default_num_workers(cpu_training=device.type == "cpu"),
        "resize": list(args.resize), "model": args.model, "freeze_blocks": args.freeze_blocks, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "n_images": len(paths), "image_source": source,
        "batch_size": args.batch_size, "reuse_memory": reuse_memory, "pipeline": {str(k): v for k, v in pipeline.items()},
        "load_avg_start": load_start, "load_avg_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(table(result))
    print(json.dumps(_rounded(result)))
    return result


def _cli() -> int:
    main()
    return 0


if __name__ == "__main__":
    cli.run(_cli)
