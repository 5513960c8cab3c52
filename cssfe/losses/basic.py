"""Plain multi-label losses (BCE, sigmoid focal) and the small helpers every loss here shares.

All losses take ``logits`` ``[B, C]`` (floating) and ``targets`` of the same shape (bool, uint8 or
float in ``[0, 1]``) and return a scalar.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("mean", "sum")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """``mean`` averages over every element (B*C); ``sum`` adds them."""
    return loss.mean() if reduction == "mean" else loss.sum()


def prepare_inputs(
    logits: torch.Tensor, targets: torch.Tensor, num_classes: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and return ``(logits, targets as logits.dtype)``.

    bool / uint8 / float targets all map to the same 0/1 float tensor, so every loss gives identical
    results for them. float16 / bfloat16 logits are computed in float32 (e.g. ASL's ``eps = 1e-8``
    is 0 in float16).
    """
    if not torch.is_floating_point(logits):
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"loss was built for {num_classes} classes, logits have {logits.shape[1]}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits, targets.to(dtype=logits.dtype)


def binary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Elementwise ``-[y log sigmoid(z) + (1-y) log(1 - sigmoid(z))]``, computed stably from logits."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


def focal_modulation(bce: torch.Tensor, gamma: float) -> torch.Tensor:
    """Focal factor ``(1 - p_t)^gamma`` with ``p_t = exp(-BCE)``.

    For 0/1 targets ``exp(-BCE)`` is exactly ``p`` for positives and ``1 - p`` for negatives; this is
    how the DB reference (``ResampleLoss.forward``) defines ``pt``. ``-expm1(-bce)`` keeps ``1 - p_t``
    accurate when ``p_t`` is close to 1.
    """
    return (-torch.expm1(-bce)) ** gamma


class BCELoss(nn.Module):
    """Binary cross-entropy on logits.

    ``L = -[y log p + (1 - y) log(1 - p)]``, ``p = sigmoid(z)``, averaged over all B*C elements
    (``reduction="mean"``, the default) or summed (``"sum"``). Computed with
    ``torch.nn.functional.binary_cross_entropy_with_logits`` (log-sum-exp form, finite for any logit).
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, y = prepare_inputs(logits, targets)
        return reduce_loss(binary_cross_entropy(logits, y), self.reduction)


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017).

    ``L = alpha_t (1 - p_t)^gamma BCE(z, y)`` with ``p_t = p`` for positives and ``1 - p`` for
    negatives, i.e. ``-alpha_t (1 - p_t)^gamma log p_t``. ``alpha_t = alpha y + (1 - alpha)(1 - y)``
    when ``alpha`` is given (as in ``torchvision.ops.sigmoid_focal_loss``), no class weighting when
    ``alpha is None`` (the default). ``gamma = 2``. ``reduction``: ``"mean"`` over B*C (default) or
    ``"sum"``. ``p_t`` is taken as ``exp(-BCE)``, identical to the above for 0/1 targets.
    """

    def __init__(self, gamma: float = 2.0, alpha: Optional[float] = None, reduction: str = "mean"):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
        self.gamma = float(gamma)
        self.alpha = alpha
        self.reduction = check_reduction(reduction)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, y = prepare_inputs(logits, targets)
        bce = binary_cross_entropy(logits, y)
        loss = focal_modulation(bce, self.gamma) * bce
        if self.alpha is not None:
            loss = (self.alpha * y + (1.0 - self.alpha) * (1.0 - y)) * loss
        return reduce_loss(loss, self.reduction)
