"""Classification heads: the CSSFE head (SPEC section 1) and the GAP + linear baseline.

Every head maps a feature map [B, D, h, w] to a dict with at least ``logits`` [B, C], and says what
else it can do through :class:`Head`'s attributes: the engine and the explanations ask these, never
the head's name or class. Heads are registered by name as their class, built as
``cls(in_channels, num_classes, embeddings, groups, **cls.config_options(model_cfg, learnable))``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from cssfe import ops
from cssfe.models.enhance_forms import ENHANCE_FORMS, EnhanceInputs
from cssfe.registry import Registry

HEADS: Registry[nn.Module] = Registry("head")
GATES = {
    # Largest where the first pass is unsure (p near 0.5), zero where it is confident either way.
    "uncertainty": lambda p: 1 - (2 * p - 1).abs(),
    # The first reading: mostly feeds classes that are confidently absent.
    "absence": lambda p: 1 - p,
}


class Head(nn.Module):
    """What a head can do, asked by the engine and the explanations instead of its name."""

    uses_label_embeddings = False  # built from a text encoder's label embeddings of the classes
    has_class_maps = False  # forward(return_maps=True) gives "maps" [B, C, N], one map per class
    has_refined_maps = False  # ... and "refined_maps", which forward(mask=...) changes

    @property
    def has_first_pass_logits(self) -> bool:
        """forward gives "logits0", first-pass logits of their own, supervised by :meth:`auxiliary_loss`."""
        return False

    def auxiliary_loss(self, out: Dict[str, torch.Tensor], labels: torch.Tensor, loss_fn) -> Optional[torch.Tensor]:
        """The loss of the first-pass logits (weighted by ``model.aux_weight``), or None without them."""
        return loss_fn(out["logits0"].float(), labels) if self.has_first_pass_logits else None

    @classmethod
    def config_options(cls, cfg, learnable_embeddings: bool) -> Dict:
        """The constructor's keyword arguments from a :class:`cssfe.config.ModelConfig`."""
        return {}


@HEADS.register("baseline")
class BaselineHead(Head):
    """Global average pooling + linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, embeddings=None, groups=None):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, feats: torch.Tensor, return_maps: bool = False, mask: Optional[bool] = None) -> Dict[str, torch.Tensor]:
        return {"logits": self.fc(feats.mean(dim=(2, 3)))}


def _lam_raw_from_scalar(state_dict, prefix, *args) -> None:
    """Checkpoints written before lam_raw had shape [1] hold it as a 0-d tensor."""
    key = prefix + "lam_raw"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


def _tracing() -> bool:
    """Under torch.compile / torch.export the tensors are fakes without data: R is taken as it is."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


@HEADS.register("cssfe")
class CSSFEHead(Head):
    """Label-dependent class activation maps, progressive enhancement, semantic fusion classifier.

    Q = E W_q; K = W_k F, V = W_v F; A = softmax_N(Q K / sqrt(d)); Z0 = A V^T.
    logit_c(Z) = <w_c, LayerNorm(z_c + q_c)> + b_c + <u_c, GAP(F)>   (last term: global branch).
    First pass logits0 = logit(Z0); gate = g(sigmoid(logits0)) detached; Z' = progressive
    enhancement of Z0 under the affinity R (masked or not), in the form ``enhance_form``
    (cssfe.models.enhance_forms; "published": SPEC section 1); final logits = logit(Z').
    """

    uses_label_embeddings = True
    has_class_maps = True
    has_refined_maps = True

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        embeddings: torch.Tensor,
        groups,
        dim: int = 256,
        learnable_embeddings: bool = False,
        enhance: bool = True,
        mask: bool = True,
        global_branch: bool = True,
        gate: str = "uncertainty",
        tau: float = 0.1,
        enhance_form: str = "published",
    ):
        super().__init__()
        if embeddings.shape[0] != num_classes:
            raise ValueError(f"label embeddings have {embeddings.shape[0]} rows for {num_classes} classes")
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; choose one of {sorted(GATES)}")
        if enhance_form not in ENHANCE_FORMS:
            raise ValueError(f"unknown enhancement form {enhance_form!r}; choose one of {ENHANCE_FORMS.names()}")
        emb = embeddings.detach().float().clone()
        if learnable_embeddings:
            self.embeddings = nn.Parameter(emb)
        else:
            self.register_buffer("embeddings", emb)
        self.learnable_embeddings = learnable_embeddings
        self.register_buffer("groups", torch.as_tensor(groups, dtype=torch.long).clone())
        self.query = nn.Linear(emb.shape[1], dim)
        self.key = nn.Conv2d(in_channels, dim, 1)
        self.value = nn.Conv2d(in_channels, dim, 1)
        self.norm = nn.LayerNorm(dim)
        self.cls_weight = nn.Parameter(torch.empty(num_classes, dim).normal_(0, 1 / math.sqrt(dim)))
        self.cls_bias = nn.Parameter(torch.zeros(num_classes))
        self.global_fc = nn.Linear(in_channels, num_classes, bias=False) if global_branch else None
        self.enhance, self.mask, self.gate, self.tau = enhance, mask, gate, tau
        # lambda = softplus(raw) > 0, initialised to 1, so 1 + lambda * gate * sum(R) never reaches 0.
        # Shape [1], not 0-d: DeepSpeed's parameter broadcast and flattening reject 0-d tensors.
        self.lam_raw = nn.Parameter(torch.full((1,), math.log(math.e - 1)))
        self._register_load_state_dict_pre_hook(_lam_raw_from_scalar)
        # the form's own parameters, if any, live here ("published" has none: its state dict is the head's)
        self.enhance_form = enhance_form
        self.enhancement = ENHANCE_FORMS.build(enhance_form, num_classes)
        # The enhancement's plan (cssfe.ops.enhance_plan): the class order, a buffer so that it follows
        # the module across devices, and per mask setting the group bounds and the stages that take only
        # earlier groups. Derived from the groups, computed here and again whenever they change.
        self.register_buffer("_class_order", torch.empty(0, dtype=torch.long), persistent=False)
        self.refresh_plan()
        if not learnable_embeddings:
            # R is derived from the embeddings and the groups: a cache, never saved, recomputed
            # whenever either changes (see affinity()); a buffer so that it follows the module
            # across devices. Learnable (RIE) embeddings get R computed on every use instead.
            with torch.no_grad():
                self.register_buffer("_affinity", self._compute_affinity(mask), persistent=False)
            self._affinity_source = self._source_key()
            self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_affinity())

    @property
    def has_first_pass_logits(self) -> bool:
        return self.enhance  # without the enhancement "logits0" are the logits

    @classmethod
    def config_options(cls, cfg, learnable_embeddings: bool) -> Dict:
        return dict(dim=cfg.dim, learnable_embeddings=learnable_embeddings, enhance=cfg.enhance, mask=cfg.mask,
                    global_branch=cfg.global_branch, gate=cfg.gate, tau=cfg.tau, enhance_form=cfg.enhance_form)

    @property
    def lam(self) -> torch.Tensor:
        return F.softplus(self.lam_raw).reshape(())

    def _source_key(self):
        """Identity and version of the tensors R is derived from: any in-place change (a
        ``load_state_dict`` copy, an optimizer step), replacement or move changes it."""
        tensors = tuple((t.data_ptr(), t._version, t.device, t.shape) for t in (self.embeddings, self.groups))
        return tensors + (self.mask, self.tau)

    def _compute_affinity(self, mask: bool) -> torch.Tensor:
        # fp32 whatever autocast is active: R, its masked log-sum-exp and the softmax (SPEC section 1)
        with torch.autocast(self.embeddings.device.type, enabled=False):
            return ops.semantic_affinity(self.embeddings.float(), self.groups, mask, self.tau)

    def _groups_key(self):
        return self.groups.data_ptr(), self.groups._version, self.groups.device, self.groups.shape

    def refresh_plan(self) -> None:
        """Recompute the enhancement's plan from the current groups (reads their counts back, once)."""
        plan = ops.enhance_plan(self.groups)
        self._class_order, self._plan_bounds = plan.order, plan.bounds
        self._plan_earlier_only = {mask: plan.for_mask(mask).earlier_only for mask in (True, False)}
        self._plan_source = self._groups_key()

    def enhance_plan(self, mask: bool) -> ops.EnhancePlan:
        """The plan of ``progressive_enhance`` for the affinity under ``mask``."""
        if not _tracing() and self._groups_key() != self._plan_source:  # groups changed or moved
            self.refresh_plan()
        return ops.EnhancePlan(self._class_order, self._plan_bounds, self._plan_earlier_only[mask])

    def refresh_affinity(self) -> None:
        """Recompute the cached R from the current embeddings and groups."""
        if self.learnable_embeddings:  # computed on use
            return
        with torch.no_grad():
            self._affinity = self._compute_affinity(self.mask)
        self._affinity_source = self._source_key()

    def set_label_space(self, embeddings: Optional[torch.Tensor] = None, groups=None) -> None:
        """Replace the label embeddings and / or the groups (same shapes), keeping R consistent."""
        with torch.no_grad():
            if embeddings is not None:
                embeddings = torch.as_tensor(embeddings)
                if embeddings.shape != self.embeddings.shape:
                    raise ValueError(f"label embeddings must have shape {tuple(self.embeddings.shape)}, got {tuple(embeddings.shape)}")
                self.embeddings.copy_(embeddings)
            if groups is not None:
                groups = torch.as_tensor(groups)
                if groups.shape != self.groups.shape:
                    raise ValueError(f"groups must have shape {tuple(self.groups.shape)}, got {tuple(groups.shape)}")
                if groups.dtype.is_floating_point or not bool(((groups >= 0) & (groups <= 2)).all()):
                    raise ValueError("groups must hold integers 0 (head), 1 (medium) or 2 (tail)")
                self.groups.copy_(groups)
        self.refresh_affinity()
        self.refresh_plan()

    def affinity(self, mask: Optional[bool] = None) -> torch.Tensor:
        """R under the model's mask setting, or under ``mask`` when given (for explanations); fp32."""
        if self.learnable_embeddings or (mask is not None and mask != self.mask):
            # RIE: follow the embeddings as they learn (differentiably)
            return self._compute_affinity(self.mask if mask is None else mask)
        if not _tracing() and self._source_key() != self._affinity_source:  # embeddings or groups changed
            self.refresh_affinity()
        return self._affinity

    def classify(self, z: torch.Tensor, q: torch.Tensor, pooled: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.norm(z + q)
        logits = (h * self.cls_weight).sum(-1) + self.cls_bias
        return logits if pooled is None else logits + self.global_fc(pooled)

    def forward(self, feats: torch.Tensor, return_maps: bool = False, mask: Optional[bool] = None) -> Dict[str, torch.Tensor]:
        """``mask`` overrides the model's mask setting for this call (explanations compare both)."""
        q = self.query(self.embeddings.to(feats.dtype))  # [C, d]
        k = self.key(feats).flatten(2)  # [B, d, N]
        v = self.value(feats).flatten(2)
        pooled = feats.mean(dim=(2, 3)) if self.global_fc is not None else None
        if return_maps or (self.enhance and self.enhancement.needs_maps):
            z0, maps = ops.class_attention(q, k, v, return_maps=True)
        else:
            z0, maps = ops.class_attention(q, k, v), None
        logits0 = self.classify(z0, q, pooled)
        out = {"logits0": logits0}
        if not self.enhance:
            out["logits"] = logits0
            if return_maps:
                out["maps"] = out["refined_maps"] = maps
            return out
        with torch.autocast(feats.device.type, enabled=False):  # the gate stays fp32, like R
            presence = torch.sigmoid(logits0.detach().float())
            gate = GATES[self.gate](presence)
        affinity = self.affinity(mask)
        plan = self.enhance_plan(self.mask if mask is None else mask)
        inputs = EnhanceInputs(z0, maps, v, affinity, self.groups, gate, presence, self.lam, plan)
        z1, refined = self.enhancement(inputs, refine_maps=return_maps)
        out["logits"] = self.classify(z1, q, pooled)
        if return_maps:
            out["maps"] = maps
            out["refined_maps"] = refined
        return out


# Heads in their own modules register themselves on import (at the end: they import HEADS from here).
from cssfe.models import cprfl  # noqa: E402,F401
