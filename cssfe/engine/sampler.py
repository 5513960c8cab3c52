"""A deterministic per-epoch shuffle that can start part-way through an epoch (for resume)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    """The order of epoch e depends only on (seed, e). ``set_epoch(e, start)`` skips the first
    ``start`` indices, so a run resumed after k batches sees exactly the batches it had left."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        # One draw before the permutation, as DataLoader(shuffle=True, generator=g) makes for its
        # worker base seed: keeps the orders of runs made with that loader.
        torch.empty((), dtype=torch.int64).random_(generator=g)
        return torch.randperm(self.size, generator=g)

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation()[self.start:].tolist())

    def __len__(self) -> int:
        return self.size - self.start
