"""Mixup and CutMix of a device batch (--mixup, --cutmix)."""
from __future__ import annotations

import math
import random

import numpy as np
import torch


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
