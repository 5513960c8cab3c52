"""Exponential moving average of a model's weights (as in timm's ModelEmaV2)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


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
