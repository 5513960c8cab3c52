"""Plain-PyTorch reference implementations of the CSSFE head's operations (SPEC section 1).

These define the numbers: fused kernels are tested against them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
