"""Forms of the CSSFE head's progressive head -> medium -> tail enhancement (``model.enhance_form``).

A form is a module of the head (``head.enhancement``) that turns the first pass into the enhanced
class features: ``form(inputs, refine_maps)`` -> ``(z1 [B, C, d], refined maps [B, C, N] or None)``.
Every form keeps the distribution-aware mask's promise: class i takes from class j only where the
affinity R_ij is non-zero (under the mask: group(j) < group(i)), and the stages run head, medium,
tail, each reading the already enhanced classes of earlier groups. Forms are registered by name and
built as ``cls(num_classes)``; docs/method.md gives each one's formula.

``published`` is the enhancement of SPEC section 1 through ``cssfe.ops.progressive_enhance`` (any
kernel backend). The other forms compose that op or plain PyTorch (any device, any backend: the
fused kernels implement only the published form's op).
"""
from __future__ import annotations

import abc
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from cssfe import ops
from cssfe.registry import Registry

Tensor = torch.Tensor
ENHANCE_FORMS: Registry[nn.Module] = Registry("enhancement form")


class EnhanceInputs(NamedTuple):
    """What the head knows after its first pass."""

    z0: Tensor  # [B, C, d] first-pass class features
    maps: Optional[Tensor]  # [B, C, N] class activation maps (given when the form needs_maps or maps are asked for)
    value: Tensor  # [B, d, N] the values the maps pool
    affinity: Tensor  # [C, C] R (fp32), zero where the mask forbids a source
    groups: Tensor  # [C] 0 head, 1 medium, 2 tail
    gate: Tensor  # [B, C] fp32, detached: how much class i takes
    presence: Tensor  # [B, C] fp32, detached: sigmoid of the first-pass logits
    lam: Tensor  # scalar lambda > 0
    plan: ops.EnhancePlan  # class order and group bounds (python ints: no read-back, traceable)


class EnhanceForm(nn.Module, abc.ABC):
    needs_maps = False  # the head computes the class maps for this form even when it returns none

    def __init__(self, num_classes: int = 0):
        super().__init__()

    @abc.abstractmethod
    def forward(self, x: EnhanceInputs, refine_maps: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """(enhanced features, refined maps or None)."""


@ENHANCE_FORMS.register("published")
class PublishedForm(EnhanceForm):
    """z'_i = (z_i + lam g_i sum_j R_ij s_j) / (1 + lam g_i sum_j R_ij), features and maps alike."""

    def forward(self, x: EnhanceInputs, refine_maps: bool):
        z1 = ops.progressive_enhance(x.z0, x.affinity, x.groups, x.gate, x.lam, plan=x.plan)
        refined = ops.progressive_enhance(x.maps, x.affinity, x.groups, x.gate, x.lam, plan=x.plan) if refine_maps else None
        return z1, refined


@ENHANCE_FORMS.register("stage_lambda")
class StageLambdaForm(EnhanceForm):
    """The published form with one strength per stage: lam_g = lam * exp(s_g), s = 0 at the start
    (the published form's numbers), learned; g is the group of the class being enhanced."""

    def __init__(self, num_classes: int = 0):
        super().__init__()
        self.stage_log_scale = nn.Parameter(torch.zeros(3))

    def stage_lam(self, lam: Tensor) -> Tensor:
        """[3]: lambda of the head, medium and tail stages."""
        return lam * torch.exp(self.stage_log_scale.to(lam.dtype))

    def forward(self, x: EnhanceInputs, refine_maps: bool):
        # lam_g g_i = lam * (exp(s_g) g_i): the op's gate carries the stage factor, differentiably
        gate = x.gate * torch.exp(self.stage_log_scale.to(x.gate.dtype)).index_select(0, x.groups)
        z1 = ops.progressive_enhance(x.z0, x.affinity, x.groups, gate, x.lam, plan=x.plan)
        refined = ops.progressive_enhance(x.maps, x.affinity, x.groups, gate, x.lam, plan=x.plan) if refine_maps else None
        return z1, refined


def _opmath(t: Tensor) -> torch.dtype:
    """fp32 for every precision, fp64 kept (for gradcheck): the forms' math is done in this."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _stages(plan: ops.EnhancePlan):
    """The class indices of the head, medium and tail stages (slices of the plan's order), leaving out
    a stage with no class and one that can take nothing (only earlier groups, and there are none: the
    head stage under the mask), whose classes then stay exactly as they were."""
    order, bounds = plan.order, plan.bounds
    for g in range(3):
        takes_nothing = (plan.earlier_only >> g) & 1 and bounds[g] == 0
        if bounds[g + 1] > bounds[g] and not takes_nothing:
            yield order[bounds[g]:bounds[g + 1]]


def batched_progressive_enhance(z: Tensor, affinity: Tensor, weight: Tensor, plan: ops.EnhancePlan) -> Tensor:
    """The published recurrence with a per-sample affinity: z [B, C, L], affinity [B, C, C] (row i:
    what class i takes from each j), weight [B, C] (lam * gate). In z's dtype, computed as given."""
    current = z
    for idx in _stages(plan):
        r = affinity.index_select(1, idx)  # [B, Cg, C]
        w = weight.index_select(1, idx)
        message = torch.einsum("bij,bjl->bil", r, current)
        new = (z.index_select(1, idx) + w[..., None] * message) / (1 + w * r.sum(-1))[..., None]
        current = current.index_copy(1, idx, new)
    return current


@ENHANCE_FORMS.register("presence")
class PresenceForm(EnhanceForm):
    """Each source weighted by its own first-pass presence: R_bij = R_ij p_bj, so class i borrows
    from a frequent neighbour j only in the images where j is present; otherwise the published
    recurrence (features and maps alike, so the refined maps still pool to the features)."""

    def forward(self, x: EnhanceInputs, refine_maps: bool):
        ct = _opmath(x.z0)
        with torch.autocast(x.z0.device.type, enabled=False):
            r = x.affinity.to(ct)[None] * x.presence.to(ct)[:, None, :]  # [B, C, C]
            w = x.lam.to(ct) * x.gate.to(ct)
            z1 = batched_progressive_enhance(x.z0.to(ct), r, w, x.plan).to(x.z0.dtype)
            refined = batched_progressive_enhance(x.maps.to(ct), r, w, x.plan).to(x.maps.dtype) if refine_maps else None
        return z1, refined


@ENHANCE_FORMS.register("sharpen")
class SharpenForm(EnhanceForm):
    """Enhance the maps, then pool: class i's map is multiplied by where its neighbours attend,
    A'_i ∝ A_i (1 + lam g_i N sum_j R_ij A'_j) (normalised over the N positions; A'_j of earlier groups
    already sharpened), and Z'_i = A'_i V^T. With g_i = 0 or no source it is A_i, Z0_i."""

    needs_maps = True

    def forward(self, x: EnhanceInputs, refine_maps: bool):
        ct = _opmath(x.maps)
        with torch.autocast(x.z0.device.type, enabled=False):
            maps = x.maps.to(ct)
            r = x.affinity.to(ct)
            w = x.lam.to(ct) * x.gate.to(ct)
            value = x.value.to(ct)
            positions = maps.shape[-1]
            current, z1 = maps, x.z0  # classes of a stage that takes nothing keep their maps and features exactly
            for idx in _stages(x.plan):
                guide = torch.einsum("ij,bjn->bin", r.index_select(0, idx), current)  # sums to sum_j R_ij over n
                new = maps.index_select(1, idx) * (1 + positions * w.index_select(1, idx)[..., None] * guide)
                new = new / new.sum(-1, keepdim=True)
                current = current.index_copy(1, idx, new)
                z1 = z1.index_copy(1, idx, torch.einsum("bcn,bdn->bcd", new, value).to(z1.dtype))
        return z1, current.to(x.maps.dtype) if refine_maps else None
