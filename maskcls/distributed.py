"""Processes under torchrun: set-up, rank 0's value on every rank, logging from rank 0 only, and the random
state a run saves and --resume restores."""
from __future__ import annotations

import datetime
import os
import random
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
# Imported where used, being heavy or optional: tqdm (only on a terminal).


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
