"""Progressive head -> medium -> tail enhancement, all three group stages in one launch.

One program per (batch, block of L): classes are visited in group order (``order``; group g holds
positions [lo_g, hi_g)); stage g reads the rows that earlier stages wrote (a barrier separates
the stages) and the original z for the rest. The backward runs the stages in reverse and pushes
each message's gradient to its sources (the earlier groups' outputs, or z); each program writes
its share of the gate gradient to a row of its own, and the rows are summed in a fixed order (as the
CUDA kernel does), so the gradient is the same bits in every run."""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, launch, pow2


@triton.jit
def _group_range(g: tl.constexpr, s1, s2, C):
    if g == 0:
        lo = 0
        hi = s1
    elif g == 1:
        lo = s1
        hi = s2
    else:
        lo = s2
        hi = C
    return lo, hi


@triton.jit
def _sources_end(r_ptr, order_ptr, g: tl.constexpr, earlier_only, lo, hi, C, BLOCK_C: tl.constexpr):
    """Where the sources of stage g, positions [lo, hi), end: C if one of its rows takes something
    from the positions from lo on (its own or a later group), else lo. Under the distribution-aware
    mask R is zero there, and the loops over sources stop at lo (about a third of the products with
    three equal groups); the check reads that part of R once per stage and program, unless bit g of
    earlier_only says the caller knows already. As in the CPU and CUDA kernels, sources behind zero
    affinities are then not multiplied: a NaN or inf there reaches no output through them (the
    reference's 0 * inf = NaN does)."""
    nonzero = 0
    check_end = hi - ((earlier_only >> g) & 1) * (hi - lo)  # lo: no rows to check
    for i0 in range(lo, check_end, BLOCK_C):
        pi = i0 + tl.arange(0, BLOCK_C)
        imask = pi < hi
        ci = tl.load(order_ptr + pi, mask=imask, other=0)
        for j0 in range(lo, C, BLOCK_C):
            pj = j0 + tl.arange(0, BLOCK_C)
            jmask = pj < C
            cj = tl.load(order_ptr + pj, mask=jmask, other=0)
            r = tl.load(r_ptr + ci[:, None] * C + cj[None, :], mask=imask[:, None] & jmask[None, :], other=0.0)
            # a NaN counts (it must reach the output); max, not a count that could overflow
            nonzero = tl.maximum(nonzero, tl.max((r != 0.0).to(tl.int32)))
    return tl.where(nonzero > 0, C, lo)


@triton.jit
def _message(z_ptr, out_ptr, r_ptr, order_ptr, ci, imask, lo, end, base, C, L, offs_l, lmask,
             BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """sum_j R[ci, j] s_j for a block of classes over the positions j < end (_sources_end),
    s_j = out_j for positions < lo, else z_j."""
    acc = tl.zeros([BLOCK_C, BLOCK_L], tl.float32)
    for j0 in range(0, end, BLOCK_C):
        pj = j0 + tl.arange(0, BLOCK_C)
        jmask = pj < C
        cj = tl.load(order_ptr + pj, mask=jmask, other=0)
        r = tl.load(r_ptr + ci[:, None] * C + cj[None, :], mask=imask[:, None] & jmask[None, :], other=0.0)
        rows = base + cj[:, None] * L + offs_l[None, :]
        early = (jmask & (pj < lo))[:, None] & lmask[None, :]
        late = (jmask & (pj >= lo))[:, None] & lmask[None, :]
        s = tl.load(out_ptr + rows, mask=early, other=0.0) + tl.load(z_ptr + rows, mask=late, other=0.0).to(tl.float32)
        acc += tl.dot(r, s, input_precision="ieee")
    return acc


# earlier_only changes from 0 to known flags at a model's second step: one compiled kernel for both
@triton.jit(do_not_specialize=["earlier_only"])
def _enhance_fwd(z_ptr, r_ptr, order_ptr, w_ptr, rs_ptr, out_ptr, C, L, s1, s2, earlier_only,
                 BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * C * L passes 2^31 in big batches
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    lmask = offs_l < L
    base = b * C * L
    for g in tl.static_range(3):
        lo, hi = _group_range(g, s1, s2, C)
        end = _sources_end(r_ptr, order_ptr, g, earlier_only, lo, hi, C, BLOCK_C)
        for i0 in range(lo, hi, BLOCK_C):
            pi = i0 + tl.arange(0, BLOCK_C)
            imask = pi < hi
            ci = tl.load(order_ptr + pi, mask=imask, other=0)
            m = _message(z_ptr, out_ptr, r_ptr, order_ptr, ci, imask, lo, end, base, C, L, offs_l, lmask,
                         BLOCK_C, BLOCK_L)
            w = tl.load(w_ptr + b * C + ci, mask=imask, other=0.0)
            rs = tl.load(rs_ptr + ci, mask=imask, other=0.0)
            rows = base + ci[:, None] * L + offs_l[None, :]
            mask = imask[:, None] & lmask[None, :]
            zi = tl.load(z_ptr + rows, mask=mask, other=0.0).to(tl.float32)
            new = (zi + w[:, None] * m) / (1.0 + w * rs)[:, None]
            tl.store(out_ptr + rows, new, mask=mask)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["earlier_only"])
def _enhance_bwd(z_ptr, r_ptr, order_ptr, w_ptr, rs_ptr, out_ptr, acc_ptr, dz_ptr, dm_ptr, dw_part_ptr, C, L, s1, s2,
                 earlier_only, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * C * L passes 2^31 in big batches
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    lmask = offs_l < L
    base = b * C * L
    for gg in tl.static_range(3):
        lo, hi = _group_range(2 - gg, s1, s2, C)
        end = _sources_end(r_ptr, order_ptr, 2 - gg, earlier_only, lo, hi, C, BLOCK_C)
        # (a) the group's own rows: their output gradient is complete now.
        for i0 in range(lo, hi, BLOCK_C):
            pi = i0 + tl.arange(0, BLOCK_C)
            imask = pi < hi
            ci = tl.load(order_ptr + pi, mask=imask, other=0)
            m = _message(z_ptr, out_ptr, r_ptr, order_ptr, ci, imask, lo, end, base, C, L, offs_l, lmask,
                         BLOCK_C, BLOCK_L)
            w = tl.load(w_ptr + b * C + ci, mask=imask, other=0.0)
            rs = tl.load(rs_ptr + ci, mask=imask, other=0.0)
            den = 1.0 + w * rs
            rows = base + ci[:, None] * L + offs_l[None, :]
            mask = imask[:, None] & lmask[None, :]
            gi = tl.load(acc_ptr + rows, mask=mask, other=0.0)
            o = tl.load(out_ptr + rows, mask=mask, other=0.0)
            tl.store(dz_ptr + rows, tl.load(dz_ptr + rows, mask=mask, other=0.0) + gi / den[:, None], mask=mask)
            tl.store(dm_ptr + rows, gi * (w / den)[:, None], mask=mask)
            # this program's share of d w (its columns); each class is one stage's row once, so a plain
            # store: the partial sums are added in a fixed order afterwards (no atomics, reproducible)
            part = tl.sum(gi * (m - rs[:, None] * o), axis=1) / den
            tl.store(dw_part_ptr + (b * tl.num_programs(1) + tl.program_id(1)) * C + ci, part, mask=imask)
        tl.debug_barrier()
        # (b) send the message gradients to their sources (none past end).
        for j0 in range(0, end, BLOCK_C):
            pj = j0 + tl.arange(0, BLOCK_C)
            jmask = pj < C
            cj = tl.load(order_ptr + pj, mask=jmask, other=0)
            t = tl.zeros([BLOCK_C, BLOCK_L], tl.float32)
            for i0 in range(lo, hi, BLOCK_C):
                pi = i0 + tl.arange(0, BLOCK_C)
                imask = pi < hi
                ci = tl.load(order_ptr + pi, mask=imask, other=0)
                rt = tl.load(r_ptr + ci[None, :] * C + cj[:, None], mask=jmask[:, None] & imask[None, :], other=0.0)
                dmi = tl.load(dm_ptr + base + ci[:, None] * L + offs_l[None, :], mask=imask[:, None] & lmask[None, :],
                              other=0.0)
                t += tl.dot(rt, dmi, input_precision="ieee")
            rows = base + cj[:, None] * L + offs_l[None, :]
            early = (jmask & (pj < lo))[:, None] & lmask[None, :]
            late = (jmask & (pj >= lo))[:, None] & lmask[None, :]
            tl.store(acc_ptr + rows, tl.load(acc_ptr + rows, mask=early, other=0.0) + t, mask=early)
            tl.store(dz_ptr + rows, tl.load(dz_ptr + rows, mask=late, other=0.0) + t, mask=late)
        tl.debug_barrier()


def _blocks(C, L):
    if INTERPRET:
        return pow2(C, hi=128), pow2(L, hi=256)
    return 32, 64


def enhance_fwd(z, r, order, bounds, w, earlier_only=0):
    B, C, L = z.shape
    s1, s2 = int(bounds[1]), int(bounds[2])
    order = order.to(z.device)
    rs = r.sum(1).contiguous()
    out = torch.empty(B, C, L, dtype=torch.float32, device=z.device)
    bc, bl = _blocks(C, L)
    launch(_enhance_fwd, (B, triton.cdiv(L, bl)), z, r, order, w, rs, out, C, L, s1, s2, int(earlier_only),
           BLOCK_C=bc, BLOCK_L=bl)
    return out.to(z.dtype)


def enhance_bwd(grad, z, r, order, bounds, w, out, earlier_only=0):
    B, C, L = z.shape
    s1, s2 = int(bounds[1]), int(bounds[2])
    order = order.to(z.device)
    rs = r.sum(1).contiguous()
    of = out.float().contiguous()
    acc = grad.float().clone().contiguous()
    dz = torch.zeros(B, C, L, dtype=torch.float32, device=z.device)
    dm = torch.zeros(B, C, L, dtype=torch.float32, device=z.device)
    bc, bl = _blocks(C, L)
    grid = (B, triton.cdiv(L, bl))
    dw_part = torch.empty(B, grid[1], C, dtype=torch.float32, device=z.device)  # one row per program
    launch(_enhance_bwd, grid, z, r, order, w, rs, of, acc, dz, dm, dw_part, C, L, s1, s2, int(earlier_only),
           BLOCK_C=bc, BLOCK_L=bl)
    return dz.to(z.dtype), dm, dw_part.sum(1)
