"""The training order: shuffled or class-weighted, sharded over processes, seeded by (seed, epoch)."""
from __future__ import annotations

import math

import torch


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
