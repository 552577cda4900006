"""An exponential moving average of a model's weights (--ema), validated and saved in their place."""
from __future__ import annotations

import copy

import torch
from torch import nn


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
