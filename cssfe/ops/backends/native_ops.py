"""The ``cpu`` and ``cuda`` backends: the kernels of the C++/CUDA extension (``csrc/``, loaded by
``native.py``) registered as their ``cssfe::native_*`` operators, which ATen dispatches on the tensors'
device. The extension is built on first use by name (``native.load``), never by ``auto``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kernels import Backend, register_backend, register_kernel
from ..overrides import overriding
from . import native

Tensor = torch.Tensor


def native_status(build: bool) -> Tuple[bool, str, object]:
    """(available, reason, module) of the extension; ``build=True`` builds it if needed (~1 min)."""
    if build:
        mod, reason = native.load()
        return mod is not None, reason, mod
    ok, reason = native.loaded_without_build()
    if ok:
        return True, reason, native.load()[0]
    if native.can_load_without_build():
        mod, reason = native.load()
        return mod is not None, reason, mod
    return False, "extension neither prebuilt (cssfe._C) nor built in the cache; asking for backend 'cpu' or 'cuda' builds it", None


def _cpu_status(build: bool) -> Tuple[bool, str]:
    return native_status(build)[:2]


def _cuda_status(build: bool) -> Tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    ok, reason, mod = native_status(build)
    if not ok:
        return False, reason
    if not getattr(mod, "with_cuda", False):
        return False, "the extension was built without CUDA kernels (no nvcc or CSSFE_NO_CUDA=1)"
    mismatch = native.cuda_code_mismatch(mod)  # "no kernel image" at the first launch otherwise
    if mismatch is not None:
        return False, mismatch
    return True, reason


# the status functions are looked up when called, so that a test can simulate them
register_backend(Backend("cpu", lambda build: _cpu_status(build), devices=("cpu",), builds=True))
register_backend(Backend("cuda", lambda build: _cuda_status(build), devices=("cuda",), builds=True))


def _ops():
    mod, reason = native.load()
    if mod is None:
        raise RuntimeError(f"cssfe C++ extension is not available: {reason}")
    return torch.ops.cssfe


@register_kernel("asl", "cpu", "cuda")
def asl(logits, targets, *args) -> Tuple[Tensor, Tensor]:
    return _ops().native_asl(logits.contiguous(), targets.contiguous(), *args)


@register_kernel("asl_scale_grad_", "cpu", "cuda")
def asl_scale_grad_(grad: Tensor, grad_loss: Tensor) -> None:
    _ops().native_asl_scale_grad_(grad, grad_loss)


@register_kernel("attention_fwd", "cpu", "cuda")
def attention_fwd(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    return _ops().native_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous())


@register_kernel("attention_bwd", "cpu", "cuda")
def attention_bwd(*args: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return _ops().native_attention_bwd(*[t.contiguous() for t in args])


# The enhancement's two strategies: "block", the one-launch kernel of each device (csrc/cpu/enhance.cpp,
# csrc/cuda/enhance.cu), and "staged", three stages of batched matrix products in ATen
# (csrc/enhance_staged.cpp; cuBLAS on a GPU). The CUDA block program reads the whole affinity per tile
# of columns and its tiles narrow as C grows: it loses to eager from 320 classes on in
# benchmarks/results/gpu/2026-11-27_h200_e05935e/summary.md ("progressive_enhance alone" rows). The
# switch point below has not been measured against the staged strategy yet (the GPU check times both:
# providers cuda_block and cuda_staged).
NATIVE_ENHANCE_STRATEGIES = ("block", "staged")
STAGED_MIN_CLASSES = {"cpu": None, "cuda": 256}  # None: always the block kernel (fast on CPU at every C)
_native_enhance_override: Optional[str] = None  # while native_enhance_strategy is active


def native_enhance_strategy(name: str):
    """Use this strategy for the cpu and cuda backends' enhancement inside the ``with`` block (tests
    and the GPU benchmark compare both); wrap the forward and the backward."""
    if name not in NATIVE_ENHANCE_STRATEGIES:
        raise ValueError(f"progressive_enhance: unknown native strategy {name!r}, expected one of "
                         f"{NATIVE_ENHANCE_STRATEGIES}")
    return overriding(globals(), "_native_enhance_override", name)


def native_enhance_strategy_for(device: str, classes: int) -> str:
    """The strategy for tensors on this device type (the backend of the same name) at C classes."""
    if _native_enhance_override is not None:
        return _native_enhance_override
    threshold = STAGED_MIN_CLASSES.get(device)
    return "staged" if threshold is not None and classes >= threshold else "block"


def _enhance_ops(z: Tensor):
    """(forward, backward) native operators of the enhancement strategy for z's device and C."""
    ops = _ops()
    if native_enhance_strategy_for(z.device.type, z.shape[1]) == "staged":
        return ops.native_enhance_staged_fwd, ops.native_enhance_staged_bwd
    return ops.native_enhance_fwd, ops.native_enhance_bwd


@register_kernel("enhance_fwd", "cpu", "cuda")
def enhance_fwd(z, affinity, groups, w, order, bounds, earlier_only) -> Tensor:
    forward, _ = _enhance_ops(z)
    return forward(z.contiguous(), affinity.to(torch.float32).contiguous(), order, bounds, w.float(), earlier_only)


@register_kernel("enhance_bwd", "cpu", "cuda")
def enhance_bwd(grad, z, affinity, groups, w, out, order, bounds, earlier_only) -> Tuple[Tensor, Tensor, Tensor]:
    _, backward = _enhance_ops(z)
    return backward(grad.contiguous(), z.contiguous(), affinity.to(torch.float32).contiguous(), order, bounds,
                    w.float(), out.contiguous(), earlier_only)
