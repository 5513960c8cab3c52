"""Class attention for wide features: the matrix products as batched GEMMs (cuBLAS on a GPU), the
softmax and its gradient as Triton row kernels, a chunk of images at a time.

Why: the flash kernels (attention.py) keep a [BLOCK_C, d] tile of q and of each accumulator on chip,
so at d = 512 they run on 16 x 16 tiles and fp32 does not fit beyond d = 512. Here each chunk's
scores [b, C, N] go through global memory instead. With C < d they are smaller than the chunk's
keys, so the extra traffic is small next to K and V, and the products run at GEMM speed at any d.

The maps are still never kept for backward: only z and the log-sum-exp are saved, and the backward
recomputes the scores. Scratch memory is bounded by ``SCRATCH_BYTES`` whatever the batch.

Precision as the flash kernels: scores and their gradients in fp32 (fp16/bf16 GEMMs accumulate and
write fp32), probabilities and score gradients rounded to the input dtype as GEMM operands.
"""

import torch
import triton
import triton.language as tl

from ...overrides import overriding
from ._common import INTERPRET, launch, pow2

SCRATCH_BYTES = 32 << 20  # per chunk: fp32 scores and score gradients plus their input-dtype copies
_HALF_BMM_TO_F32 = "dtype" in torch.ops.aten.bmm.overloads()  # bmm(..., out_dtype=) (CUDA, torch >= 2.8)


@triton.jit
def _softmax_rows(s_ptr, p_ptr, lse_ptr, R, N, scale, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """p = softmax(scale * s) per row of N, and its log-sum-exp; rows [R, N] contiguous."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # R * N may pass 2**31
    rmask = rows < R
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (offs_n < N)[None, :]
        s = tl.load(s_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past R stay -inf
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(tl.where(rmask, l_i, 1.0))  # rows past R: no log(0)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (offs_n < N)[None, :]
        s = tl.load(s_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32) * scale
        p = tl.exp(s - lse[:, None])
        tl.store(p_ptr + rows[:, None] * N + offs_n[None, :], p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_grad_rows(s_ptr, dp_ptr, lse_ptr, delta_ptr, p_ptr, ds_ptr, R, N, scale,
                       BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """p = exp(scale * s - lse) (recomputed) and ds = p * (dp - delta), per row (the 1/sqrt(d) of the
    scores is applied by the GEMMs that use ds, so small gradients are not scaled before rounding)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = rows < R
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=rmask, other=0.0)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (offs_n < N)[None, :]
        at = rows[:, None] * N + offs_n[None, :]
        s = tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
        dp = tl.load(dp_ptr + at, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(s * scale - lse[:, None])
        tl.store(p_ptr + at, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(ds_ptr + at, (p * (dp - delta[:, None])).to(ds_ptr.dtype.element_ty), mask=mask)


def _launch_rows(kernel, rows, n, scale, *tensors):
    """One program per block of rows: about 4K elements each on a GPU; few, big programs in the
    interpreter (its cost is per program)."""
    bn = pow2(n, hi=1024)
    br = 64 if INTERPRET else max(1, 4096 // bn)
    launch(kernel, (triton.cdiv(rows, br),), *tensors, rows, n, scale, BLOCK_R=br, BLOCK_N=bn)


def _bmm_scores(a, b):
    """a @ b for scores and score gradients: fp32 (fp64 for fp64 inputs); half-precision operands
    stay half on a GPU (fp32 accumulation and output)."""
    if a.dtype in (torch.float16, torch.bfloat16):
        if a.is_cuda and _HALF_BMM_TO_F32:
            return torch.bmm(a, b, out_dtype=torch.float32)
        return torch.bmm(a.float(), b.float())  # CPU tensors (the interpreter) or an older torch
    return torch.bmm(a, b)


def _score_bytes(dtype):
    return 8 if dtype == torch.float64 else 4


def chunk_images(b, per_image_bytes):
    """Images per chunk so that a chunk's scratch (``per_image_bytes`` each) fits ``SCRATCH_BYTES``."""
    return max(1, min(b, SCRATCH_BYTES // max(1, per_image_bytes)))


def scratch_bytes(limit: int):
    """Run with another scratch bound inside the ``with`` block (tests use it to force several chunks)."""
    return overriding(globals(), "SCRATCH_BYTES", int(limit))


def _bmm_into(out, a, b, alpha=1.0):
    """out = alpha * a @ b, written in place where the dtypes allow (no temporary of out's size)."""
    if a.dtype == out.dtype:
        torch.baddbmm(out, a, b, beta=0, alpha=alpha, out=out)  # beta=0: out's old contents are ignored
    else:
        out.copy_(torch.bmm(a, b).mul_(alpha))


def _operand(t):
    """GEMM operand: as it is on a GPU, fp32 in the interpreter (its bf16 products are wrong, and the
    probabilities there are fp32)."""
    return t.float() if INTERPRET else t


def _no_autocast(device):
    """The products must run in the dtypes chosen here, also when the caller is under autocast."""
    return torch.autocast(device.type, enabled=False)


def attention_fwd(q, k, v):
    """q [1 or B, C, d], k and v [B, d, N] -> z [B, C, d] (v's dtype), lse [B, C] fp32."""
    B, D, N = k.shape
    C = q.shape[1]
    z = torch.empty(B, C, D, dtype=v.dtype, device=v.device)
    lse = torch.empty(B, C, dtype=torch.float32, device=v.device)
    p_dtype = torch.float32 if INTERPRET else v.dtype
    step = chunk_images(B, C * N * (_score_bytes(v.dtype) + p_dtype.itemsize))
    with _no_autocast(v.device):
        for b0 in range(0, B, step):
            b1 = min(B, b0 + step)
            qb = q.expand(b1 - b0, C, D) if q.shape[0] == 1 else q[b0:b1]
            s = _bmm_scores(qb, k[b0:b1])  # [b, C, N]
            p = torch.empty(s.shape, dtype=p_dtype, device=v.device)
            _launch_rows(_softmax_rows, (b1 - b0) * C, N, D ** -0.5, s, p, lse[b0:b1])
            del s
            _bmm_into(z[b0:b1], p, _operand(v[b0:b1]).transpose(1, 2))
            del p  # before the next chunk allocates its own
    return z, lse


def attention_bwd(grad_z, q, k, v, delta, lse):
    """Gradients of attention_fwd: dq (q's shape and dtype), dk, dv; delta [B, C] = rowsum(grad_z * z)
    and lse [B, C], both fp32 and contiguous, come from attention.attention_bwd."""
    B, D, N = k.shape
    C = q.shape[1]
    scale = D ** -0.5
    shared = q.shape[0] == 1
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dq = torch.zeros(1, C, D, dtype=torch.float32, device=q.device) if shared else torch.empty_like(q)
    p_dtype = torch.float32 if INTERPRET else v.dtype
    # per image: scores and their gradient, p and ds, and (shared q) the image's fp32 dq partial
    per_image = C * N * 2 * (_score_bytes(v.dtype) + p_dtype.itemsize) + (4 * C * D if shared else 0)
    step = chunk_images(B, per_image)
    with _no_autocast(v.device):
        for b0 in range(0, B, step):
            b1 = min(B, b0 + step)
            qb = q.expand(b1 - b0, C, D) if shared else q[b0:b1]
            g = grad_z[b0:b1]
            s = _bmm_scores(qb, k[b0:b1])
            dp = _bmm_scores(g, v[b0:b1])
            p = torch.empty(s.shape, dtype=p_dtype, device=v.device)
            ds = torch.empty(s.shape, dtype=p_dtype, device=v.device)
            _launch_rows(_softmax_grad_rows, (b1 - b0) * C, N, scale, s, dp, lse[b0:b1], delta[b0:b1], p, ds)
            del s, dp
            _bmm_into(dv[b0:b1], _operand(g).transpose(1, 2), p)
            _bmm_into(dk[b0:b1], _operand(qb).transpose(1, 2), ds, alpha=scale)
            kt = _operand(k[b0:b1]).transpose(1, 2)
            if shared:  # one fp32 partial per chunk, summed over its images
                dq += _bmm_scores(ds, kt).sum(0, keepdim=True)
            else:
                _bmm_into(dq[b0:b1], ds, kt, alpha=scale)
            del p, ds
    if shared:
        dq.mul_(scale)
    return dq.to(q.dtype), dk, dv
