"""Asymmetric loss (ASL) for multi-label classification."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from cssfe import ops

from .basic import check_reduction, prepare_inputs, reduce_loss


class AsymmetricLoss(nn.Module):
    """Asymmetric loss, Ridnik / Ben-Baruch et al., "Asymmetric Loss For Multi-Label Classification",
    ICCV 2021.

    Reproduces ``AsymmetricLoss`` of Alibaba-MIIL/ASL ``src/loss_functions/losses.py`` (read at commit
    0a21a18a400934e94fd099fbeeed187bd10433f5; same class as ``timm/loss/asymmetric_loss.py``
    ``AsymmetricLossMultiLabel``), per element with ``p = sigmoid(z)``:

        p_m = min(1 - p + clip, 1)                     (probability shift, only when clip > 0)
        L   = -y (1 - p)^{gamma_pos} log(max(p, eps))
              - (1 - y) (1 - p_m)^{gamma_neg} log(max(p_m, eps))

    and the loss is the **sum** over all elements (the reference returns ``-loss.sum()``);
    ``reduction="mean"`` divides that sum by B*C. The clamps are the reference's: ``max(., eps)``
    is a hard clamp, so e.g. a positive with ``p < eps`` contributes ``-log(eps)`` and no gradient.
    The focusing weights are applied only when ``gamma_neg > 0 or gamma_pos > 0``.

    ``disable_torch_grad_focal_loss=True`` makes the focusing weight ``(1 - p_t)^gamma`` a constant
    for autograd. The reference does this by toggling the global grad mode off and then *on*; here
    the weight is computed inside ``torch.no_grad()``, which gives the same gradients and leaves the
    caller's grad mode untouched (the reference would switch grad on even inside ``no_grad``).

    Defaults follow the brief: ``gamma_neg=4, gamma_pos=0`` (the ASL README's recommended
    multi-label setting; the reference class itself defaults to ``gamma_pos=1``).
    """

    def __init__(
        self,
        gamma_neg: float = 4,
        gamma_pos: float = 0,
        clip: float = 0.05,
        eps: float = 1e-8,
        disable_torch_grad_focal_loss: bool = True,
        reduction: str = "sum",
    ):
        super().__init__()
        if gamma_neg < 0 or gamma_pos < 0:
            raise ValueError(f"gammas must be >= 0, got gamma_neg={gamma_neg}, gamma_pos={gamma_pos}")
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.eps = eps
        self.disable_torch_grad_focal_loss = disable_torch_grad_focal_loss
        self.reduction = check_reduction(reduction)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x, y = prepare_inputs(logits, targets)
        xs_pos = torch.sigmoid(x)
        xs_neg = 1 - xs_pos
        if self.clip is not None and self.clip > 0:
            xs_neg = (xs_neg + self.clip).clamp(max=1)

        loss = y * torch.log(xs_pos.clamp(min=self.eps)) + (1 - y) * torch.log(xs_neg.clamp(min=self.eps))

        if self.gamma_neg > 0 or self.gamma_pos > 0:
            ctx = torch.no_grad() if self.disable_torch_grad_focal_loss else contextlib.nullcontext()
            with ctx:
                pt = xs_pos * y + xs_neg * (1 - y)
                one_sided_gamma = self.gamma_pos * y + self.gamma_neg * (1 - y)
                one_sided_w = torch.pow(1 - pt, one_sided_gamma)
            loss = loss * one_sided_w

        return -reduce_loss(loss, self.reduction)


class FusedAsymmetricLoss(AsymmetricLoss):
    """The same loss through the fused kernel op :func:`cssfe.ops.asymmetric_loss` (value and
    gradient in one pass), on the backend in force (``cssfe.ops.use_backend``, e.g. from the
    ``kernels`` config key, else ``auto``). Logits must be ``[B, C]``."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ops.asymmetric_loss(
            logits, targets, gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg, clip=self.clip or 0.0,
            eps=self.eps, disable_torch_grad_focal_loss=self.disable_torch_grad_focal_loss, reduction=self.reduction,
        )


AsymmetricLoss.fused = FusedAsymmetricLoss
