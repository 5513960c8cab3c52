"""The cssfe operators, defined once with ``torch.library`` (namespace ``cssfe``).

Each operator takes the concrete backend name as its last argument and calls that backend's
kernel (``reference``, ``cpu``/``cuda`` via the extension's ``cssfe::native_*`` operators,
``triton``). Every operator has a fake (meta) implementation, so ``torch.compile`` traces it as
one opaque node, and its autograd formula is registered with ``register_autograd`` and calls the
matching backward operator. The public functions (``cssfe.ops.class_attention`` ...) validate
their inputs, pick the backend (``cssfe.ops.dispatch``) and call ``asymmetric_loss``,
``class_attention`` and ``progressive_enhance`` here: under ``torch.compile`` these go through the
registered operators; in eager mode through ``autograd.Function`` wrappers of the same kernel and
gradient functions, because the Python custom-op layer costs about 0.1 ms of host time per forward
+ backward, more than the kernel itself at typical loss sizes.

Operators:

- ``cssfe::asymmetric_loss(logits, targets, gamma_pos, gamma_neg, clip, eps, focal_grad, mean,
  need_grad, backend) -> (loss, grad)``: loss and d loss / d logits in one pass;
- ``cssfe::class_attention(q[Bq,C,d], k[B,d,N], v[B,d,N], backend) -> (z[B,C,d], lse[B,C])``
  and ``cssfe::class_attention_backward(grad_z, q, k, v, z, lse, backend) -> (dq, dk, dv)``;
- ``cssfe::progressive_enhance(z, affinity, groups, gate, lam, backend) -> out`` and
  ``cssfe::progressive_enhance_backward(grad, z, affinity, groups, gate, lam, out, backend)
  -> (dz, dm, dw)`` (dm: gradient of each class's message, dw: of ``lam * gate``).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.utils.weak

from .backends import reference_impl
from .overrides import overriding

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- backend tables
def _native():
    from .backends import native

    mod, reason = native.load()
    if mod is None:
        raise RuntimeError(f"cssfe C++ extension is not available: {reason}")
    return torch.ops.cssfe


def _triton():
    from . import triton as triton_ops  # imported lazily: TRITON_INTERPRET must be set before

    return triton_ops


# The native enhancement's two strategies: "block", the one-launch kernel of each device
# (csrc/cpu/enhance.cpp, csrc/cuda/enhance.cu), and "staged", three stages of batched matrix
# products in ATen (csrc/enhance_staged.cpp; cuBLAS on a GPU). The CUDA block program reads the whole
# affinity per tile of columns and its tiles narrow as C grows: on an H200 it was the fastest at 80
# classes, slower than eager from 320 on. The switch point below has not been measured against the
# staged strategy yet (benchmarks/gpu_check.py times both: providers cuda_block and cuda_staged).
NATIVE_ENHANCE_STRATEGIES = ("block", "staged")
STAGED_MIN_CLASSES = {"cpu": None, "cuda": 256}  # None: always the block kernel (fast on CPU at every C)
_native_enhance_override = None  # while native_enhance_strategy is active


def native_enhance_strategy(name: str):
    """Use this strategy for the cpu and cuda backends' enhancement inside the ``with`` block (tests
    and the GPU benchmark compare both); wrap the forward and the backward."""
    if name not in NATIVE_ENHANCE_STRATEGIES:
        raise ValueError(f"progressive_enhance: unknown native strategy {name!r}, expected one of "
                         f"{NATIVE_ENHANCE_STRATEGIES}")
    return overriding(globals(), "_native_enhance_override", name)


def native_enhance_strategy_for(backend: str, classes: int) -> str:
    if _native_enhance_override is not None:
        return _native_enhance_override
    threshold = STAGED_MIN_CLASSES.get(backend)
    return "staged" if threshold is not None and classes >= threshold else "block"


def _native_enhance(backend: str, classes: int):
    """(forward, backward) native operators of the enhancement strategy for this backend and C."""
    ops = _native()
    if native_enhance_strategy_for(backend, classes) == "staged":
        return ops.native_enhance_staged_fwd, ops.native_enhance_staged_bwd
    return ops.native_enhance_fwd, ops.native_enhance_bwd


# groups tensor -> (its version, order, bounds). The model passes the same groups buffer every step,
# and computing the plan reads group counts back from the device: a synchronisation that would make
# the host wait for all queued GPU work in every forward and backward.
_PLANS: "torch.utils.weak.WeakIdKeyDictionary" = torch.utils.weak.WeakIdKeyDictionary()


def _enhance_plan(groups: Tensor) -> Tuple[Tensor, Tensor]:
    """(order, bounds): classes sorted by group (stable) and where each group starts and ends;
    cached per groups tensor until it is modified in place."""
    version = _version(groups)
    cached = _PLANS.get(groups) if version is not None else None
    if cached is not None and cached[0] == version:
        return cached[1], cached[2]
    g = groups.to(torch.long)
    # one read-back for the check and the counts: buckets g < 0, 0, 1, 2, g > 2
    counts = torch.bincount((g + 1).clamp(0, 4), minlength=5).cpu()
    if counts[0] or counts[4]:
        raise ValueError(f"progressive_enhance: groups must hold 0 (head), 1 (medium) or 2 (tail), got values "
                         f"in [{int(g.min())}, {int(g.max())}]")
    order = torch.sort(g, stable=True).indices.contiguous()
    bounds = torch.zeros(4, dtype=torch.long)
    bounds[1:] = torch.cumsum(counts[1:4], 0)
    if version is not None:
        _PLANS[groups] = (version, order, bounds)
    return order, bounds  # bounds stays on the CPU: kernels read it as launch parameters


# affinity tensor -> [its version, groups, groups' version, stages bitmask or None]. See _earlier_only.
_STAGE_SOURCES: "torch.utils.weak.WeakIdKeyDictionary" = torch.utils.weak.WeakIdKeyDictionary()


def _earlier_only(affinity: Tensor, groups: Tensor, order: Tensor, bounds: Tensor, forward: bool) -> int:
    """Bit g set: stage g's rows take nothing from their own group or a later one (R is zero there,
    as under the distribution-aware mask), so the kernels skip those sources without looking at R.

    Known per affinity tensor: the first forward that sees it records it; the second that sees it
    unchanged (same version, same groups) reads the flags back from the device, once; later calls,
    backward included, reuse them. The model's fixed affinity (a buffer) is analysed once; an affinity
    that is new in every call (computed from embeddings that learn) is never read back, and gets 0:
    the kernels then check R themselves, or (the staged strategy) multiply the zeros."""
    version, groups_version = _version(affinity), _version(groups)
    if version is None or groups_version is None:
        return 0
    entry = _STAGE_SOURCES.get(affinity)
    if entry is not None and entry[0] == version and entry[1] is groups and entry[2] == groups_version:
        if entry[3] is not None or not forward:
            return entry[3] or 0
        if affinity.is_cuda and torch.cuda.is_current_stream_capturing():
            return 0  # no read-back inside a CUDA graph capture
        entry[3] = _analyse_stage_sources(affinity, order, bounds)
        return entry[3]
    if forward:
        _STAGE_SOURCES[affinity] = [version, groups, groups_version, None]
    return 0


def _analyse_stage_sources(affinity: Tensor, order: Tensor, bounds: Tensor) -> int:
    rp = affinity.index_select(0, order).index_select(1, order)
    b = [int(x) for x in bounds]
    # != 0 counts a NaN as a source: it must reach the output, through the checking path
    later = torch.stack([(rp[b[g]:b[g + 1], b[g]:] != 0).any() for g in range(3)]).tolist()  # one read-back
    return sum(1 << g for g in range(3) if not later[g])


def _version(t: Tensor):
    """The in-place version counter of ``t``; None for inference tensors, which have none."""
    try:
        return t._version
    except RuntimeError:
        return None


def _w(gate: Tensor, lam: Tensor) -> Tensor:
    ct = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (lam.to(ct) * gate.to(ct)).contiguous()


def _aux_dtype(z: Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- ASL
def _asl_kernel(logits: Tensor, targets: Tensor, gamma_pos: float, gamma_neg: float, clip: float, eps: float,
                focal_grad: bool, mean: bool, need_grad: bool, backend: str) -> Tuple[Tensor, Tensor]:
    args = (gamma_pos, gamma_neg, clip, eps, focal_grad, mean, need_grad)
    if backend == "reference":
        return reference_impl.asl(logits, targets, *args)
    if backend in ("cpu", "cuda"):
        return _native().native_asl(logits.contiguous(), targets.contiguous(), *args)
    if backend == "triton":
        return _triton().asl(logits, targets, *args)
    raise ValueError(f"cssfe::asymmetric_loss: unknown backend {backend!r}")


@torch.library.custom_op("cssfe::asymmetric_loss", mutates_args=())
def asymmetric_loss_op(
    logits: Tensor, targets: Tensor, gamma_pos: float, gamma_neg: float, clip: float, eps: float,
    focal_grad: bool, mean: bool, need_grad: bool, backend: str,
) -> Tuple[Tensor, Tensor]:
    return _asl_kernel(logits, targets, gamma_pos, gamma_neg, clip, eps, focal_grad, mean, need_grad, backend)


@asymmetric_loss_op.register_fake
def _(logits, targets, gamma_pos, gamma_neg, clip, eps, focal_grad, mean, need_grad, backend):
    loss = logits.new_empty((), dtype=_aux_dtype(logits))
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if need_grad else logits.new_empty(0)
    return loss, grad


def _asl_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _asl_backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad.dim() != 2 and ctx.needs_input_grad[0]:  # need_grad=False keeps a 1-d empty tensor
        raise RuntimeError("cssfe::asymmetric_loss was called with need_grad=False; cannot backpropagate")
    # one multiply in grad's dtype (computed in fp32): no separate cast of grad_loss to launch
    dlogits = (grad * grad_loss) if ctx.needs_input_grad[0] else None
    return (dlogits,) + (None,) * 9


asymmetric_loss_op.register_autograd(_asl_backward, setup_context=_asl_setup)


def _asl_scale_grad_(grad: Tensor, grad_loss: Tensor, backend: str) -> None:
    """grad *= grad_loss in place, read on the device (no synchronisation); a no-op when it is 1."""
    if backend in ("cpu", "cuda"):
        _native().native_asl_scale_grad_(grad, grad_loss)
    elif backend == "triton":
        _triton().asl_scale_grad_(grad, grad_loss)
    else:
        raise ValueError(f"cssfe::asymmetric_loss: no in-place gradient scaling for backend {backend!r}")


class _EagerASL(torch.autograd.Function):
    """The same kernel as ``cssfe::asymmetric_loss`` for eager mode. A Python custom op costs about
    0.1 ms of host time per forward + backward (measured on CPU), several times the kernel itself at
    typical loss sizes; this path skips that layer.

    Its backward with a fused backend scales the gradient saved by the forward in place and hands
    that buffer on (as Liger-Kernel's fused losses do): the out-of-place product was a second full
    pass over memory, as long as the fused kernel itself; when the incoming gradient is 1 (the loss
    is the last op) the in-place kernel reads nothing. So such a graph can be backpropagated once;
    with ``create_graph=True`` (or backend ``reference``) the product stays out of place."""

    @staticmethod
    def forward(ctx, logits, targets, *args):
        loss, grad = _asl_kernel(logits, targets, *args)
        _asl_setup(ctx, None, (loss, grad))
        ctx.set_materialize_grads(False)  # no zeros for the gradient output's (unused) gradient in backward
        ctx.backend = args[-1]
        ctx.grad_handed_on = False
        return loss, grad

    @staticmethod
    def backward(ctx, grad_loss, grad_grad):
        if ctx.backend == "reference" or torch.is_grad_enabled():
            return _asl_backward(ctx, grad_loss, grad_grad)
        if ctx.grad_handed_on:
            raise RuntimeError(
                f"cssfe asymmetric_loss (backend {ctx.backend!r}) scales its saved gradient in place in backward, "
                "so its graph can be backpropagated only once; for more (retain_graph=True) use backend='reference'")
        (grad,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 10
        if grad.dim() != 2:  # the forward kept no gradient: raises there
            return _asl_backward(ctx, grad_loss, grad_grad)
        _asl_scale_grad_(grad, grad_loss, ctx.backend)
        ctx.grad_handed_on = True
        return (grad,) + (None,) * 9


def asymmetric_loss(logits: Tensor, targets: Tensor, gamma_pos: float, gamma_neg: float, clip: float, eps: float,
                    focal_grad: bool, mean: bool, need_grad: bool, backend: str) -> Tensor:
    """The loss through the registered operator when compiling or exporting (one opaque node with
    its fake implementation), else through the lean eager path; both call the same kernel."""
    args = (gamma_pos, gamma_neg, clip, eps, focal_grad, mean, need_grad, backend)
    if torch.compiler.is_compiling():
        return asymmetric_loss_op(logits, targets, *args)[0]
    if not need_grad and not (torch.is_grad_enabled() and logits.requires_grad):
        return _asl_kernel(logits, targets, *args)[0]  # no graph; else the Function says why backward fails
    return _EagerASL.apply(logits, targets, *args)[0]


# ----------------------------------------------------------------------------- class attention
def _attn_kernel(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    if backend == "reference":
        return reference_impl.attention_fwd(q, k, v)
    if backend in ("cpu", "cuda"):
        return _native().native_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous())
    if backend == "triton":
        return _triton().attention_fwd(q, k, v)
    raise ValueError(f"cssfe::class_attention: unknown backend {backend!r}")


@torch.library.custom_op("cssfe::class_attention", mutates_args=())
def class_attention_op(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return _attn_kernel(q, k, v, backend)


@class_attention_op.register_fake
def _(q, k, v, backend):
    b, c, d = k.shape[0], q.shape[1], k.shape[1]
    return v.new_empty((b, c, d)), v.new_empty((b, c), dtype=torch.float32)


def _attn_backward_kernel(grad_z: Tensor, q: Tensor, k: Tensor, v: Tensor, z: Tensor, lse: Tensor,
                          backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    if backend == "reference":
        return reference_impl.attention_bwd(grad_z, q, k, v, z, lse)
    args = [t.contiguous() for t in (grad_z, q, k, v, z, lse)]
    if backend in ("cpu", "cuda"):
        return _native().native_attention_bwd(*args)
    if backend == "triton":
        return _triton().attention_bwd(*args)
    raise ValueError(f"cssfe::class_attention_backward: unknown backend {backend!r}")


@torch.library.custom_op("cssfe::class_attention_backward", mutates_args=())
def class_attention_backward_op(
    grad_z: Tensor, q: Tensor, k: Tensor, v: Tensor, z: Tensor, lse: Tensor, backend: str
) -> Tuple[Tensor, Tensor, Tensor]:
    return _attn_backward_kernel(grad_z, q, k, v, z, lse, backend)


@class_attention_backward_op.register_fake
def _(grad_z, q, k, v, z, lse, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _attn_setup(ctx, inputs, output):
    q, k, v, backend = inputs
    z, lse = output
    ctx.backend = backend
    ctx.save_for_backward(q, k, v, z, lse)
    ctx.mark_non_differentiable(lse)


def _attn_grads(ctx, grad_z, backward_kernel):
    q, k, v, z, lse = ctx.saved_tensors
    if grad_z is None:
        return None, None, None, None
    dq, dk, dv = backward_kernel(grad_z, q, k, v, z, lse, ctx.backend)
    return dq, dk, dv, None


def _attn_backward(ctx, grad_z, _grad_lse):
    return _attn_grads(ctx, grad_z, class_attention_backward_op)


class_attention_op.register_autograd(_attn_backward, setup_context=_attn_setup)


class _EagerAttention(torch.autograd.Function):
    """Eager path of ``cssfe::class_attention``: the same kernels without the Python custom-op layer
    (its host time is a few percent of a CPU call at the benchmarked shapes; see _EagerASL)."""

    @staticmethod
    def forward(ctx, q, k, v, backend):
        z, lse = _attn_kernel(q, k, v, backend)
        _attn_setup(ctx, (q, k, v, backend), (z, lse))
        ctx.set_materialize_grads(False)  # no zeros for lse's (unused) gradient in backward
        return z, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z, _grad_lse):
        return _attn_grads(ctx, grad_z, _attn_backward_kernel)


def class_attention(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """(z, lse) through the registered operator when compiling, else through the eager path."""
    if torch.compiler.is_compiling():
        return class_attention_op(q, k, v, backend)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _attn_kernel(q, k, v, backend)
    return _EagerAttention.apply(q, k, v, backend)


# ----------------------------------------------------------------------------- progressive enhance
def _enh_kernel(z: Tensor, affinity: Tensor, groups: Tensor, gate: Tensor, lam: Tensor, backend: str) -> Tensor:
    w = _w(gate, lam)
    order, bounds = _enhance_plan(groups)  # also checks the group values
    if backend == "reference":
        return reference_impl.enhance_fwd(z, affinity, groups, w)
    r = affinity.to(torch.float32).contiguous()
    args = (z.contiguous(), r, order, bounds, w.float(), _earlier_only(affinity, groups, order, bounds, forward=True))
    if backend in ("cpu", "cuda"):
        forward, _ = _native_enhance(backend, z.shape[1])
        return forward(*args)
    if backend == "triton":
        return _triton().enhance_fwd(*args)
    raise ValueError(f"cssfe::progressive_enhance: unknown backend {backend!r}")


@torch.library.custom_op("cssfe::progressive_enhance", mutates_args=())
def progressive_enhance_op(z: Tensor, affinity: Tensor, groups: Tensor, gate: Tensor, lam: Tensor, backend: str) -> Tensor:
    return _enh_kernel(z, affinity, groups, gate, lam, backend)


@progressive_enhance_op.register_fake
def _(z, affinity, groups, gate, lam, backend):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _enh_backward_kernel(grad: Tensor, z: Tensor, affinity: Tensor, groups: Tensor, gate: Tensor, lam: Tensor,
                         out: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    w = _w(gate, lam)
    aux = _aux_dtype(z)
    order, bounds = _enhance_plan(groups)
    if backend == "reference":
        dz, dm, dw = reference_impl.enhance_bwd(grad, z, affinity, groups, w, out)
        return dz, dm.to(aux), dw.to(aux)
    r = affinity.to(torch.float32).contiguous()
    args = (grad.contiguous(), z.contiguous(), r, order, bounds, w.float(), out.contiguous(),
            _earlier_only(affinity, groups, order, bounds, forward=False))
    if backend in ("cpu", "cuda"):
        _, backward = _native_enhance(backend, z.shape[1])
        dz, dm, dw = backward(*args)
    elif backend == "triton":
        dz, dm, dw = _triton().enhance_bwd(*args)
    else:
        raise ValueError(f"cssfe::progressive_enhance_backward: unknown backend {backend!r}")
    return dz, dm.to(aux), dw.to(aux)


@torch.library.custom_op("cssfe::progressive_enhance_backward", mutates_args=())
def progressive_enhance_backward_op(
    grad: Tensor, z: Tensor, affinity: Tensor, groups: Tensor, gate: Tensor, lam: Tensor, out: Tensor, backend: str
) -> Tuple[Tensor, Tensor, Tensor]:
    return _enh_backward_kernel(grad, z, affinity, groups, gate, lam, out, backend)


@progressive_enhance_backward_op.register_fake
def _(grad, z, affinity, groups, gate, lam, out, backend):
    aux = _aux_dtype(z)
    return (torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty(z.shape, dtype=aux),
            z.new_empty(z.shape[:2], dtype=aux))


def affinity_grad(dm: Tensor, z: Tensor, out: Tensor, groups: Tensor) -> Tensor:
    """d loss / d R from the message gradients: dR_ij = sum_{b,l} dm_il (s_jl - out_il), where
    s_j is class j's updated output if its group precedes i's, else its input. With s_j = z_j +
    [g_j < g_i] (out_j - z_j) that is two [C, B*L] x [B*L, C] products, whatever the groups."""
    ct = dm.dtype
    zf, of = z.to(ct), out.to(ct)
    contract = ([0, 2], [0, 2])  # over images and columns
    with torch.autocast(dm.device.type, enabled=False):  # in dm's precision, as the kernels, under autocast too
        dr = torch.tensordot(dm, zf, dims=contract)
        earlier = groups[None, :] < groups[:, None]  # [i, j]: j's group precedes i's
        dr = dr + torch.tensordot(dm, of - zf, dims=contract) * earlier
        return dr - torch.einsum("bil,bil->i", dm, of)[:, None]


def _enh_setup(ctx, inputs, output):
    z, affinity, groups, gate, lam, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(z, affinity, groups, gate, lam, output)


def _enh_grads(ctx, grad, backward_kernel):
    z, affinity, groups, gate, lam, out = ctx.saved_tensors
    dz, dm, dw = backward_kernel(grad, z, affinity, groups, gate, lam, out, ctx.backend)
    need = ctx.needs_input_grad
    daff = affinity_grad(dm, z, out, groups).to(affinity.dtype) if need[1] else None
    dgate = (dw * lam.to(dw.dtype)).to(gate.dtype) if need[3] else None
    dlam = (dw * gate.to(dw.dtype)).sum().to(lam.dtype).reshape(lam.shape) if need[4] else None
    return (dz if need[0] else None), daff, None, dgate, dlam, None


def _enh_backward(ctx, grad):
    return _enh_grads(ctx, grad, progressive_enhance_backward_op)


progressive_enhance_op.register_autograd(_enh_backward, setup_context=_enh_setup)


class _EagerEnhance(torch.autograd.Function):
    """Eager path of ``cssfe::progressive_enhance``: the same kernels and gradient formulas without
    the Python custom-op layer (see _EagerASL)."""

    @staticmethod
    def forward(ctx, z, affinity, groups, gate, lam, backend):
        out = _enh_kernel(z, affinity, groups, gate, lam, backend)
        _enh_setup(ctx, (z, affinity, groups, gate, lam, backend), out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _enh_grads(ctx, grad, _enh_backward_kernel)


def progressive_enhance(z: Tensor, affinity: Tensor, groups: Tensor, gate: Tensor, lam: Tensor, backend: str) -> Tensor:
    """The enhanced features through the registered operator when compiling, else the eager path."""
    if torch.compiler.is_compiling():
        return progressive_enhance_op(z, affinity, groups, gate, lam, backend)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (z, affinity, gate, lam))):
        return _enh_kernel(z, affinity, groups, gate, lam, backend)
    return _EagerEnhance.apply(z, affinity, groups, gate, lam, backend)
