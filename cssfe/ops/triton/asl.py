"""Asymmetric loss: each program reads a block of logits and targets once and writes the block's
gradient and partial loss sum (the partial sums are added on the host, deterministically)."""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET


@triton.jit
def _asl_kernel(x_ptr, t_ptr, g_ptr, part_ptr, n, gamma_pos, gamma_neg, clip, eps, scale,
                FOCAL: tl.constexpr, FOCAL_GRAD: tl.constexpr, CLIP: tl.constexpr, NEED_GRAD: tl.constexpr,
                BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(t_ptr + offs, mask=mask, other=0).to(tl.float32)
    p = 1.0 / (1.0 + tl.exp(-x))
    dp = p * (1.0 - p)
    xn = 1.0 - p
    dxn = -dp
    if CLIP:
        c = xn + clip
        dxn = tl.where(c <= 1.0, dxn, 0.0)
        xn = tl.minimum(c, 1.0)
    base = y * tl.log(tl.maximum(p, eps)) + (1.0 - y) * tl.log(tl.maximum(xn, eps))
    dbase = y * tl.where(p >= eps, 1.0 - p, 0.0) + (1.0 - y) * tl.where(xn >= eps, dxn / tl.maximum(xn, eps), 0.0)
    if FOCAL:
        pt = p * y + xn * (1.0 - y)
        ge = gamma_pos * y + gamma_neg * (1.0 - y)
        omp = 1.0 - pt
        w = tl.where(ge == 0.0, 1.0, tl.where(omp > 0.0, tl.exp2(ge * tl.log2(tl.maximum(omp, 1e-38))), 0.0))
        d = dbase * w
        if FOCAL_GRAD:
            dpt = y * dp + (1.0 - y) * dxn
            wm1 = tl.where(omp > 0.0, tl.exp2((ge - 1.0) * tl.log2(tl.maximum(omp, 1e-38))), tl.where(ge == 1.0, 1.0, 0.0))
            d = d + base * tl.where(ge == 0.0, 0.0, ge * wm1 * (-dpt))
        loss = -base * w
        g = -d
    else:
        loss = -base
        g = -dbase
    loss = tl.where(mask, loss, 0.0)
    tl.store(part_ptr + pid, tl.sum(loss, axis=0))
    if NEED_GRAD:
        tl.store(g_ptr + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=mask)


def asl(logits, targets, gamma_pos, gamma_neg, clip, eps, focal_grad, mean, need_grad):
    x = logits.contiguous()
    t = targets.contiguous()
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    n = x.numel()
    block = 4096 if INTERPRET else 1024
    grid = (max(triton.cdiv(n, block), 1),)
    part = torch.zeros(grid[0], dtype=torch.float32, device=x.device)
    grad = torch.empty_like(x) if need_grad else x.new_empty(0)
    scale = (1.0 / n if n else float("nan")) if mean else 1.0
    if n:
        _asl_kernel[grid](x, t, grad if need_grad else x, part, n, float(gamma_pos), float(gamma_neg), float(clip),
                          float(eps), scale, FOCAL=bool(gamma_pos > 0 or gamma_neg > 0), FOCAL_GRAD=bool(focal_grad),
                          CLIP=bool(clip > 0), NEED_GRAD=bool(need_grad), BLOCK=block)
    loss_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss = (part.to(torch.float64).sum() * scale).to(loss_dtype)
    return loss, grad
