"""The enhancement's plan: what the kernels need to know about the groups and the affinity's
structure, computed once by whoever knows them (the CSSFE head, when it is built and whenever its
groups change) and passed to ``progressive_enhance``, instead of rediscovered from tensor values
in every call, with a device read-back each time."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

Tensor = torch.Tensor
ALL_STAGES = 0b111


class EnhancePlan(NamedTuple):
    """``order`` [C] int64 on the groups' device: the classes sorted by group (stable); ``bounds``:
    where groups 0, 1, 2 start and end in that order (4 ints, 0 to C); ``earlier_only``: bit g set
    when stage g's rows take nothing from their own group or a later one (R is zero there, as under
    the distribution-aware mask), so the kernels skip those sources without looking at R; 0 when
    unknown (the kernels then look at R themselves, or multiply its zeros)."""

    order: Tensor
    bounds: Tuple[int, int, int, int]
    earlier_only: int

    def for_mask(self, mask: Optional[bool]) -> "EnhancePlan":
        """This plan for an affinity built as ``semantic_affinity(embeddings, groups, mask)`` does (see
        :func:`enhance_plan`); from the group sizes in ``bounds``, with no read-back."""
        sizes = [self.bounds[g + 1] - self.bounds[g] for g in range(3)]
        return self._replace(earlier_only=_earlier_only(sizes, mask))


def enhance_plan(groups: Tensor, mask: Optional[bool] = None) -> EnhancePlan:
    """The plan for ``groups`` ([C] integers 0 head, 1 medium, 2 tail) and an affinity built as
    ``semantic_affinity(embeddings, groups, mask)`` does: ``mask=True`` (distribution-aware: every
    stage takes only earlier groups), ``False`` (every other class may feed a class), ``None``
    (structure unknown: no stage is marked). Reads the group counts back from the device, once."""
    g = groups.to(torch.long)
    # one read-back for the check and the counts: buckets g < 0, 0, 1, 2, g > 2
    counts = torch.bincount((g + 1).clamp(0, 4), minlength=5).cpu().tolist()
    if counts[0] or counts[4]:
        raise ValueError(f"progressive_enhance: groups must hold 0 (head), 1 (medium) or 2 (tail), got values "
                         f"in [{int(g.min())}, {int(g.max())}]")
    per_group = counts[1:4]
    order = torch.sort(g, stable=True).indices.contiguous()
    bounds = (0, per_group[0], per_group[0] + per_group[1], sum(per_group))
    return EnhancePlan(order, bounds, 0).for_mask(mask)


def _earlier_only(per_group, mask: Optional[bool]) -> int:
    if mask is None:
        return 0
    if mask:
        return ALL_STAGES
    # without the mask every j != i feeds i: a stage takes only earlier groups when it has no class
    # (nothing to take), or one class and no later group (its own column is the zero diagonal)
    bits = 0
    for stage, n in enumerate(per_group):
        if n == 0 or (n == 1 and sum(per_group[stage + 1:]) == 0):
            bits |= 1 << stage
    return bits


def check_plan(plan, classes: int, device: torch.device, op: str) -> None:
    """Raise, naming the field at fault, when ``plan`` cannot be a plan for C classes on ``device``
    (its agreement with the groups is the caller's: checking it would read the device back)."""
    if not isinstance(plan, EnhancePlan):
        raise TypeError(f"{op}: plan must be a cssfe.ops.EnhancePlan (cssfe.ops.enhance_plan), got {type(plan).__name__}")
    order, bounds, earlier_only = plan
    if not isinstance(order, torch.Tensor) or order.shape != (classes,) or order.dtype != torch.long:
        shape = tuple(order.shape) if isinstance(order, torch.Tensor) else type(order).__name__
        raise ValueError(f"{op}: plan.order must be an int64 tensor [C] with C={classes}, got {shape}")
    if order.device != device:
        raise ValueError(f"{op}: plan.order is on {order.device}, the inputs on {device}")
    if (len(bounds) != 4 or not all(isinstance(b, int) for b in bounds) or bounds[0] != 0 or bounds[3] != classes
            or list(bounds) != sorted(bounds)):
        raise ValueError(f"{op}: plan.bounds must be 4 ints rising from 0 to C={classes}, got {tuple(bounds)}")
    if not isinstance(earlier_only, int) or not 0 <= earlier_only <= ALL_STAGES:
        raise ValueError(f"{op}: plan.earlier_only must be an int in [0, {ALL_STAGES}], got {earlier_only!r}")
