"""Probability-guided (PG) loss -- an ASSUMED reconstruction, see ``ProbabilityGuidedLoss``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .basic import check_reduction, prepare_inputs, reduce_loss
from .db import ClassFreq, class_frequencies


class ProbabilityGuidedLoss(nn.Module):
    """Probability-guided loss after D. Lin, "Probability Guided Loss for Long-Tailed Multi-Label Image
    Classification", AAAI 2023, 37(2):1577-1585, doi:10.1609/aaai.v37i2.25244.

    ASSUMED FORMULAS. Neither the paper's equations nor its code could be read: the only public trace
    of an implementation is a compiled ``mllt/models/losses/__pycache__/pg_loss.cpython-38.pyc`` (with
    ``# from .pg_loss import PGLoss`` commented out) in the author's later repository Kunmonkey/DR-Loss
    (commit b96e04703d92abe813f3b16f348a390967786a5e); no source. Only the abstract is available: the
    loss has (1) a *probability re-balancing* component that adjusts the training probabilities of
    positive and negative labels per class, and (2) an *adaptive probability-aware focal* component
    that reduces the probability gap between positive and negative labels. This class implements
    those two ideas as follows (it is NOT verified against the paper):

    1. Probability re-balancing -- class-prior logit adjustment, separately for positive and negative
       labels. With ``pi_k = n_k / N`` and ``b_k = log(pi_k / (1 - pi_k))``:

           p+ = sigmoid(z + tau_pos * b_k)   (probability used for positive labels)
           p- = sigmoid(z + tau_neg * b_k)   (probability used for negative labels)

       For a tail class (``b_k << 0``) a positive must reach a larger logit and its negatives are
       suppressed less -- the same direction as DB's negative-tolerant bias ``init_bias``
       (Wu et al. 2020) and sigmoid logit adjustment (Menon et al., ICLR 2021, ``tau = 1``).
    2. Adaptive probability-aware focal -- with ``q = p+`` for positives and ``q = 1 - p-`` for
       negatives (probability of being right), the batch means per class (no gradient)
       ``Q+_k = mean_{i: y_ik=1} q_ik``, ``Q-_k = mean_{i: y_ik=0} q_ik`` define the gap
       ``g_k = clamp(Q-_k - Q+_k, 0, 1)`` (0 if the class has no positive or no negative in the
       batch). Negatives are focused harder the further positives lag behind:

           gamma+ = gamma,   gamma-_k = gamma * (1 + delta * g_k)

    Per element (targets may be soft; 0/1 targets pick one term)

        L = -y (1 - p+)^{gamma+} log p+  -  (1 - y) (p-)^{gamma-_k} log(1 - p-)

    averaged over B*C (``reduction="mean"``) or summed. With ``tau_pos = tau_neg = 0`` and
    ``delta = 0`` this is the plain sigmoid focal loss; with ``gamma = 0`` as well, BCE. Everything is
    evaluated with ``logsigmoid``/``softplus`` so it is finite for large logits.
    """

    def __init__(
        self,
        class_freq: ClassFreq,
        num_train: int,
        tau_pos: float = 1.0,
        tau_neg: float = 1.0,
        gamma: float = 2.0,
        delta: float = 1.0,
        reduction: str = "mean",
    ):
        super().__init__()
        freq = class_frequencies(class_freq, num_train, below_total=True)
        if gamma < 0 or delta < 0:
            raise ValueError(f"gamma and delta must be >= 0, got gamma={gamma}, delta={delta}")
        self.register_buffer("prior_logit", torch.log(freq / (num_train - freq)), persistent=False)
        self.num_classes = freq.numel()
        self.tau_pos = float(tau_pos)
        self.tau_neg = float(tau_neg)
        self.gamma = float(gamma)
        self.delta = float(delta)
        self.reduction = check_reduction(reduction)

    def adaptive_gamma_neg(self, q_pos: torch.Tensor, q_neg: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``gamma * (1 + delta * gap_k)`` per class, ``[1, C]``, from the batch (no gradient)."""
        with torch.no_grad():
            n_pos = y.sum(dim=0)
            n_neg = (1 - y).sum(dim=0)
            mean_pos = (y * q_pos).sum(dim=0) / n_pos.clamp(min=1)
            mean_neg = ((1 - y) * q_neg).sum(dim=0) / n_neg.clamp(min=1)
            gap = (mean_neg - mean_pos).clamp(0, 1)
            gap = torch.where((n_pos > 0) & (n_neg > 0), gap, torch.zeros_like(gap))
            return (self.gamma * (1 + self.delta * gap)).unsqueeze(0)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, y = prepare_inputs(logits, targets, self.num_classes)
        b = self.prior_logit.to(logits)
        z_pos = logits + self.tau_pos * b
        z_neg = logits + self.tau_neg * b
        log_p_pos = F.logsigmoid(z_pos)        # log p+
        log_1m_p_pos = F.logsigmoid(-z_pos)    # log(1 - p+)
        log_p_neg = F.logsigmoid(z_neg)        # log p-
        log_1m_p_neg = F.logsigmoid(-z_neg)    # log(1 - p-)
        gamma_neg = self.adaptive_gamma_neg(log_p_pos.exp(), log_1m_p_neg.exp(), y)
        pos = torch.exp(self.gamma * log_1m_p_pos) * log_p_pos
        neg = torch.exp(gamma_neg * log_p_neg) * log_1m_p_neg
        return -reduce_loss(y * pos + (1 - y) * neg, self.reduction)
