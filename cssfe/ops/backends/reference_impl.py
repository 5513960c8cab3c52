"""Kernel-level plain-PyTorch implementations (the ``reference`` backend).

Same contract as the fused kernels (see ``csrc/cssfe.h``): forward functions return what the
backward needs (``lse``, the output), backward functions return the raw gradients the autograd
formulas in ``cssfe/ops/library.py`` combine. They materialise everything; they are the
readable definition, checked against autograd through ``cssfe/ops/reference.py`` and
``cssfe.losses.AsymmetricLoss`` in the tests.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ..reference import asymmetric_loss_with_grad

Tensor = torch.Tensor


def _opmath(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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


def attention_fwd(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    s = _scores(q, k)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    z = torch.einsum("bcn,bdn->bcd", p, v.to(p.dtype))
    return z.to(v.dtype), lse.float()


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


def enhance_fwd(z: Tensor, r: Tensor, groups: Tensor, w: Tensor) -> Tensor:
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


def enhance_bwd(grad, z, r, groups, w, out) -> Tuple[Tensor, Tensor, Tensor]:
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
