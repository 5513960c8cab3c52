"""A deterministic per-epoch shuffle that can start part-way through an epoch (for resume), and
the random streams of each rank's data augmentation."""
from __future__ import annotations

import random
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


def stream_seed(seed: int, rank: int, epoch: Optional[int] = None) -> int:
    """A seed of its own for each (seed, rank[, epoch]), mixed by numpy's SeedSequence."""
    entropy = [seed, rank] if epoch is None else [seed, rank, epoch]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])


def seed_rank_streams(seed: int, rank: int) -> None:
    """Give rank ``rank`` its own augmentation stream. Augmentations in the main process draw from
    the global generators, which every rank seeded with ``seed`` to build the same model: rank 0
    keeps that stream (one process's), the others re-seed from (seed, rank). Checkpoints hold each
    rank's generator states, so a resumed run continues every stream where it stopped."""
    if rank == 0:
        return
    value = stream_seed(seed, rank)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def seed_loader_workers(loader: DataLoader, seed: int, rank: int, epoch: int) -> None:
    """Loader workers (``data.num_workers`` > 0) seed their generators from a base seed the loader
    draws from its own generator when an epoch starts; seeded from (seed, rank, epoch), the
    workers' augmentations differ between ranks and epochs and repeat for a resumed epoch."""
    loader.generator.manual_seed(stream_seed(seed, rank, epoch))


class EpochShuffle(Sampler[int]):
    """The order of epoch e depends only on (seed, e). ``set_epoch(e, start)`` skips the first
    ``start`` indices, so a run resumed after k batches sees exactly the batches it had left.

    Over ``world_size`` ranks the one order is cut into blocks of ``micro_batch * world_size``
    indices and rank r takes the r-th micro-batch of each block: together the ranks see exactly
    the batches one process with the global batch would see (an incomplete last block is dropped).
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, micro_batch: int = 1):
        self.size, self.seed = size, seed
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        # One draw before the permutation, as DataLoader(shuffle=True, generator=g) makes for its
        # worker base seed: keeps the orders of runs made with that loader.
        torch.empty((), dtype=torch.int64).random_(generator=g)
        return torch.randperm(self.size, generator=g)

    def _indices(self) -> torch.Tensor:
        order = self.permutation()[self.start:]
        if self.world_size == 1:
            return order
        block = self.micro_batch * self.world_size
        blocks = len(order) // block
        return order[: blocks * block].view(blocks, self.world_size, self.micro_batch)[:, self.rank].reshape(-1)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.size - self.start
        block = self.micro_batch * self.world_size
        return (self.size - self.start) // block * self.micro_batch
