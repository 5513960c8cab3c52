"""The tables of kernel backends and their kernels, filled by the backends themselves.

Each backend module registers itself (:func:`register_backend`) and its kernels
(``@register_kernel("enhance_fwd", "cpu", "cuda")``), as bitsandbytes' backends do; the dispatcher
(``dispatch.py``) and the operators (``library.py``) look them up and never branch on a backend's
name. The backends: ``cssfe/ops/reference.py`` (plain PyTorch, any device), ``backends/native_ops.py``
(the C++/CUDA extension) and ``backends/triton/ops.py``; ``backends/__init__.py`` imports them, so
adding a backend is adding a module there.

Kernels and their contracts (see ``csrc/cssfe.h``; every backend computes the same numbers):

- ``asl(logits, targets, gamma_pos, gamma_neg, clip, eps, focal_grad, mean, need_grad) -> (loss, grad)``
  and ``asl_scale_grad_(grad, grad_loss)`` (in place; fused backends only);
- ``attention_fwd(q, k, v) -> (z, lse)``, ``attention_bwd(grad_z, q, k, v, z, lse) -> (dq, dk, dv)``
  and, optionally, ``attention_check(d, dtype)`` (raises before any launch when a shape cannot run);
- ``enhance_fwd(z, affinity, groups, w, order, bounds, earlier_only) -> out`` and
  ``enhance_bwd(grad, z, affinity, groups, w, out, order, bounds, earlier_only) -> (dz, dm, dw)``
  (``order``, ``bounds``, ``earlier_only``: the :class:`cssfe.ops.plan.EnhancePlan`; ``bounds`` a CPU tensor).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

Status = Tuple[bool, str]


class Backend:
    """A kernel backend: its name, whether it can run here (``status``) and on which tensors.

    ``devices``: the device types it runs on (empty: any); ``builds``: asking for it by name may build
    it first (the C++ extension). A backend with other rules overrides :meth:`refusal`."""

    def __init__(self, name: str, status: Callable[[bool], Status], devices: Tuple[str, ...] = (),
                 builds: bool = False):
        self.name, self.devices, self.builds = name, devices, builds
        self._status = status

    def status(self, build: bool = False) -> Status:
        """(available, reason); ``build=True`` may build it (when it ``builds``)."""
        return self._status(build)

    def refusal(self, device: str, status: Callable[..., Status]) -> Optional[str]:
        """Why a call on ``device`` tensors cannot run on this backend when it is asked for by name
        (building it first if it ``builds``), or None when it can. ``status(build=...)``: this
        backend's status as the dispatcher reads it (a constant to ``torch.compile``)."""
        if self.devices and device not in self.devices:
            return f"runs on {'/'.join(d.upper() for d in self.devices)} tensors, the inputs are on {device}"
        ok, reason = status(build=self.builds)
        return None if ok else f"is not available: {reason}"


_BACKENDS: Dict[str, Backend] = {}
_KERNELS: Dict[Tuple[str, str], Callable] = {}  # (kernel, backend) -> function


def register_backend(backend: Backend) -> Backend:
    if backend.name in _BACKENDS:
        raise KeyError(f"kernel backend {backend.name!r} is registered twice")
    _BACKENDS[backend.name] = backend
    return backend


def register_kernel(kernel: str, *backends: str) -> Callable[[Callable], Callable]:
    """``@register_kernel("attention_fwd", "cpu", "cuda")``: this function is that kernel of those backends."""

    def wrap(fn: Callable) -> Callable:
        for name in backends:
            if (kernel, name) in _KERNELS:
                raise KeyError(f"kernel {kernel!r} of backend {name!r} is registered twice")
            _KERNELS[(kernel, name)] = fn
        return fn

    return wrap


def backend_names() -> Tuple[str, ...]:
    """The registered backends, in registration order."""
    return tuple(_BACKENDS)


def backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown kernel backend {name!r}; registered: {', '.join(_BACKENDS)}") from None


def find_kernel(kernel: str, backend_name: str) -> Optional[Callable]:
    """The kernel, or None when the backend has none (an optional kernel such as ``attention_check``)."""
    return _KERNELS.get((kernel, backend_name))


def kernel(kernel_name: str, backend_name: str, op: str) -> Callable:
    """The kernel of this backend; ``op`` names the operator in the error when it has none."""
    fn = _KERNELS.get((kernel_name, backend_name))
    if fn is None:
        raise ValueError(f"cssfe::{op}: backend {backend_name!r} has no {kernel_name} kernel")
    return fn


def check_attention(backend_name: str, d: int, dtype: torch.dtype) -> None:
    """Raise, naming the shape at fault, when the backend cannot run attention at feature width d."""
    check = find_kernel("attention_check", backend_name)
    if check is not None:
        check(d, dtype)
