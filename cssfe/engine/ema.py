"""Exponential moving average of a model's weights (as in timm's ModelEmaV2).

:class:`ModelEMA` keeps a full fp32 copy and averages the model's weights into it. Under ZeRO-3
:class:`PartitionedEMA` keeps, on each rank, only its partition of every parameter and averages
DeepSpeed's fp32 master partition into it: no gather per step, 1/world of the memory, and the
average follows the fp32 master weights rather than their bf16 / fp16 copy. Training code talks to
both the same way: ``update(model)`` after each optimizer step, ``gather()`` (every rank) before
reading ``module`` (evaluation, checkpoints), ``load(state_dict)`` to resume.
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.nn as nn


@torch.no_grad()
def _average_buffers(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for ema_b, b in zip(ema.buffers(), model.buffers()):
        if ema_b.dtype.is_floating_point:
            ema_b.lerp_(b.detach().to(ema_b.dtype), 1 - decay)
        else:  # counters (num_batches_tracked) are copied
            ema_b.copy_(b)


class ModelEMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_v, v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.dtype.is_floating_point:  # fp32 average even of a bf16/fp16 (DeepSpeed) model
                ema_v.lerp_(v.detach().to(ema_v.dtype), 1 - self.decay)
            else:
                ema_v.copy_(v)

    def gather(self) -> None:
        """``module`` is always whole here."""

    def load(self, state: Dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


class PartitionedEMA:
    """The EMA of a ZeRO-3 model, built from a :class:`ModelEMA` (its starting weights) and the
    DeepSpeed engine's module after ``deepspeed.initialize``.

    Rank r holds elements [r * n, (r + 1) * n) of each flattened parameter, DeepSpeed's own
    partition (n = ``ds_tensor.numel()``, the last one padded), and averages
    ``safe_get_local_fp32_param`` into it. Buffers, which ZeRO-3 does not partition, are averaged
    whole as :class:`ModelEMA` does. ``gather()`` all-gathers the partitions into ``module`` (a
    collective: every rank calls it); the next ``update`` frees the full weights again.
    """

    def __init__(self, ema: ModelEMA, model: nn.Module):
        import torch.distributed as dist

        self.module, self.decay = ema.module, ema.decay
        self._names = [name for name, _ in self.module.named_parameters()]
        self._pairs = list(zip(self.module.parameters(), model.parameters()))
        self._shards = []
        for ema_p, p in self._pairs:
            size, rank = p.ds_tensor.numel(), dist.get_rank(group=p.ds_process_group)
            self._shards.append(self._slice(ema_p.detach().reshape(-1), size, rank))
        self._whole = True
        self._release()

    @staticmethod
    def _slice(flat: torch.Tensor, size: int, rank: int) -> torch.Tensor:
        shard = torch.zeros(size, dtype=torch.float32, device=flat.device)
        start = min(rank * size, flat.numel())
        stop = min(start + size, flat.numel())
        shard[: stop - start] = flat[start:stop]
        return shard

    def _release(self) -> None:
        if self._whole:
            for ema_p, _ in self._pairs:
                ema_p.data = torch.empty(0, dtype=torch.float32, device=ema_p.device)
            self._whole = False

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        from deepspeed.utils import safe_get_local_fp32_param

        self._release()
        for shard, (_, p) in zip(self._shards, self._pairs):
            master = safe_get_local_fp32_param(p)
            if master is not None:  # None: a frozen parameter, which never changes
                shard.lerp_(master.to(shard.device), 1 - self.decay)
        _average_buffers(self.module, model, self.decay)

    @torch.no_grad()
    def gather(self) -> None:
        import torch.distributed as dist

        if self._whole:
            return
        for shard, (ema_p, p) in zip(self._shards, self._pairs):
            group = p.ds_process_group
            whole = torch.empty(shard.numel() * dist.get_world_size(group=group), dtype=shard.dtype, device=shard.device)
            dist.all_gather_into_tensor(whole, shard, group=group)
            ema_p.data = whole[: p.ds_numel].view(p.ds_shape)
        self._whole = True

    @torch.no_grad()
    def load(self, state: Dict[str, torch.Tensor]) -> None:
        """Take this rank's partitions of a full EMA state dict (as a checkpoint holds it)."""
        import torch.distributed as dist

        self._release()
        for name, shard, (_, p) in zip(self._names, self._shards, self._pairs):
            rank = dist.get_rank(group=p.ds_process_group)
            shard.copy_(self._slice(state[name].reshape(-1).to(shard.device, torch.float32), shard.numel(), rank))
        for name, buf in self.module.named_buffers():
            buf.copy_(state[name])
