"""Learning-rate schedules, one registry: a new schedule is one decorated function here, and train.py's
--scheduler choices, its stepping (per optimizer step or per epoch on validation F1) and --resume follow."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Schedule:
    """What a schedule is built from: the peak learning rate and the run's length in optimizer steps."""

    lr: float
    epochs: int
    steps_per_epoch: int
    warmup_epochs: float = 0.0
    decay_step_epochs: int = 20  # `step`: epochs between x0.5 decays

    @property
    def total(self) -> int:
        return max(1, self.epochs * self.steps_per_epoch)

    @property
    def warmup(self) -> int:
        return int(self.warmup_epochs * self.steps_per_epoch)


@dataclass(frozen=True)
class SchedulerInfo:
    name: str
    build: Callable[[torch.optim.Optimizer, Schedule], object | None]
    # True: stepped after every optimizer step, a function of the step (so --resume sets the step, and a
    # longer --epochs stretches it); False: stepped once an epoch with the validation F1 (its state is resumed).
    per_step: bool = True


SCHEDULERS: dict[str, SchedulerInfo] = {}


def register_scheduler(name: str, per_step: bool = True) -> Callable:
    def add(build: Callable) -> Callable:
        SCHEDULERS[name] = SchedulerInfo(name, build, per_step)
        return build
    return add


def scheduler_info(name: str) -> SchedulerInfo:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, lr: float, epochs: int, steps_per_epoch: int,
                   warmup_epochs: float = 0.0, decay_step_epochs: int = 20):
    """Schedule `name` for `optimizer` (None for `none`); step it as `scheduler_info(name).per_step` says."""
    return scheduler_info(name).build(optimizer, Schedule(lr, epochs, steps_per_epoch, warmup_epochs, decay_step_epochs))


def _warmed(optimizer: torch.optim.Optimizer, s: Schedule, main: Callable[[int], float]):
    # LambdaLR keeps no function in its state dict, so checkpoints stay weights_only-loadable.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / s.warmup if step < s.warmup
                                             else main(step))


@register_scheduler("none")
def _none(optimizer: torch.optim.Optimizer, s: Schedule) -> None:
    return None


@register_scheduler("step")
def _step(optimizer: torch.optim.Optimizer, s: Schedule):
    step = s.decay_step_epochs * s.steps_per_epoch
    return _warmed(optimizer, s, lambda t: 0.5 ** (t // step))


@register_scheduler("cosine")
def _cosine(optimizer: torch.optim.Optimizer, s: Schedule):
    return _warmed(optimizer, s, lambda t: 0.5 * (1 + math.cos(math.pi * min(1.0, (t - s.warmup)
                                                                             / max(1, s.total - s.warmup)))))


@register_scheduler("plateau", per_step=False)
def _plateau(optimizer: torch.optim.Optimizer, s: Schedule):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)


@register_scheduler("onecycle")
def _onecycle(optimizer: torch.optim.Optimizer, s: Schedule):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.lr, total_steps=s.total,
                                               pct_start=max(s.warmup / s.total, 0.05) if s.warmup else 0.3)
