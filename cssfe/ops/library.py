"""The cssfe operators, defined once with ``torch.library`` (namespace ``cssfe``).

Each operator takes the concrete backend name as its last argument and calls the kernel that
backend registered (``cssfe/ops/kernels.py``). Every operator has a fake (meta) implementation, so ``torch.compile`` traces it as
one opaque node, and its autograd formula is registered with ``register_autograd`` and calls the
matching backward operator. The public functions (``cssfe.ops.class_attention`` ...) validate
their inputs, pick the backend (``cssfe.ops.dispatch``) and call ``asymmetric_loss``,
``class_attention`` and ``progressive_enhance`` here: under ``torch.compile`` these go through the
registered operators; in eager mode through ``autograd.Function`` wrappers of the same kernel and
gradient functions, because the host time of the Python custom-op layer per forward + backward is
more than the kernel itself at typical loss sizes (measured on CPU before and after the eager path:
docs/performance.md, CPU kernels; no benchmark row times the layer alone).

Operators:

- ``cssfe::asymmetric_loss(logits, targets, gamma_pos, gamma_neg, clip, eps, focal_grad, mean,
  need_grad, backend) -> (loss, grad)``: loss and d loss / d logits in one pass;
- ``cssfe::class_attention(q[Bq,C,d], k[B,d,N], v[B,d,N], backend) -> (z[B,C,d], lse[B,C])``
  and ``cssfe::class_attention_backward(grad_z, q, k, v, z, lse, backend) -> (dq, dk, dv)``;
- ``cssfe::progressive_enhance(z, affinity, groups, gate, lam, order, bounds, earlier_only, backend)
  -> out`` and ``cssfe::progressive_enhance_backward(grad, z, affinity, groups, gate, lam, out, order,
  bounds, earlier_only, backend) -> (dz, dm, dw)`` (``order``, ``bounds``, ``earlier_only``: the
  caller's :class:`cssfe.ops.plan.EnhancePlan`, or None, None, 0 for a plan computed from the group
  values inside the operator; dm: gradient of each class's message, dw: of ``lam * gate``).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from .kernels import find_kernel, kernel
from .plan import EnhancePlan, enhance_plan

Tensor = torch.Tensor


@functools.lru_cache(maxsize=64)
def _bounds_tensor(bounds: Tuple[int, ...]) -> Tensor:
    """The plan's bounds as the CPU tensor the kernels read as launch parameters (one per plan)."""
    return torch.tensor(bounds, dtype=torch.long)


def _w(gate: Tensor, lam: Tensor) -> Tensor:
    ct = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (lam.to(ct) * gate.to(ct)).contiguous()


def _aux_dtype(z: Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- ASL
def _asl_kernel(logits: Tensor, targets: Tensor, gamma_pos: float, gamma_neg: float, clip: float, eps: float,
                focal_grad: bool, mean: bool, need_grad: bool, backend: str) -> Tuple[Tensor, Tensor]:
    return kernel("asl", backend, "asymmetric_loss")(logits, targets, gamma_pos, gamma_neg, clip, eps, focal_grad, mean,
                                                     need_grad)


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
    kernel("asl_scale_grad_", backend, "asymmetric_loss")(grad, grad_loss)


class _EagerASL(torch.autograd.Function):
    """The same kernel as ``cssfe::asymmetric_loss`` for eager mode. A Python custom op's host time
    per forward + backward is several times the kernel itself at typical loss sizes (see the module's
    docstring); this path skips that layer.

    Its backward with a fused backend scales the gradient saved by the forward in place and hands
    that buffer on (as Liger-Kernel's fused losses do): the out-of-place product was a second full
    pass over memory, as long as the fused kernel itself; when the incoming gradient is 1 (the loss
    is the last op) the in-place kernel reads nothing. So such a graph can be backpropagated once;
    with ``create_graph=True`` (or a backend without that kernel: ``reference``) the product stays out of place."""

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
        if find_kernel("asl_scale_grad_", ctx.backend) is None or torch.is_grad_enabled():
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
    return kernel("attention_fwd", backend, "class_attention")(q, k, v)


@torch.library.custom_op("cssfe::class_attention", mutates_args=())
def class_attention_op(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return _attn_kernel(q, k, v, backend)


@class_attention_op.register_fake
def _(q, k, v, backend):
    b, c, d = k.shape[0], q.shape[1], k.shape[1]
    return v.new_empty((b, c, d)), v.new_empty((b, c), dtype=torch.float32)


def _attn_backward_kernel(grad_z: Tensor, q: Tensor, k: Tensor, v: Tensor, z: Tensor, lse: Tensor,
                          backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return kernel("attention_bwd", backend, "class_attention_backward")(grad_z, q, k, v, z, lse)


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
def _plan_args(groups: Tensor, order: Optional[Tensor], bounds: Optional[List[int]]) -> Tuple[Tensor, Tensor]:
    """(order, bounds as a CPU tensor) of the caller's plan, or computed from the group values when
    it passed none (a direct call under torch.compile: a device read-back in each direction)."""
    if order is None or bounds is None:
        order, bounds, _ = enhance_plan(groups)
    return order, _bounds_tensor(tuple(bounds))


def _enh_kernel(z: Tensor, affinity: Tensor, groups: Tensor, gate: Tensor, lam: Tensor, order: Optional[Tensor],
                bounds: Optional[List[int]], earlier_only: int, backend: str) -> Tensor:
    return kernel("enhance_fwd", backend, "progressive_enhance")(
        z, affinity, groups, _w(gate, lam), *_plan_args(groups, order, bounds), earlier_only)


@torch.library.custom_op("cssfe::progressive_enhance", mutates_args=())
def progressive_enhance_op(z: Tensor, affinity: Tensor, groups: Tensor, gate: Tensor, lam: Tensor,
                           order: Optional[Tensor], bounds: Optional[List[int]], earlier_only: int,
                           backend: str) -> Tensor:
    return _enh_kernel(z, affinity, groups, gate, lam, order, bounds, earlier_only, backend)


@progressive_enhance_op.register_fake
def _(z, affinity, groups, gate, lam, order, bounds, earlier_only, backend):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _enh_backward_kernel(grad: Tensor, z: Tensor, affinity: Tensor, groups: Tensor, gate: Tensor, lam: Tensor,
                         out: Tensor, order: Optional[Tensor], bounds: Optional[List[int]], earlier_only: int,
                         backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    aux = _aux_dtype(z)
    dz, dm, dw = kernel("enhance_bwd", backend, "progressive_enhance_backward")(
        grad, z, affinity, groups, _w(gate, lam), out, *_plan_args(groups, order, bounds), earlier_only)
    return dz, dm.to(aux), dw.to(aux)


@torch.library.custom_op("cssfe::progressive_enhance_backward", mutates_args=())
def progressive_enhance_backward_op(
    grad: Tensor, z: Tensor, affinity: Tensor, groups: Tensor, gate: Tensor, lam: Tensor, out: Tensor,
    order: Optional[Tensor], bounds: Optional[List[int]], earlier_only: int, backend: str
) -> Tuple[Tensor, Tensor, Tensor]:
    return _enh_backward_kernel(grad, z, affinity, groups, gate, lam, out, order, bounds, earlier_only, backend)


@progressive_enhance_backward_op.register_fake
def _(grad, z, affinity, groups, gate, lam, out, order, bounds, earlier_only, backend):
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
    z, affinity, groups, gate, lam, order, bounds, earlier_only, backend = inputs
    ctx.plan, ctx.backend = (bounds, earlier_only), backend
    ctx.save_for_backward(z, affinity, groups, gate, lam, output, order)


def _enh_grads(ctx, grad, backward_kernel):
    z, affinity, groups, gate, lam, out, order = ctx.saved_tensors
    dz, dm, dw = backward_kernel(grad, z, affinity, groups, gate, lam, out, order, *ctx.plan, ctx.backend)
    need = ctx.needs_input_grad
    daff = affinity_grad(dm, z, out, groups).to(affinity.dtype) if need[1] else None
    dgate = (dw * lam.to(dw.dtype)).to(gate.dtype) if need[3] else None
    dlam = (dw * gate.to(dw.dtype)).sum().to(lam.dtype).reshape(lam.shape) if need[4] else None
    return (dz if need[0] else None), daff, None, dgate, dlam, None, None, None, None


def _enh_backward(ctx, grad):
    return _enh_grads(ctx, grad, progressive_enhance_backward_op)


progressive_enhance_op.register_autograd(_enh_backward, setup_context=_enh_setup)


class _EagerEnhance(torch.autograd.Function):
    """Eager path of ``cssfe::progressive_enhance``: the same kernels and gradient formulas without
    the Python custom-op layer (see _EagerASL)."""

    @staticmethod
    def forward(ctx, z, affinity, groups, gate, lam, order, bounds, earlier_only, backend):
        args = (z, affinity, groups, gate, lam, order, bounds, earlier_only, backend)
        out = _enh_kernel(*args)
        _enh_setup(ctx, args, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _enh_grads(ctx, grad, _enh_backward_kernel)


def progressive_enhance(z: Tensor, affinity: Tensor, groups: Tensor, gate: Tensor, lam: Tensor,
                        plan: Optional[EnhancePlan], backend: str) -> Tensor:
    """The enhanced features through the registered operator when compiling, else the eager path.
    Without a plan, the eager path computes it once for both directions; a compiled graph, in the
    operator (its values are not known when tracing)."""
    if plan is None and torch.compiler.is_compiling():
        return progressive_enhance_op(z, affinity, groups, gate, lam, None, None, 0, backend)
    if plan is None:
        plan = enhance_plan(groups)  # also checks the group values
    args = (z, affinity, groups, gate, lam, plan.order, list(plan.bounds), plan.earlier_only, backend)
    if torch.compiler.is_compiling():
        return progressive_enhance_op(*args)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (z, affinity, gate, lam))):
        return _enh_kernel(*args)
    return _EagerEnhance.apply(*args)
