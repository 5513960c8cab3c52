"""Each op's providers, defined once for every run: name -> what it is and how to call it on a case.

A provider builds ``(full, forward)`` for a case of ``benchmarks.cases``: ``full()`` runs forward +
backward and returns the op's outputs in the order of ``Op.outputs`` (checked against the eager
reference), ``forward()`` the forward alone under ``no_grad`` (None where it means nothing: a closed
form that returns loss and gradient in one call). ``needs`` names what must be available: a kernel
backend (``cpu``, ``cuda``, ``triton``), ``native`` (the C++ extension of the device), or ``cuda``
for torch's CUDA-only SDPA kernels. The runs pick their providers by name (``kernels.CPU_PROVIDERS``,
``gpu_check.plan``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, NamedTuple, Optional

ASL_ARGS = (0.0, 4.0, 0.05, 1e-8)  # gamma_pos, gamma_neg, clip, eps: the project's ASL defaults
BACKENDS = ("cpu", "cuda", "triton", "auto")


class Provider(NamedTuple):
    doc: str
    build: Callable  # (case, compile_backend) -> (full, forward or None)
    needs: Optional[str] = None


def _with_grad(case, forward, leaves, post=None):
    """(forward + backward returning (out, *grads), forward under no_grad)."""
    import torch

    def full():
        out = forward()
        grads = torch.autograd.grad(out, leaves, case.get("gout") if out.dim() else None)
        return (out.detach(),) + tuple(post(grads) if post else grads)

    def fwd():
        with torch.no_grad():
            return forward()
    return full, fwd


def _within(context, name, f):
    """f, run inside ``context(name)`` (a strategy override: the backward must see it too)."""
    if f is None:
        return None

    def run():
        with context(name):
            return f()
    return run


def _compiled(f, backend: str, reduce_overhead: bool = False):
    """torch.compile of ``f``, static shapes; ``reduce_overhead``: CUDA graphs (inductor only)."""
    import torch

    torch._dynamo.reset()
    mode = "reduce-overhead" if reduce_overhead and backend == "inductor" else None
    cf = torch.compile(f, dynamic=False, backend=backend, mode=mode)
    if mode is None:
        return cf

    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: its graph may be replayed
        return cf(*args)
    return call


# --- ASL ------------------------------------------------------------------------------------------

def _asl_leaves(case):
    return case["x"], case["y"]


def _asl_through(backend):
    def build(case, compile_backend):
        import cssfe.ops as ops

        x, y = _asl_leaves(case)
        return _with_grad(case, lambda: ops.asymmetric_loss(x, y, backend=backend), (x,))
    return build


def _asl_module(compiled):
    def build(case, compile_backend):
        from cssfe.losses import AsymmetricLoss

        gp, gn, clip, eps = ASL_ARGS
        loss = AsymmetricLoss(gamma_neg=gn, gamma_pos=gp, clip=clip, eps=eps)
        if compiled:
            loss = _compiled(loss, compile_backend)
        x, y = _asl_leaves(case)
        return _with_grad(case, lambda: loss(x, y), (x,))
    return build


def _asl_closed_form(reduce_overhead):
    def build(case, compile_backend):
        from cssfe.ops import reference

        def closed_form(x, y):
            return reference.asymmetric_loss_with_grad(x.float(), y.float(), *ASL_ARGS, False, "sum")

        f = _compiled(closed_form, compile_backend, reduce_overhead)
        x, y = case["x"].detach(), case["y"]
        return (lambda: f(x, y)), None
    return build


def _asl_kernel(backend):
    def build(case, compile_backend):
        import torch

        from cssfe.ops import library

        x, y = case["x"].detach(), case["y"]

        def full():
            with torch.no_grad():
                return library.asymmetric_loss_op(x, y, *ASL_ARGS, False, False, True, backend)
        return full, None
    return build


ASL = {
    "eager": Provider("ops.asymmetric_loss(backend='reference'), autograd through the op", _asl_through("reference")),
    "eager_module": Provider("cssfe.losses.AsymmetricLoss with autograd (the unfused loss)", _asl_module(False)),
    "compile": Provider("torch.compile of the closed-form loss + gradient (cssfe.ops.reference.asymmetric_loss_with_grad)",
                        _asl_closed_form(False)),
    "compile_ro": Provider("compile with mode='reduce-overhead' (CUDA graphs; aot_eager has no modes)",
                           _asl_closed_form(True)),
    "compile_autograd": Provider("torch.compile(cssfe.losses.AsymmetricLoss) with autograd", _asl_module(True)),
    **{b: Provider(f"ops.asymmetric_loss(backend='{b}')", _asl_through(b), b) for b in BACKENDS},
    **{f"{b}_kernel": Provider(f"library.asymmetric_loss_op(..., '{b}') under no_grad: the fused kernel alone",
                               _asl_kernel(b), b) for b in ("cpu", "cuda", "triton")},
}


# --- class attention, the enhancement, and the two together -----------------------------------------

def _attention_leaves(case):
    return tuple(case[k] for k in ("q", "k", "v"))


def _attention_call(backend):
    """class_attention alone (op class_attention) or followed by the enhancement (op attention)."""
    def build(case, compile_backend):
        import cssfe.ops as ops
        from cssfe.ops import reference

        q, k, v = _attention_leaves(case)
        if backend == "direct":
            attend, enhance = reference.class_attention, reference.progressive_enhance
        elif backend == "compile":
            attend = _compiled(reference.class_attention, compile_backend)
            enhance = reference.progressive_enhance
        else:
            attend = lambda q_, k_, v_: ops.class_attention(q_, k_, v_, backend=backend)  # noqa: E731
            enhance = lambda *a: ops.progressive_enhance(*a, plan=case["plan"], backend=backend)  # noqa: E731
        if case["op"] == "class_attention":
            return _with_grad(case, lambda: attend(q, k, v), (q, k, v))
        if backend == "compile":
            both = _compiled(lambda q_, k_, v_, lam: reference.progressive_enhance(
                reference.class_attention(q_, k_, v_), case["R"], case["groups"], case["gate"], lam), compile_backend)
            return _with_grad(case, lambda: both(q, k, v, case["lam"]), (q, k, v, case["lam"]))
        return _with_grad(case, lambda: enhance(attend(q, k, v), case["R"], case["groups"], case["gate"], case["lam"]),
                          (q, k, v, case["lam"]))
    return build


def _attention_compile_ro(case, compile_backend):
    from cssfe.ops import reference

    f = _compiled(lambda q_, k_, v_, lam: reference.progressive_enhance(
        reference.class_attention(q_, k_, v_), case["R"], case["groups"], case["gate"], lam), compile_backend, True)
    q, k, v = _attention_leaves(case)
    return _with_grad(case, lambda: f(q, k, v, case["lam"]), (q, k, v, case["lam"]))[0], None


def _triton_strategy(name):
    def build(case, compile_backend):
        from cssfe.ops.backends.triton import attention as triton_attention

        full, fwd = _attention_call("triton")(case, compile_backend)
        return _within(triton_attention.strategy, name, full), _within(triton_attention.strategy, name, fwd)
    return build


_SDPA_KERNELS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}


def _sdpa(name):
    """torch's scaled_dot_product_attention (C queries of one head attend over N keys, q shared over the
    batch; K and V given as [B, 1, N, d]) then the enhancement in eager PyTorch."""
    def build(case, compile_backend):
        import torch.nn.functional as F

        import cssfe.ops as ops

        q, k, v = _attention_leaves(case)
        b, c, d = k.shape[0], q.shape[0], q.shape[1]
        ks = k.detach().transpose(1, 2).unsqueeze(1).contiguous().requires_grad_()  # [B, 1, N, d]
        vs = v.detach().transpose(1, 2).unsqueeze(1).contiguous().requires_grad_()

        def kernel():
            if name == "sdpa":
                return contextlib.nullcontext()
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel(getattr(SDPBackend, _SDPA_KERNELS[name]))

        def forward():
            with kernel():
                z0 = F.scaled_dot_product_attention(q.unsqueeze(0).unsqueeze(0).expand(b, 1, c, d), ks, vs).squeeze(1)
            return ops.progressive_enhance(z0, case["R"], case["groups"], case["gate"], case["lam"], plan=case["plan"],
                                           backend="reference")

        def post(g):
            return g[0], g[1].squeeze(1).transpose(1, 2), g[2].squeeze(1).transpose(1, 2), g[3]
        return _with_grad(case, forward, (q, ks, vs, case["lam"]), post)
    return build


CLASS_ATTENTION = {
    "eager_direct": Provider("cssfe.ops.reference.class_attention called directly (plain PyTorch, not through the op)",
                             _attention_call("direct")),
    "eager": Provider("ops.class_attention(backend='reference')", _attention_call("reference")),
    "compile": Provider("torch.compile of cssfe.ops.reference.class_attention", _attention_call("compile")),
    **{b: Provider(f"ops.class_attention(backend='{b}')", _attention_call(b), b) for b in BACKENDS},
}

ATTENTION = {
    "eager": Provider("ops.class_attention then ops.progressive_enhance, backend='reference'",
                      _attention_call("reference")),
    "compile": Provider("torch.compile of the plain-PyTorch reference of both ops, autograd", _attention_call("compile")),
    "compile_ro": Provider("compile with mode='reduce-overhead' (CUDA graphs)", _attention_compile_ro),
    **{b: Provider(f"both ops with backend='{b}'" + (" (what `kernels: auto` runs on the device; the row's "
                                                     "`resolved` names the backends)" if b == "auto" else ""),
                   _attention_call(b), None if b == "auto" else b) for b in BACKENDS},
    "triton_flash": Provider("triton with the attention's flash kernels forced", _triton_strategy("flash"), "triton"),
    "triton_gemm": Provider("triton with the attention's GEMM strategy forced (batched GEMMs + Triton row kernels)",
                            _triton_strategy("gemm"), "triton"),
    "sdpa": Provider("F.scaled_dot_product_attention then the enhancement in eager PyTorch", _sdpa("sdpa")),
    **{name: Provider(f"sdpa restricted to SDPBackend.{kernel}", _sdpa(name), None if name == "sdpa_math" else "cuda")
       for name, kernel in _SDPA_KERNELS.items()},
}


def _enhance_call(backend, strategy=None):
    def build(case, compile_backend):
        import cssfe.ops as ops
        from cssfe.ops import reference
        from cssfe.ops.backends import native_ops

        args = tuple(case[k] for k in ("z", "R", "groups", "gate", "lam"))
        leaves = (case["z"], case["R"], case["lam"])
        if backend == "direct":
            forward = lambda: reference.progressive_enhance(*args)  # noqa: E731
        elif backend == "compile":
            f = _compiled(reference.progressive_enhance, compile_backend)
            forward = lambda: f(*args)  # noqa: E731
        else:
            forward = lambda: ops.progressive_enhance(*args, plan=case["plan"], backend=backend)  # noqa: E731
        full, fwd = _with_grad(case, forward, leaves)
        if strategy is None:
            return full, fwd
        return (_within(native_ops.native_enhance_strategy, strategy, full),
                _within(native_ops.native_enhance_strategy, strategy, fwd))
    return build


PROGRESSIVE_ENHANCE = {
    "eager_direct": Provider("cssfe.ops.reference.progressive_enhance called directly (plain PyTorch)",
                             _enhance_call("direct")),
    "eager": Provider("ops.progressive_enhance(backend='reference')", _enhance_call("reference")),
    "compile": Provider("torch.compile of cssfe.ops.reference.progressive_enhance", _enhance_call("compile")),
    **{b: Provider(f"ops.progressive_enhance(backend='{b}')", _enhance_call(b), b) for b in BACKENDS},
    **{f"{b}_{s}": Provider(f"{b} with the native {s} strategy forced (native_ops.native_enhance_strategy)",
                            _enhance_call(b, s), b) for b in ("cpu", "cuda") for s in ("block", "staged")},
}

PROVIDERS: Dict[str, Dict[str, Provider]] = {"asl": ASL, "class_attention": CLASS_ATTENTION, "attention": ATTENTION,
                                             "progressive_enhance": PROGRESSIVE_ENHANCE}


def build(op: str, provider: str, case: dict, compile_backend: str = "inductor"):
    """(full, forward or None) of ``provider`` on ``case``."""
    table = PROVIDERS[op]
    if provider not in table:
        raise ValueError(f"unknown provider {provider!r} for {op}; choose from {', '.join(table)}")
    return table[provider].build(case, compile_backend)
