"""`Optimisation`: everything that changes the weights (criterion, optimizer, schedule, loss scaler, EMA) and
the state of it a last.pth keeps for --resume."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from maskcls.ema import ModelEma


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
