"""Public entry points of the cssfe operators: input checks, backend choice, autograd glue."""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import library
from .dispatch import resolve
from .kernels import check_attention
from .plan import EnhancePlan, check_plan

Tensor = torch.Tensor
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, t, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _floating(name: str, t: Tensor, op: str) -> None:
    _tensor(name, t, op)
    if t.dtype not in _FLOAT:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _same_device(op: str, **tensors: Tensor) -> None:
    devs = {name: t.device for name, t in tensors.items()}
    if len(set(devs.values())) > 1:
        raise ValueError(f"{op}: inputs must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in devs.items()))


def class_attention(q: Tensor, k: Tensor, v: Tensor, *, return_maps: bool = False, backend: Optional[str] = None):
    """Label-dependent attention pooling (SPEC section 1 / 6.1).

    q: [C, d] or [B, C, d]; k, v: [B, d, N]. Returns Z0 = softmax_N(q k / sqrt(d)) v^T [B, C, d]
    (v's dtype; softmax and accumulation in fp32), or (Z0, maps [B, C, N]) with ``return_maps``.
    Fused backends never store the maps for training (online softmax, recomputed in backward);
    ``return_maps=True`` computes them in addition, differentiably, in plain PyTorch.
    Non-contiguous inputs are accepted (copied to contiguous memory).
    """
    op = "class_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _floating(name, t, op)
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"{op}: k and v must both be [B, d, N], got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dim() not in (2, 3) or q.shape[-1] != k.shape[1] or (q.dim() == 3 and q.shape[0] != k.shape[0]):
        raise ValueError(f"{op}: q must be [C, d] or [B, C, d] with B={k.shape[0]}, d={k.shape[1]}, got {tuple(q.shape)}")
    if k.shape[1] == 0 or k.shape[2] == 0:
        raise ValueError(f"{op}: k and v need d >= 1 and N >= 1 positions, got {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _same_device(op, q=q, k=k, v=v)
    name = resolve(backend, k.device, op, v.dtype, classes=q.shape[-2])
    check_attention(name, k.shape[1], v.dtype)  # before any launch, with the shape at fault
    q3 = q.unsqueeze(0) if q.dim() == 2 else q
    if q3.shape[1] == 0 or k.shape[0] == 0:  # nothing to compute
        z = v.new_zeros(k.shape[0], q3.shape[1], k.shape[1])
        return (z, v.new_zeros(k.shape[0], q3.shape[1], k.shape[2])) if return_maps else z
    z, _ = library.class_attention(q3.contiguous(), k.contiguous(), v.contiguous(), name)
    if not return_maps:
        return z
    scores = torch.einsum("cd,bdn->bcn" if q.dim() == 2 else "bcd,bdn->bcn", q, k) / math.sqrt(k.shape[1])
    maps = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype)
    return z, maps


def progressive_enhance(
    z: Tensor, affinity: Tensor, groups: Tensor, gate: Tensor, lam, *, plan: Optional[EnhancePlan] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Head -> medium -> tail enhancement (SPEC section 1), all three stages in one kernel call.

    z: [B, C, L] (features or maps); affinity R: [C, C]; groups: [C] integers in {0, 1, 2};
    gate: [B, C]; lam: scalar tensor (or number). Differentiable w.r.t. z, affinity, gate and lam.
    Output in z's dtype, computed in fp32 (fp64 for fp64 inputs on the reference backend).

    ``plan``: ``cssfe.ops.enhance_plan(groups, mask)`` of these groups and this affinity's structure,
    computed once by the caller (the CSSFE head does, when its groups change). Without one, each
    call computes it from ``groups`` (a device read-back; under ``torch.compile`` inside the operator,
    in each direction) and marks no stage as taking only earlier groups (the kernels then look at R).
    """
    op = "progressive_enhance"
    _floating("z", z, op)
    _floating("affinity", affinity, op)
    _floating("gate", gate, op)
    _tensor("groups", groups, op)
    if not isinstance(lam, torch.Tensor):
        lam = torch.tensor(float(lam), dtype=torch.float32, device=z.device)
    _floating("lam", lam, op)
    if z.dim() != 3 or affinity.shape != (z.shape[1], z.shape[1]) or gate.shape != z.shape[:2]:
        raise ValueError(
            f"{op}: expected z [B, C, L], affinity [C, C], gate [B, C]; got "
            f"{tuple(z.shape)}, {tuple(affinity.shape)}, {tuple(gate.shape)}"
        )
    if groups.shape != (z.shape[1],):
        raise ValueError(f"{op}: groups must be [C] with C={z.shape[1]}, got {tuple(groups.shape)}")
    if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
        raise TypeError(f"{op}: groups must be an integer tensor, got {groups.dtype}")
    if lam.numel() != 1:
        raise ValueError(f"{op}: lam must be a scalar, got shape {tuple(lam.shape)}")
    if groups.device.type == "meta":  # a plan computed here, and the reference kernel, read the group values
        raise ValueError(f"{op}: groups must hold values, got a meta tensor")
    _same_device(op, z=z, affinity=affinity, groups=groups, gate=gate, lam=lam)
    if plan is not None:
        check_plan(plan, z.shape[1], z.device, op)
    name = resolve(backend, z.device, op, z.dtype, classes=z.shape[-2])
    if z.numel() == 0:
        return z.clone()
    return library.progressive_enhance(z.contiguous(), affinity.contiguous(), groups.contiguous(),
                                       gate.contiguous(), lam.reshape(()), plan, name)


def asymmetric_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    disable_torch_grad_focal_loss: bool = True,
    reduction: str = "sum",
    backend: Optional[str] = None,
) -> Tensor:
    """Asymmetric loss with its gradient computed in the same pass (SPEC section 2 / 6.3).

    Same numbers and gradients as ``cssfe.losses.AsymmetricLoss(gamma_neg, gamma_pos, clip, eps,
    disable_torch_grad_focal_loss, reduction)``: logits [B, C] fp32/fp16/bf16/fp64 (half precision
    computed in fp32; the loss is fp32 then), targets of the same shape, bool/uint8/float. A NaN
    logit makes the loss and its gradient NaN, as there. With a fused backend the backward scales
    the gradient kept by the forward in place, so the loss can be backpropagated once
    (``retain_graph=True`` and a second pass raise; use ``backend="reference"`` for that);
    ``create_graph=True`` works with every backend. Only the logits are differentiated: targets that
    require grad are an error (``cssfe.losses.AsymmetricLoss`` differentiates through them).
    """
    op = "asymmetric_loss"
    _floating("logits", logits, op)
    _tensor("targets", targets, op)
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be [B, C], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(f"{op}: targets shape {tuple(targets.shape)} does not match logits shape {tuple(logits.shape)}")
    if targets.dtype not in (torch.bool, torch.uint8) + _FLOAT:
        raise TypeError(f"{op}: targets must be bool, uint8 or floating, got {targets.dtype}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"{op}: reduction must be 'sum' or 'mean', got {reduction!r}")
    if not (math.isfinite(gamma_pos) and math.isfinite(gamma_neg)) or gamma_pos < 0 or gamma_neg < 0:
        raise ValueError(f"{op}: gammas must be finite and >= 0, got gamma_pos={gamma_pos}, gamma_neg={gamma_neg}")
    if targets.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: targets require grad, but this loss differentiates only the logits (its kernels "
                         "give no gradient for the targets): detach them, or use cssfe.losses.AsymmetricLoss, "
                         "which differentiates through both")
    _same_device(op, logits=logits, targets=targets)
    name = resolve(backend, logits.device, op, logits.dtype, classes=logits.shape[-1])
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    return library.asymmetric_loss(
        logits.contiguous(), targets.contiguous(), float(gamma_pos), float(gamma_neg), float(clip or 0.0), float(eps),
        not disable_torch_grad_focal_loss, reduction == "mean", need_grad, name,
    )
