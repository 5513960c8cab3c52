"""The ``triton`` backend: its status and its kernels. Each kernel imports its Triton module when it
first runs, so that ``TRITON_INTERPRET`` can still be set after ``cssfe.ops`` is imported."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Optional, Tuple

import torch

from ...kernels import Backend, register_backend, register_kernel


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _installed() -> bool:
    # the module search costs tens of microseconds and ran on every call of a triton-backed op
    return importlib.util.find_spec("triton") is not None


def status() -> Tuple[bool, str]:
    if not _installed():
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, "triton with a CUDA device"
    if interpreting():
        return True, "triton interpreter (TRITON_INTERPRET=1), CPU tensors"
    return False, "triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"


class TritonBackend(Backend):
    """CUDA tensors; CPU tensors only in the interpreter. Never built: asked for, it is checked first."""

    def refusal(self, device: str, status) -> Optional[str]:
        ok, reason = status(build=False)
        if not ok:
            return f"is not available: {reason}"
        if device == "cpu" and not interpreting():
            return "needs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)"
        if device not in ("cpu", "cuda"):
            return f"does not run on {device} tensors"
        return None


# the status function is looked up when called, so that a test can simulate it
register_backend(TritonBackend("triton", lambda build: status()))


def _module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


@register_kernel("asl", "triton")
def asl(*args):
    return _module("asl").asl(*args)


@register_kernel("asl_scale_grad_", "triton")
def asl_scale_grad_(grad, grad_loss):
    _module("asl").asl_scale_grad_(grad, grad_loss)


@register_kernel("attention_check", "triton")
def attention_check(d: int, dtype: torch.dtype) -> None:
    _module("attention").check_supported(d, dtype)


@register_kernel("attention_fwd", "triton")
def attention_fwd(q, k, v):
    return _module("attention").attention_fwd(q, k, v)


@register_kernel("attention_bwd", "triton")
def attention_bwd(*args):
    return _module("attention").attention_bwd(*[t.contiguous() for t in args])


@register_kernel("enhance_fwd", "triton")
def enhance_fwd(z, affinity, groups, w, order, bounds, earlier_only):
    return _module("enhance").enhance_fwd(z.contiguous(), affinity.to(torch.float32).contiguous(), order, bounds,
                                          w.float(), earlier_only)


@register_kernel("enhance_bwd", "triton")
def enhance_bwd(grad, z, affinity, groups, w, out, order, bounds, earlier_only):
    return _module("enhance").enhance_bwd(grad.contiguous(), z.contiguous(), affinity.to(torch.float32).contiguous(),
                                          order, bounds, w.float(), out.contiguous(), earlier_only)
