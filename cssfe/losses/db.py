"""Distribution-Balanced loss (DB, DB-Focal) and class-balanced focal loss (CB-Focal).

Both follow ``ResampleLoss`` of wutong16/DistributionBalancedLoss,
``mllt/models/losses/resample_loss.py`` (read at commit 2567764a4bf5263e357c13e851d27cabf74170f6,
with the VOC/COCO configs ``configs/{voc,coco}/LT_resnet50_pfc_DB.py`` of the same commit).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .basic import binary_cross_entropy, check_reduction, focal_modulation, prepare_inputs, reduce_loss

ClassFreq = Union[Sequence[int], torch.Tensor]


def class_frequencies(class_freq: ClassFreq, num_train: Optional[int], *, below_total: bool) -> torch.Tensor:
    """Validate per-class positive counts; return them as a float64 tensor ``[C]``.

    ``below_total`` additionally requires ``n_k < num_train`` (needed wherever ``log(N / n_k - 1)``
    appears).
    """
    freq = torch.as_tensor(class_freq, dtype=torch.float64).detach().cpu()
    if freq.dim() != 1 or freq.numel() == 0:
        raise ValueError(f"class_freq must be a non-empty 1-D sequence, got shape {tuple(freq.shape)}")
    if not torch.isfinite(freq).all() or (freq <= 0).any():
        bad = torch.nonzero(~torch.isfinite(freq) | (freq <= 0)).flatten().tolist()
        raise ValueError(f"class_freq must be finite and > 0 for every class; class index(es) {bad} are not "
                         f"(a class without training positives cannot be weighted by its frequency)")
    if below_total:
        if num_train is None or num_train <= 0:
            raise ValueError(f"num_train must be a positive count, got {num_train!r}")
        if (freq >= num_train).any():
            raise ValueError("every class_freq must be < num_train (a class in every image has no prior log-odds)")
    return freq


LOGIT_REG_KEYS = ("init_bias", "neg_scale")


def logit_reg_params(logit_reg: Optional[Mapping[str, float]]):
    """(init_bias, neg_scale) of a ``logit_reg`` option (the reference's defaults for a missing key:
    no bias, scale 1); None for no regularisation. Unknown keys and ``neg_scale <= 0`` are refused."""
    if logit_reg is None:
        return None
    if not isinstance(logit_reg, Mapping):
        raise TypeError(f"logit_reg must be a mapping with keys {LOGIT_REG_KEYS}, got {type(logit_reg).__name__}")
    unknown = sorted(set(logit_reg) - set(LOGIT_REG_KEYS))
    if unknown:
        raise ValueError(f"logit_reg got unknown key(s) {unknown}; it takes {list(LOGIT_REG_KEYS)}")
    init_bias = float(logit_reg.get("init_bias", 0.0))
    neg_scale = float(logit_reg.get("neg_scale", 1.0))
    if neg_scale <= 0:
        raise ValueError(f"logit_reg neg_scale must be > 0, got {neg_scale}")
    return init_bias, neg_scale


class _ResampleLoss(nn.Module):
    """Shared tail of ``ResampleLoss.forward``: weighted BCE on (regularised) logits, optional focal
    term, ``loss_weight`` and reduction."""

    def __init__(self, class_freq, num_train, *, below_total, focal, gamma, balance_param, loss_weight, reduction):
        super().__init__()
        freq = class_frequencies(class_freq, num_train, below_total=below_total)
        # float64 buffers, cast to the logits' device and dtype in forward; not in the state_dict.
        self.register_buffer("class_freq", freq, persistent=False)
        self.num_classes = freq.numel()
        self.num_train = num_train
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.focal = bool(focal)
        self.gamma = float(gamma)
        self.balance_param = float(balance_param)
        self.loss_weight = float(loss_weight)
        self.reduction = check_reduction(reduction)

    def _set_logit_reg(self, init_bias: float, neg_scale: float) -> None:
        """Negative-tolerant regularisation (``ResampleLoss.logit_reg_functions``): class bias
        ``b_k = -log(N/n_k - 1) * init_bias / neg_scale`` added to every logit, negatives' logits
        scaled by ``neg_scale`` and their weight divided by it."""
        self.neg_scale = float(neg_scale)
        self.init_bias = float(init_bias)
        if self.init_bias != 0.0:  # the prior log-odds need 0 < n_k < N
            class_frequencies(self.class_freq, self.num_train, below_total=True)
            bias = -torch.log(self.num_train / self.class_freq - 1) * self.init_bias / self.neg_scale
        else:
            bias = torch.zeros_like(self.class_freq)
        self.register_buffer("logit_bias", bias, persistent=False)

    def _regularise(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor):
        z = logits + self.logit_bias.to(logits)
        z = z * (1 - y) * self.neg_scale + z * y
        weight = weight / self.neg_scale * (1 - y) + weight * y
        return z, weight

    def _finish(self, z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bce = binary_cross_entropy(z, y)
        loss = weight * bce
        if self.focal:
            loss = self.balance_param * focal_modulation(bce, self.gamma) * loss
        return self.loss_weight * reduce_loss(loss, self.reduction)


class DistributionBalancedLoss(_ResampleLoss):
    """Distribution-Balanced loss, Wu et al., "Distribution-Balanced Loss for Multi-Label
    Classification in Long-Tailed Datasets", ECCV 2020 (reference: ``ResampleLoss`` with
    ``reweight_func='rebalance'`` and ``logit_reg=dict(init_bias, neg_scale)``, see module docstring).

    With ``n_k`` the positive count of class k, ``N = num_train`` images, per sample i / class k:

    * re-balanced weight: ``r_ik = (1/n_k) / sum_{j in y_i} (1/n_j)`` (reference: ``freq_inv /
      repeat_rate``), smoothed ``r^_ik = sigmoid(map_beta (r_ik - map_gamma)) + map_alpha``. It is
      applied to positives *and* negatives of the sample ("pos and neg are equally treated"). A sample
      with no positive label has ``r = inf`` in the reference, hence ``r^ = 1 + map_alpha``; kept.
    * negative-tolerant regularisation: class bias ``b_k = -log(N/n_k - 1) * init_bias / neg_scale``
      is added to every logit, negatives' logits are scaled by ``lambda = neg_scale`` and their
      weight divided by it:

          positive:  r^ * log(1 + exp(-(z + b_k)))
          negative:  r^ / lambda * log(1 + exp(lambda (z + b_k)))

    * ``focal=True`` (registered as ``db_focal``): each term is multiplied by
      ``balance_param * (1 - p_t)^gamma`` with ``p_t = exp(-BCE(regularised z, y))``.

    The loss is averaged over all B*C elements (``reduction="mean"``) and multiplied by
    ``loss_weight``. In the reference the non-focal path returns that mean directly; the focal path
    returns the elementwise tensor, which mllt's ``parse_losses`` reduces with ``.mean()`` -- the
    same thing. Defaults are the VOC-LT config (``map_alpha=0.1, map_beta=10, map_gamma=0.3,
    neg_scale=5, init_bias=0.05``, focal ``gamma=2, balance_param=2``); COCO-LT uses
    ``map_gamma=0.2, neg_scale=2``. Unlike the reference, the caller's logits are not modified in
    place.
    """

    def __init__(
        self,
        class_freq: ClassFreq,
        num_train: int,
        focal: bool = False,
        gamma: float = 2.0,
        balance_param: float = 2.0,
        map_alpha: float = 0.1,
        map_beta: float = 10.0,
        map_gamma: float = 0.3,
        neg_scale: float = 5.0,
        init_bias: float = 0.05,
        loss_weight: float = 1.0,
        reduction: str = "mean",
    ):
        super().__init__(
            class_freq, num_train, below_total=True, focal=focal, gamma=gamma,
            balance_param=balance_param, loss_weight=loss_weight, reduction=reduction,
        )
        if neg_scale <= 0:
            raise ValueError(f"neg_scale must be > 0, got {neg_scale}")
        self.map_alpha = float(map_alpha)
        self.map_beta = float(map_beta)
        self.map_gamma = float(map_gamma)
        self._set_logit_reg(init_bias, neg_scale)

    def rebalance_weight(self, y: torch.Tensor) -> torch.Tensor:
        freq_inv = 1.0 / self.class_freq.to(y)
        repeat_rate = (y * freq_inv).sum(dim=1, keepdim=True)
        has_pos = repeat_rate > 0
        pos_weight = freq_inv / torch.where(has_pos, repeat_rate, torch.ones_like(repeat_rate))
        mapped = torch.sigmoid(self.map_beta * (pos_weight - self.map_gamma))
        return torch.where(has_pos, mapped, torch.ones_like(mapped)) + self.map_alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, y = prepare_inputs(logits, targets, self.num_classes)
        z, weight = self._regularise(logits, y, self.rebalance_weight(y))
        return self._finish(z, y, weight)


class ClassBalancedFocalLoss(_ResampleLoss):
    """Class-balanced focal loss (CB-Focal), Cui et al., "Class-Balanced Loss Based on Effective
    Number of Samples", CVPR 2019, as run for multi-label data by the DB reference: ``ResampleLoss``
    with ``reweight_func='CB'`` (``CB_weight``), focal on, no logit regularisation.

    Class weight ``w_k = (1 - beta) / (1 - beta^{n_k})`` (``beta = 0.9``). The reference's default
    ``CB_mode='average_w'`` turns it into one weight per *sample*, the mean over its positive classes,
    ``w_i = sum_k y_ik w_k / sum_k y_ik``, applied to all C terms of the sample (no further
    normalisation, ``weight_norm=None``). Other modes: ``by_class`` (``w_k`` per column),
    ``average_n`` (weight of the mean count of the positives), ``min_n`` (weight of the rarest
    positive). Per element

        L = balance_param * w * (1 - p_t)^gamma * BCE(z, y),   p_t = exp(-BCE)

    with ``gamma = 2, balance_param = 2`` (reference focal defaults), averaged over B*C and times
    ``loss_weight``. ``logit_reg=dict(init_bias=..., neg_scale=...)`` adds the DB loss's
    negative-tolerant regularisation to the logits and weights first (reference: the same
    ``logit_reg_functions``; a missing key means no bias / scale 1; default: none). CPRFL's LT-VOC
    CB-Focal recipe is ``mode="by_class", logit_reg=dict(init_bias=0.05, neg_scale=5),
    loss_weight=10``. A sample with no positive label gets ``w = 1 - beta`` (the ``n -> inf`` limit,
    which is what ``min_n`` yields); ``average_w``/``average_n`` give NaN there in the reference.
    ``num_train`` is used only by ``logit_reg``'s ``init_bias`` (the prior log-odds).
    """

    MODES = ("average_w", "by_class", "average_n", "min_n")

    def __init__(
        self,
        class_freq: ClassFreq,
        num_train: Optional[int] = None,
        beta: float = 0.9,
        mode: str = "average_w",
        gamma: float = 2.0,
        balance_param: float = 2.0,
        logit_reg: Optional[Mapping[str, float]] = None,
        loss_weight: float = 1.0,
        reduction: str = "mean",
    ):
        super().__init__(
            class_freq, num_train, below_total=False, focal=True, gamma=gamma,
            balance_param=balance_param, loss_weight=loss_weight, reduction=reduction,
        )
        reg = logit_reg_params(logit_reg)
        self.logit_reg = reg is not None
        if reg is not None:
            self._set_logit_reg(*reg)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.beta = float(beta)
        self.mode = mode

    def _cb(self, n: torch.Tensor) -> torch.Tensor:
        return (1 - self.beta) / (1 - torch.pow(self.beta, n))

    def cb_weight(self, y: torch.Tensor) -> torch.Tensor:
        freq = self.class_freq.to(y)
        if self.mode == "by_class":
            return self._cb(freq).expand_as(y)
        if self.mode == "min_n":
            inf = torch.full_like(y, float("inf"))
            return self._cb(torch.where(y > 0, freq.expand_as(y), inf).amin(dim=1, keepdim=True))
        num_pos = y.sum(dim=1, keepdim=True)
        has_pos = num_pos > 0
        safe = torch.where(has_pos, num_pos, torch.ones_like(num_pos))
        if self.mode == "average_n":
            weight = self._cb((y * freq).sum(dim=1, keepdim=True) / safe)
        else:  # average_w
            weight = (y * self._cb(freq)).sum(dim=1, keepdim=True) / safe
        return torch.where(has_pos, weight, torch.full_like(weight, 1 - self.beta))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, y = prepare_inputs(logits, targets, self.num_classes)
        weight = self.cb_weight(y)
        if self.logit_reg:
            logits, weight = self._regularise(logits, y, weight)
        return self._finish(logits, y, weight)
