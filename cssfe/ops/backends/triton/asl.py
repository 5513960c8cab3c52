"""Asymmetric loss: each program reads a block of logits and targets once and writes the block's
gradient and partial loss sum; a one-program kernel adds the partial sums in a fixed order
(deterministic) and writes the loss.

The math follows ``csrc/asl_element.h``: with integer gammas (compile-time constants here), a
block whose targets are all 0/1 takes the branch-free form (one exp, one log, one division,
powers by multiplication); a block holding any other target value also computes the general
form and uses it for those elements.
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, launch


@triton.jit
def _pow_const(base, K: tl.constexpr):
    """base ** K for a compile-time integer K >= 0, by multiplication (0 ** 0 = 1)."""
    r = base * 0.0 + 1.0
    for _ in tl.static_range(K):
        r = r * base
    return r


@triton.jit
def _binary_form(x, pos, clip, eps, GAMMA_POS: tl.constexpr, GAMMA_NEG: tl.constexpr, FOCAL_GRAD: tl.constexpr):
    """asl_binary_element: (loss, d loss / d x) of 0/1 targets (pos: target is 1)."""
    e = tl.exp(-tl.abs(x))  # no overflow
    inv = 1.0 / (1.0 + e)
    p = tl.where(x >= 0.0, inv, e * inv)  # sigmoid(x)
    q = tl.where(x >= 0.0, e * inv, inv)  # 1 - sigmoid(x), without cancellation
    dp = p * q
    c = q + clip  # shifted negative probability, clamped at 1 (no gradient past it)
    xn = tl.where(c > 1.0, 1.0, c)  # not tl.minimum, which may drop a NaN
    dxn = tl.where(c > 1.0, 0.0, -dp)
    a = tl.where(pos, p, xn)  # the probability whose log this element adds
    # max(a, eps) as torch.clamp takes it: a NaN logit's NaN passes, so its loss and gradient are NaN
    clamped = a < eps
    base = tl.log(tl.where(clamped, eps, a))
    dbase = tl.where(clamped, 0.0, tl.where(pos, q, dxn / tl.where(clamped, 1.0, a)))
    w = tl.where(pos, _pow_const(q, GAMMA_POS), _pow_const(1.0 - xn, GAMMA_NEG))
    g = -dbase * w
    if FOCAL_GRAD:
        da = tl.where(pos, dp, dxn)
        dw_pos = q * 0.0
        dw_neg = q * 0.0
        if GAMMA_POS > 0:
            dw_pos = GAMMA_POS * _pow_const(q, GAMMA_POS - 1)
        if GAMMA_NEG > 0:
            dw_neg = GAMMA_NEG * _pow_const(1.0 - xn, GAMMA_NEG - 1)
        g = g + base * tl.where(pos, dw_pos, dw_neg) * da
    return -base * w, g


@triton.jit
def _general_form(x, y, gamma_pos, gamma_neg, clip, eps, FOCAL: tl.constexpr, FOCAL_GRAD: tl.constexpr,
                  CLIP: tl.constexpr):
    """asl_element: (loss, d loss / d x) for any target in [0, 1] and any gammas."""
    p = 1.0 / (1.0 + tl.exp(-x))
    dp = p * (1.0 - p)
    xn = 1.0 - p
    dxn = -dp
    if CLIP:
        c = xn + clip
        dxn = tl.where(c <= 1.0, dxn, 0.0)
        xn = tl.where(c > 1.0, 1.0, c)
    # the clamps as where(), not tl.minimum / tl.maximum (which may drop a NaN): a NaN logit's loss
    # and gradient are NaN
    p_clamped, xn_clamped = p < eps, xn < eps
    base = y * tl.log(tl.where(p_clamped, eps, p)) + (1.0 - y) * tl.log(tl.where(xn_clamped, eps, xn))
    dbase = (y * tl.where(p_clamped, 0.0, 1.0 - p)
             + (1.0 - y) * tl.where(xn_clamped, 0.0, dxn / tl.where(xn_clamped, 1.0, xn)))
    if FOCAL:
        pt = p * y + xn * (1.0 - y)
        ge = gamma_pos * y + gamma_neg * (1.0 - y)
        omp = 1.0 - pt
        # FLT_MIN: Triton types a float literal outside fp32's normal range (1e-38) as fp64, which
        # made the whole form fp64 and the binary branch's types disagree (a compile error on a GPU)
        lo = tl.maximum(omp, 1.1754943508222875e-38)
        w = tl.where(ge == 0.0, 1.0, tl.where(omp > 0.0, tl.exp2(ge * tl.log2(lo)), 0.0))
        d = dbase * w
        if FOCAL_GRAD:
            dpt = y * dp + (1.0 - y) * dxn
            wm1 = tl.where(omp > 0.0, tl.exp2((ge - 1.0) * tl.log2(lo)), tl.where(ge == 1.0, 1.0, 0.0))
            d = d + base * tl.where(ge == 0.0, 0.0, ge * wm1 * (-dpt))
        loss = -base * w
        g = -d
    else:
        loss = -base
        g = -dbase
    return loss, g


@triton.jit
def _asl_kernel(x_ptr, t_ptr, g_ptr, part_ptr, n, gamma_pos, gamma_neg, clip, eps, scale,
                FOCAL: tl.constexpr, FOCAL_GRAD: tl.constexpr, CLIP: tl.constexpr, NEED_GRAD: tl.constexpr,
                BINARY: tl.constexpr, BOOL_TARGETS: tl.constexpr, GAMMA_POS: tl.constexpr, GAMMA_NEG: tl.constexpr,
                BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(t_ptr + offs, mask=mask, other=0).to(tl.float32)
    if BINARY:
        loss, g = _binary_form(x, y != 0.0, clip, eps, GAMMA_POS, GAMMA_NEG, FOCAL_GRAD)
        if not BOOL_TARGETS:  # bool targets are 0/1: no check (a block-wide reduction) needed
            soft = (y != 0.0) & (y != 1.0)
            if tl.max(soft.to(tl.int32), axis=0) > 0:  # rare: a block with soft targets
                loss_s, g_s = _general_form(x, y, gamma_pos, gamma_neg, clip, eps, FOCAL, FOCAL_GRAD, CLIP)
                loss = tl.where(soft, loss_s, loss)
                g = tl.where(soft, g_s, g)
    else:
        loss, g = _general_form(x, y, gamma_pos, gamma_neg, clip, eps, FOCAL, FOCAL_GRAD, CLIP)
    loss = tl.where(mask, loss, 0.0)
    tl.store(part_ptr + pid, tl.sum(loss, axis=0))
    if NEED_GRAD:
        tl.store(g_ptr + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_kernel(part_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    """out = scale * sum(part) in float64, the same order every time."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + offs, mask=offs < n, other=0.0).to(tl.float64)
    tl.store(out_ptr, (tl.sum(acc, axis=0) * scale).to(out_ptr.dtype.element_ty))


@triton.jit
def _scale_kernel(g_ptr, s_ptr, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """g *= s in place, s read on the device; nothing is read or written when s is 1."""
    s = tl.load(s_ptr).to(ACC)
    if s != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask).to(ACC)
        tl.store(g_ptr + offs, (g * s).to(g_ptr.dtype.element_ty), mask=mask)


def asl_scale_grad_(grad, scale):
    """The ASL backward in place: grad *= scale (the 0-d incoming loss gradient); see _scale_kernel."""
    n = grad.numel()
    if n:
        block = 4096 if INTERPRET else 2048
        acc = tl.float64 if grad.dtype == torch.float64 else tl.float32
        launch(_scale_kernel, (triton.cdiv(n, block),), grad, scale, n, BLOCK=block, ACC=acc)


def _small_int(v: float) -> bool:
    return 0 <= v < 16 and float(v) == int(v)


def asl(logits, targets, gamma_pos, gamma_neg, clip, eps, focal_grad, mean, need_grad):
    x = logits.contiguous()
    t = targets.contiguous()
    bool_targets = t.dtype == torch.bool
    if bool_targets:
        t = t.view(torch.uint8)
    n = x.numel()
    block = 4096 if INTERPRET else 1024
    grid = (max(triton.cdiv(n, block), 1),)
    part = torch.empty(grid[0], dtype=torch.float32, device=x.device)
    grad = torch.empty_like(x) if need_grad else x.new_empty(0)
    scale = (1.0 / n if n else float("nan")) if mean else 1.0
    binary = _small_int(gamma_pos) and _small_int(gamma_neg) and 1.1754943508222875e-38 <= eps <= 1.0 and 0 <= clip < 1e30
    loss = torch.empty((), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    if n:
        launch(_asl_kernel, grid, x, t, grad if need_grad else x, part, n, float(gamma_pos), float(gamma_neg),
               float(clip), float(eps), scale, FOCAL=bool(gamma_pos > 0 or gamma_neg > 0), FOCAL_GRAD=bool(focal_grad),
               CLIP=bool(clip > 0), NEED_GRAD=bool(need_grad), BINARY=binary, BOOL_TARGETS=bool_targets,
               GAMMA_POS=int(gamma_pos) if binary else 0, GAMMA_NEG=int(gamma_neg) if binary else 0, BLOCK=block)
    else:
        part.zero_()
    launch(_sum_kernel, (1,), part, loss, grid[0], scale, BLOCK=1024)
    return loss, grad
