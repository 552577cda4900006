"""DataLoaders: the worker count by core count, collation, quiet workers, setup and shutdown."""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate


def default_num_workers(cpu_training: bool = False, cached: bool = False) -> int:
    """The DataLoader worker count when none is asked for (training, inference and bench.py ask here). One
    worker per core beyond the main process's, at most 8 (more rarely helps). None when the
    model trains on a CPU of 2 cores or fewer: there a worker takes a core from the model's threads,
    and bench.py's training loop decoding every image ran 25-26 img/s with no worker against 19-21
    with one (ResNet18 224x224, 2 cores; 22 against 13 before this toolkit's faster decoding). None with
    `cached` images (train.py --cache): nothing is decoded after the first epoch, so a worker only adds IPC."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cached or (cpu_training and cores <= 2):
        return 0
    return max(0, min(8, cores - 1))


def collate(batch: list):
    """`default_collate`, with a fast path for the datasets' (uint8 CHW view of an HWC image, ...)
    samples: OpenCV de-interleaves each image straight into the batch, where torch.stack would
    copy the strided views element by element (~10x slower; it dominated a warm epoch)."""
    first = batch[0] if batch else None
    if not (isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor)):
        return default_collate(batch)
    images = [sample[0] for sample in batch]
    if not all(img.dtype == torch.uint8 and img.dim() == 3 and img.shape == images[0].shape
               and img.shape[0] in (1, 3, 4) and img.permute(1, 2, 0).is_contiguous() for img in images):
        return default_collate(batch)
    shape = (len(images), *images[0].shape)
    if torch.utils.data.get_worker_info() is not None:
        # as default_collate does: build the batch in shared memory, saving a copy on the way out
        storage = images[0]._typed_storage()._new_shared(int(np.prod(shape)), device=images[0].device)
        out = images[0].new(storage).resize_(shape)
    else:
        out = torch.empty(shape, dtype=torch.uint8)
    planes = out.numpy()
    for k, img in enumerate(images):
        cv2.split(img.permute(1, 2, 0).numpy(), list(planes[k]))
    rest = default_collate([tuple(sample[1:]) for sample in batch])
    return [out, *rest]


def _worker_excepthook(exc_type, exc, tb) -> None:
    # A batch's file descriptor is handed over by a thread of the worker (multiprocessing's
    # resource_sharer), which reports errors through sys.excepthook: when the main process stops
    # mid-handover, that is a "Connection reset by peer" traceback about nothing the user can fix.
    if issubclass(exc_type, (ConnectionError, EOFError)):
        return
    sys.__excepthook__(exc_type, exc, tb)


class QuietWorker:
    """DataLoader worker_init_fn: the worker ignores SIGTERM and SIGINT, then runs `then` (if any).

    A scheduler (`scancel`, `timeout`, `kill -- -PGID`) or Ctrl-C signals the whole process group.
    Killed first, the workers would end the run in "DataLoader worker (pid ...) is killed by
    signal" tracebacks; ignoring the signal leaves the stop to the main process, which shuts
    its loaders down cleanly (workers also exit by themselves once the main process is gone).
    Connection errors of the worker's batch-handover thread, which only happen when the main
    process stops mid-transfer, are not printed either. A class rather than a closure so it
    pickles for the spawn start method.
    """

    def __init__(self, then: Callable[[int], None] | None = None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.excepthook = _worker_excepthook
        if self.then is not None:
            self.then(worker_id)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0,
                sampler=None, pin_memory: bool = False, seed: int | None = None,
                worker_init_fn: Callable[[int], None] | None = None) -> DataLoader:
    """The toolkit's DataLoader: persistent workers that leave termination signals to the main
    process (QuietWorker, chained with `worker_init_fn`), the fast uint8 `collate`."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, generator=generator, collate_fn=collate,
                      worker_init_fn=QuietWorker(worker_init_fn) if num_workers > 0 else worker_init_fn,
                      prefetch_factor=4 if num_workers > 0 else None)


def close_loaders(*loaders: DataLoader | None) -> None:
    """Shut the persistent workers of `make_loader` loaders down now (None is skipped).

    Left to the garbage collector they may outlive the run: an interrupt's traceback holds the
    loaders in a reference cycle, and at interpreter exit multiprocessing stops its children with
    SIGTERM, which these workers ignore (QuietWorker), then joins them forever. Shutting down is
    what DataLoader's own iterator does when freed; the loader starts new workers if used again.
    """
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None
