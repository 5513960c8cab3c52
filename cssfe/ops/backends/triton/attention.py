"""Class attention: Z0 = softmax_N(q k / sqrt(d)) v^T without storing the maps.

Two strategies, chosen by the feature width (``strategy_for``): up to ``FLASH_MAX_D`` the flash
kernels below; wider features go to attention_gemm.py (batched GEMMs and Triton row kernels, a chunk
of images at a time), because these kernels hold whole-width tiles on chip.

Flash forward: one program per (batch, block of classes) streams over N with an online softmax and
keeps the log-sum-exp. Backward: one kernel for dq (per class block, streaming over N) and one
for dk, dv (per position block, streaming over classes), both recomputing the probabilities.

LOWP: with fp16/bf16 inputs the matrix products take their operands in that dtype (tensor cores,
fp32 accumulation), as FlashAttention does; softmax statistics stay fp32. fp32 inputs use exact
fp32 products. The interpreter always runs fp32 (its bf16 products are wrong).
"""

import torch
import triton
import triton.language as tl

from ...overrides import overriding
from . import attention_gemm
from ._common import INTERPRET, launch, pow2

FLASH_MAX_D = 128  # wider features: attention_gemm
STRATEGIES = ("flash", "gemm")
_strategy_override = None  # while ``strategy`` is active


def strategy(name: str):
    """Use this strategy for every width inside the ``with`` block (tests and the GPU benchmark compare both)."""
    if name not in STRATEGIES:
        raise ValueError(f"class_attention: unknown triton strategy {name!r}, expected one of {STRATEGIES}")
    return overriding(globals(), "_strategy_override", name)


def strategy_for(d: int) -> str:
    if _strategy_override is not None:
        return _strategy_override
    return "flash" if d <= FLASH_MAX_D else "gemm"


@triton.jit
def _op(x, ref_ptr, LOWP: tl.constexpr):
    """Operand of a matrix product: the input dtype under LOWP, else fp32."""
    if LOWP:
        return x.to(ref_ptr.dtype.element_ty)
    else:
        return x.to(tl.float32)


@triton.jit
def _attn_fwd(q_ptr, k_ptr, v_ptr, z_ptr, lse_ptr, C, D, N, q_bstride, scale,
              BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, LOWP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * D * N, b * C * D pass 2^31 in big batches
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    cmask = offs_c < C
    dmask = offs_d < D
    q = _op(tl.load(q_ptr + b * q_bstride + offs_c[:, None] * D + offs_d[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0), k_ptr, LOWP)
    m_i = tl.full([BLOCK_C], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_C], tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    kv = b * D * N
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        kt = _op(tl.load(k_ptr + kv + offs_d[:, None] * N + offs_n[None, :],
                         mask=dmask[:, None] & nmask[None, :], other=0.0), k_ptr, LOWP)
        s = tl.dot(q, kt, input_precision="ieee") * scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = _op(tl.load(v_ptr + kv + offs_n[:, None] + offs_d[None, :] * N,
                         mask=nmask[:, None] & dmask[None, :], other=0.0), k_ptr, LOWP)
        acc = acc * alpha[:, None] + tl.dot(_op(p, k_ptr, LOWP), vt, input_precision="ieee")
        m_i = m_new
    z = acc / l_i[:, None]
    tl.store(z_ptr + b * C * D + offs_c[:, None] * D + offs_d[None, :], z.to(z_ptr.dtype.element_ty),
             mask=cmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + b * C + offs_c, m_i + tl.log(l_i), mask=cmask)


@triton.jit
def _attn_bwd_dq(q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, dq_ptr, C, D, N, q_bstride, scale,
                 BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, LOWP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * D * N, b * C * D pass 2^31 in big batches
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    cmask = offs_c < C
    dmask = offs_d < D
    cd_mask = cmask[:, None] & dmask[None, :]
    q = _op(tl.load(q_ptr + b * q_bstride + offs_c[:, None] * D + offs_d[None, :], mask=cd_mask, other=0.0), k_ptr, LOWP)
    g = _op(tl.load(g_ptr + b * C * D + offs_c[:, None] * D + offs_d[None, :], mask=cd_mask, other=0.0), k_ptr, LOWP)
    lse = tl.load(lse_ptr + b * C + offs_c, mask=cmask, other=0.0)
    delta = tl.load(delta_ptr + b * C + offs_c, mask=cmask, other=0.0)
    dq = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    kv = b * D * N
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        dn_mask = dmask[:, None] & nmask[None, :]
        kt = _op(tl.load(k_ptr + kv + offs_d[:, None] * N + offs_n[None, :], mask=dn_mask, other=0.0), k_ptr, LOWP)
        vt = _op(tl.load(v_ptr + kv + offs_d[:, None] * N + offs_n[None, :], mask=dn_mask, other=0.0), k_ptr, LOWP)
        s = tl.dot(q, kt, input_precision="ieee") * scale
        p = tl.where(cmask[:, None] & nmask[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(g, vt, input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(_op(ds, k_ptr, LOWP), tl.trans(kt), input_precision="ieee")
    tl.store(dq_ptr + b * C * D + offs_c[:, None] * D + offs_d[None, :], dq * scale, mask=cd_mask)


@triton.jit
def _attn_bwd_dkv(q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, C, D, N, q_bstride, scale,
                  BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, LOWP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * D * N, b * C * D pass 2^31 in big batches
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < N
    dmask = offs_d < D
    kv = b * D * N
    dn_mask = dmask[:, None] & nmask[None, :]
    kt = _op(tl.load(k_ptr + kv + offs_d[:, None] * N + offs_n[None, :], mask=dn_mask, other=0.0), k_ptr, LOWP)
    vt = _op(tl.load(v_ptr + kv + offs_d[:, None] * N + offs_n[None, :], mask=dn_mask, other=0.0), k_ptr, LOWP)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        cd_mask = cmask[:, None] & dmask[None, :]
        q = _op(tl.load(q_ptr + b * q_bstride + offs_c[:, None] * D + offs_d[None, :], mask=cd_mask, other=0.0), k_ptr, LOWP)
        g = _op(tl.load(g_ptr + b * C * D + offs_c[:, None] * D + offs_d[None, :], mask=cd_mask, other=0.0), k_ptr, LOWP)
        lse = tl.load(lse_ptr + b * C + offs_c, mask=cmask, other=0.0)
        delta = tl.load(delta_ptr + b * C + offs_c, mask=cmask, other=0.0)
        s = tl.dot(q, kt, input_precision="ieee") * scale
        p = tl.where(cmask[:, None] & nmask[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(_op(p, k_ptr, LOWP)), g, input_precision="ieee")
        dp = tl.dot(g, vt, input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(_op(ds, k_ptr, LOWP)), q, input_precision="ieee")
    out = kv + offs_n[:, None] + offs_d[None, :] * N
    mask = nmask[:, None] & dmask[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=mask)


_block_override = None  # (BLOCK_C, BLOCK_N, launch options) while block_config is active


def block_config(block_c: int, block_n: int, **launch):
    """Run the flash kernels with these class / position blocks and launch options (``num_warps``,
    ``num_stages``) inside the ``with`` block, for the block-size sweep of ``benchmarks/gpu_check/plan.py``;
    the feature block stays the whole width."""
    return overriding(globals(), "_block_override", (int(block_c), int(block_n), dict(launch)))


def _blocks(c, d, n):
    """(BLOCK_C, BLOCK_D, BLOCK_N) and launch options. The whole feature dimension sits in one block,
    so for wide features the position block shrinks and software pipelining is turned off: at
    d = 512 in fp32, BLOCK_N = 32 with three pipeline stages asks for ~320 KB of shared memory,
    more than an H100/H200 SM has (227 KB)."""
    bd = pow2(d)
    if _block_override is not None:
        bc, bn, launch = _block_override
        return bc, bd, bn, launch
    if INTERPRET:  # few, big programs: the interpreter's cost is per program
        return pow2(c, hi=128), bd, pow2(n, hi=256), {}
    if bd <= 128:
        return 16, bd, 64, {}
    if bd <= 256:
        return 16, bd, 32, {"num_stages": 1, "num_warps": 4}
    return 16, bd, 16, {"num_stages": 1, "num_warps": 8}


def _lowp(t):
    return t.dtype in (torch.float16, torch.bfloat16) and not INTERPRET


MAX_FP32_D = 512  # d = 768 in fp32 asked an H200 for 256 KB of shared memory in the backward (limit 227 KB)


def check_supported(d: int, dtype: torch.dtype) -> None:
    """The flash kernels hold the whole feature dimension in one block: wide fp32 features do not fit
    on chip (only reachable by forcing ``strategy("flash")``: wide features go to the GEMM strategy)."""
    if strategy_for(d) == "flash" and dtype in (torch.float32, torch.float64) and not INTERPRET and d > MAX_FP32_D:
        raise ValueError(
            f"class_attention: the triton flash kernels support d <= {MAX_FP32_D} for {dtype} inputs (shared memory), "
            f"got d={d}; use the default strategy (GEMM above d={FLASH_MAX_D}), float16/bfloat16 inputs or backend "
            f"'reference'")


def attention_fwd(q, k, v):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, D, N = k.shape
    if strategy_for(D) == "gemm":
        return attention_gemm.attention_fwd(q, k, v)
    check_supported(D, v.dtype)
    C = q.shape[1]
    z = torch.empty(B, C, D, dtype=v.dtype, device=v.device)
    lse = torch.empty(B, C, dtype=torch.float32, device=v.device)
    bc, bd, bn, options = _blocks(C, D, N)
    launch(_attn_fwd, (B, triton.cdiv(C, bc)), q, k, v, z, lse, C, D, N, 0 if q.shape[0] == 1 else C * D, D ** -0.5,
           BLOCK_C=bc, BLOCK_D=bd, BLOCK_N=bn, LOWP=_lowp(k), **options)
    return z, lse


def attention_bwd(grad_z, q, k, v, z, lse):
    B, D, N = k.shape
    g = grad_z.contiguous()
    delta = (g.float() * z.float()).sum(-1).contiguous()  # rowsum(dA * A) = rowsum(dz * z)
    lse = lse.float().contiguous()
    if strategy_for(D) == "gemm":
        return attention_gemm.attention_bwd(g, q, k, v, delta, lse)
    C = q.shape[1]
    dq = torch.empty(B, C, D, dtype=torch.float32, device=q.device)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    bc, bd, bn, options = _blocks(C, D, N)
    qs = 0 if q.shape[0] == 1 else C * D
    launch(_attn_bwd_dq, (B, triton.cdiv(C, bc)), q, k, v, g, lse, delta, dq, C, D, N, qs, D ** -0.5,
           BLOCK_C=bc, BLOCK_D=bd, BLOCK_N=bn, LOWP=_lowp(k), **options)
    launch(_attn_bwd_dkv, (B, triton.cdiv(N, bn)), q, k, v, g, lse, delta, dk, dv, C, D, N, qs, D ** -0.5,
           BLOCK_C=bc, BLOCK_D=bd, BLOCK_N=bn, LOWP=_lowp(k), **options)
    if q.shape[0] == 1:
        dq = dq.sum(0, keepdim=True)
    return dq.to(q.dtype), dk, dv
