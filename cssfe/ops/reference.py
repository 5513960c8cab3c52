"""The plain-PyTorch reference of the CSSFE head's operations (SPEC section 1), and the
``reference`` kernel backend.

The definitions (``class_attention``, ``semantic_affinity``, ``progressive_enhance``,
``asymmetric_loss_with_grad``) define the numbers: every kernel is tested against them (autograd
through them gives the ground-truth gradients). The ``reference`` backend's kernels below have the
fused kernels' contract (``cssfe/ops/kernels.py``, ``csrc/cssfe.h``): forward functions return what
the backward needs (``lse``, the output), backward functions the raw gradients that the autograd
formulas of ``cssfe/ops/library.py`` combine. They materialise everything, run on any device and
dtype (float64 in float64), and are checked against the definitions in the tests.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from .kernels import Backend, register_backend, register_kernel

Tensor = torch.Tensor


def class_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_maps: bool = False):
    """Label-dependent attention pooling.

    q: [C, d] or [B, C, d] class queries; k, v: [B, d, N] keys and values over N positions.
    A = softmax_N(q k / sqrt(d)) is each class's activation map (sums to 1 over space) and
    Z0 = A v^T [B, C, d] the category-specific features. Returns Z0, or (Z0, A) with ``return_maps``.
    """
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"class_attention: k and v must both be [B, d, N], got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dim() not in (2, 3) or q.shape[-1] != k.shape[1]:
        raise ValueError(f"class_attention: q must be [C, d] or [B, C, d] with d={k.shape[1]}, got {tuple(q.shape)}")
    eq = "cd,bdn->bcn" if q.dim() == 2 else "bcd,bdn->bcn"
    scores = torch.einsum(eq, q, k) / math.sqrt(k.shape[1])
    # Softmax in at least fp32: half-precision exponentials over hundreds of positions lose mass.
    maps = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype)
    z = torch.einsum("bcn,bdn->bcd", maps, v)
    return (z, maps) if return_maps else z


def semantic_affinity(embeddings: torch.Tensor, groups: torch.Tensor, mask: bool = True, tau: float = 0.1) -> torch.Tensor:
    """R [C, C]: row i is a softmax of cos(E_i, E_j) / tau over the classes j that may feed class i.

    With the distribution-aware mask, j may feed i only if group(j) < group(i) (head=0 < medium=1 <
    tail=2); without it, every j != i may. Rows with no allowed source (all head rows under the
    mask) are exactly zero. Computed in fp32 with a masked log-sum-exp.
    """
    e = F.normalize(embeddings.float(), dim=-1)
    logits = (e @ e.t()) / tau
    if mask:
        allowed = groups[None, :] < groups[:, None]
    else:
        allowed = ~torch.eye(len(groups), dtype=torch.bool, device=groups.device)
    logits = logits.masked_fill(~allowed, float("-inf"))
    has_source = allowed.any(dim=1, keepdim=True)
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    # exp(-inf - (-inf)) would be NaN for rows with no source: zero them explicitly.
    lse = torch.where(has_source, lse, torch.zeros_like(lse))
    return torch.where(allowed, torch.exp(logits - lse), torch.zeros_like(logits))


def progressive_enhance(
    z: torch.Tensor, affinity: torch.Tensor, groups: torch.Tensor, gate: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """Head -> medium -> tail enhancement of per-class vectors.

    z: [B, C, L] (features, L = d, or maps, L = N); affinity R: [C, C]; groups: [C] in {0, 1, 2};
    gate: [B, C]; lam: scalar. Group by group, for each class i of group g:
    z'_i = (z_i + lam * gate_i * sum_j R_ij s_j) / (1 + lam * gate_i * sum_j R_ij), where s_j = z'_j
    for classes of earlier groups (already updated) and s_j = z_j otherwise. Each z'_i is a convex
    combination of the inputs, so refined maps still sum to one.
    """
    if z.dim() != 3 or affinity.shape != (z.shape[1], z.shape[1]) or gate.shape != z.shape[:2]:
        raise ValueError(
            f"progressive_enhance: expected z [B, C, L], affinity [C, C], gate [B, C]; got "
            f"{tuple(z.shape)}, {tuple(affinity.shape)}, {tuple(gate.shape)}"
        )
    current = z
    r = affinity.to(z.dtype)
    for g in range(3):
        idx = torch.nonzero(groups == g).flatten()
        if idx.numel() == 0:
            continue
        r_g = r.index_select(0, idx)  # [Cg, C]
        w = lam * gate.index_select(1, idx)  # [B, Cg]
        message = torch.einsum("ij,bjl->bil", r_g, current)
        new = (z.index_select(1, idx) + w[..., None] * message) / (1 + w * r_g.sum(1))[..., None]
        current = current.index_copy(1, idx, new)
    return current


def asymmetric_loss_with_grad(
    x: torch.Tensor,
    y: torch.Tensor,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    focal_grad: bool = False,
    reduction: str = "sum",
):
    """Closed-form ASL value and d loss / d x (what the fused kernels compute in one pass).

    x: logits, y: targets in [0, 1] (same float dtype). Same numbers and gradients as
    ``cssfe.losses.AsymmetricLoss(gamma_neg, gamma_pos, clip, eps, not focal_grad, reduction)``,
    clamps included: ``max(., eps)`` and ``min(., 1)`` pass no gradient where they clamp (torch's
    clamp passes it at equality, so do we). ``focal_grad=True`` differentiates the focusing weight too.
    """
    p = torch.sigmoid(x)
    dp = p * (1 - p)
    xn = 1 - p
    dxn = -dp
    if clip is not None and clip > 0:
        c = xn + clip
        dxn = torch.where(c <= 1, dxn, torch.zeros_like(dxn))
        xn = c.clamp(max=1)
    # clamped where below eps; a NaN is not, so its loss and gradient stay NaN, as through autograd
    clamped_p, clamped_n = p < eps, xn < eps
    base = y * torch.log(p.clamp(min=eps)) + (1 - y) * torch.log(xn.clamp(min=eps))
    dbase = (y * torch.where(clamped_p, torch.zeros_like(p), 1 - p)
             + (1 - y) * torch.where(clamped_n, torch.zeros_like(xn), dxn / xn))
    if gamma_neg > 0 or gamma_pos > 0:
        pt = p * y + xn * (1 - y)
        ge = gamma_pos * y + gamma_neg * (1 - y)
        w = torch.pow(1 - pt, ge)
        d = dbase * w
        if focal_grad:
            dpt = y * dp + (1 - y) * dxn
            dw = torch.where(ge == 0, torch.zeros_like(w), ge * torch.pow(1 - pt, ge - 1) * (-dpt))
            d = d + base * dw
        loss, grad = -base * w, -d
    else:
        loss, grad = -base, -dbase
    if reduction == "mean":
        return loss.mean(), grad / max(loss.numel(), 1)
    return loss.sum(), grad


# ----------------------------------------------------------------------------- the reference backend
register_backend(Backend("reference", lambda build: (True, "plain PyTorch, always available")))


def _opmath(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@register_kernel("asl", "reference")
def asl(logits, targets, gamma_pos, gamma_neg, clip, eps, focal_grad, mean, need_grad) -> Tuple[Tensor, Tensor]:
    x = logits.to(_opmath(logits))
    y = targets.to(x.dtype)
    loss, grad = asymmetric_loss_with_grad(x, y, gamma_pos, gamma_neg, clip, eps, focal_grad, "mean" if mean else "sum")
    grad = grad.to(logits.dtype) if need_grad else logits.new_empty(0)
    return loss, grad


def _scores(q: Tensor, k: Tensor) -> Tensor:
    ct = _opmath(k)
    q = q.to(ct).expand(k.shape[0], -1, -1)  # [1, C, d] is shared by the batch
    return torch.einsum("bcd,bdn->bcn", q, k.to(ct)) / math.sqrt(k.shape[1])


@register_kernel("attention_fwd", "reference")
def attention_fwd(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    s = _scores(q, k)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    z = torch.einsum("bcn,bdn->bcd", p, v.to(p.dtype))
    return z.to(v.dtype), lse.float()


@register_kernel("attention_bwd", "reference")
def attention_bwd(grad_z, q, k, v, z, lse) -> Tuple[Tensor, Tensor, Tensor]:
    s = _scores(q, k)
    ct = s.dtype
    p = torch.exp(s - lse.to(ct)[..., None])
    g = grad_z.to(ct)
    dv = torch.einsum("bcn,bcd->bdn", p, g)
    dp = torch.einsum("bcd,bdn->bcn", g, v.to(ct))
    delta = (g * z.to(ct)).sum(-1, keepdim=True)
    ds = p * (dp - delta) / math.sqrt(k.shape[1])
    dq = torch.einsum("bcn,bdn->bcd", ds, k.to(ct))
    if q.shape[0] == 1:
        dq = dq.sum(0, keepdim=True)
    dk = torch.einsum("bcn,bcd->bdn", ds, q.to(ct).expand(k.shape[0], -1, -1))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _stages(groups: Tensor):
    for g in range(3):
        rows = groups == g
        yield g, rows, (groups < g)


@register_kernel("enhance_fwd", "reference")
def enhance_fwd(z: Tensor, r: Tensor, groups: Tensor, w: Tensor, order=None, bounds=None, earlier_only: int = 0) -> Tensor:
    """The stages from the groups themselves: the plan (order, bounds, earlier_only) is not needed."""
    ct = _opmath(z)
    zf, rf, wf = z.to(ct), r.to(ct), w.to(ct)
    rs = rf.sum(1)
    out = zf.clone()
    for _, rows, earlier in _stages(groups):
        s = torch.where(earlier[None, :, None], out, zf)
        m = torch.einsum("ij,bjl->bil", rf, s)
        new = (zf + wf[..., None] * m) / (1 + wf * rs)[..., None]
        out = torch.where(rows[None, :, None], new, out)
    return out.to(z.dtype)


@register_kernel("enhance_bwd", "reference")
def enhance_bwd(grad, z, r, groups, w, out, order=None, bounds=None, earlier_only: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    ct = _opmath(z)
    zf, rf, wf, of = z.to(ct), r.to(ct), w.to(ct), out.to(ct)
    rs = rf.sum(1)
    den = 1 + wf * rs  # [B, C]
    acc = grad.to(ct).clone()
    dz = torch.zeros_like(zf)
    dm = torch.zeros_like(zf)
    dw = torch.zeros_like(wf)
    for _, rows, earlier in reversed(list(_stages(groups))):
        s = torch.where(earlier[None, :, None], of, zf)
        m = torch.einsum("ij,bjl->bil", rf, s)
        sel = rows[None, :, None]
        g = torch.where(sel, acc, torch.zeros_like(acc))
        dz = dz + g / den[..., None]
        dmg = g * (wf / den)[..., None]
        dm = dm + dmg
        dw = dw + torch.where(rows[None, :], (g * (m - rs[None, :, None] * of)).sum(-1) / den, torch.zeros_like(dw))
        t = torch.einsum("ij,bil->bjl", rf, dmg)
        acc = acc + torch.where(earlier[None, :, None], t, torch.zeros_like(t))
        dz = dz + torch.where(earlier[None, :, None], torch.zeros_like(t), t)
    return dz.to(z.dtype), dm.float() if ct != torch.float64 else dm, dw.float() if ct != torch.float64 else dw
