"""Backend selection for the cssfe operators.

Backends register themselves (``cssfe/ops/kernels.py``; ``cssfe.ops.backends`` imports them):

- ``reference``: plain PyTorch (``cssfe/ops/reference.py``), any device, any dtype;
- ``cpu``: the C++/OpenMP extension (``csrc/cpu``), CPU tensors;
- ``cuda``: the CUDA extension (``csrc/cuda``), CUDA tensors, when it was built with nvcc;
- ``triton``: Triton kernels (``cssfe/ops/backends/triton``), CUDA tensors; CPU tensors only when
  ``TRITON_INTERPRET=1`` was set before the first use (slow, for tests).

Which backend a call uses, first match wins:

1. the ``backend=`` argument of the op;
2. :func:`use_backend` (context manager) / :func:`set_default_backend` (process-wide), e.g. from
   the model config ``kernels: auto|reference|triton|cuda|cpu``; ``auto`` or ``None`` there sets
   nothing, so that
3. the environment variable ``CSSFE_KERNEL_BACKEND`` overrides a config left at ``auto``;
4. ``auto``: float64 inputs -> ``reference`` (the fused kernels compute in fp32); otherwise the
   first available backend that ``AUTO`` lists for the tensors' device, the op and the precision
   and ``AUTO_MAX_CLASSES`` allows at the call's class count, else ``reference``. A backend counts as
   available to ``auto`` only if it needs no build (the C++ extension prebuilt as ``cssfe._C`` or
   already built in the extension cache): ``auto`` never starts one.

A backend that is asked for by name and cannot run the call raises ``RuntimeError`` naming the
reason; there is no silent fallback. ``auto`` is the only name that falls back.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Dict, Iterator, Optional, Tuple

import torch

from . import kernels

BACKENDS = kernels.backend_names()  # registered by cssfe.ops.backends, imported first by cssfe.ops
CHOICES = ("auto",) + BACKENDS
FALLBACK = "reference"  # what ``auto`` runs when nothing faster is listed and available
# ``auto``: per device type, op and precision ("half": fp16/bf16), the backends in order of preference;
# the first one available runs. Each entry cites the benchmark results it comes from.
# CPU: every C++ kernel at least as fast as eager PyTorch at the benchmark's shapes: in
# benchmarks/results/kernels_cpu.jsonl the rows of provider "ops cpu" against the eager ones of the
# same commit (d837dde, b180e27), the enhancement's with "affinity": "masked", the model's (its
# "dense" rows at 1,000 classes are at parity). An op added later joins once it is measured so.
CPU_AUTO: Dict[str, Dict[str, Tuple[str, ...]]] = {
    op: {"half": ("cpu",), "float32": ("cpu",)} for op in ("asymmetric_loss", "class_attention", "progressive_enhance")
}
# CUDA: benchmarks/results/gpu/2026-11-27_h200_e48ac4c/summary.md, "Fastest backend through the op"
# (H200, 80 classes): attention + enhancement fastest with CUDA, then Triton, in bf16; in fp32 eager
# attention with the CUDA enhancement beat both; the enhancement alone and the ASL fastest with CUDA,
# then Triton (the enhancement in fp32 within 1 % there, CUDA ahead by 5 % in
# benchmarks/results/gpu/2026-11-27_h200_e05935e/summary.md). benchmarks/gpu_goals.py prints these
# rows for a GPU run: this table is where such a measurement lands.
CUDA_AUTO: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "class_attention": {"half": ("cuda", "triton"), "float32": ()},
    "progressive_enhance": {"half": ("cuda", "triton"), "float32": ("cuda", "triton")},
    "asymmetric_loss": {"half": ("cuda", "triton"), "float32": ("cuda", "triton")},
}
AUTO: Dict[str, Dict[str, Dict[str, Tuple[str, ...]]]] = {"cpu": CPU_AUTO, "cuda": CUDA_AUTO}
# (op, backend) -> the most classes at which ``auto`` picks that backend; above it the next candidate
# runs. The enhancement alone (B=64, L=512, fwd+bwd with the affinity gradient), rows at C = 80, 160,
# 320, 640, 1000 of benchmarks/results/gpu/2026-11-27_h200_e05935e/summary.md ("progressive_enhance
# alone"): CUDA ahead of Triton at 80 classes only, 4x behind at 1,000: each block of the CUDA kernel
# reads the whole C x C affinity for a few columns. (Measured before the cuda backend took its staged
# strategy from 256 classes on, cssfe/ops/backends/native_ops.py: not yet timed on a GPU.)
AUTO_MAX_CLASSES: Dict[Tuple[str, str], int] = {("progressive_enhance", "cuda"): 80}
ENV_VAR = "CSSFE_KERNEL_BACKEND"

_default: Optional[str] = None
_override: contextvars.ContextVar = contextvars.ContextVar("cssfe_kernel_backend", default=None)


def _check_name(name: Optional[str], what: str) -> Optional[str]:
    if name is None:
        return None
    if not isinstance(name, str) or name.lower() not in CHOICES:
        raise ValueError(f"{what}: unknown kernel backend {name!r}; choose one of {CHOICES}")
    return name.lower()


def _preference(name: Optional[str], what: str) -> Optional[str]:
    """A setter's name; ``auto`` is no preference: the next level (env var, then ``auto``) decides."""
    name = _check_name(name, what)
    return None if name == "auto" else name


def set_default_backend(name: Optional[str]) -> None:
    """Process-wide default backend (``None`` or ``"auto"``: none; the env var or ``auto`` decides)."""
    global _default
    _default = _preference(name, "set_default_backend")


def get_default_backend() -> str:
    """The name in force when an op gets no ``backend=``: context > default > env var > ``auto``."""
    for name, what in ((_override.get(), "use_backend"), (_default, "set_default_backend"),
                       (os.environ.get(ENV_VAR) or None, ENV_VAR)):
        if name is not None:
            return _check_name(name, what)
    return "auto"


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """``with cssfe.ops.use_backend("triton"): ...`` -- backend for the ops called inside (``None`` or
    ``"auto"``: none; an enclosing ``use_backend``, the default, the env var or ``auto`` decides)."""
    name = _preference(name, "use_backend")
    if name is None:
        yield
        return
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


@torch.compiler.assume_constant_result
def backend_status(name: str, build: bool = False) -> Tuple[bool, str]:
    """(available, reason) of one backend; ``build=True`` builds the C++ extension if needed (~1 min).
    ``torch.compile`` takes the answer as a constant when it traces an op (the check takes a lock and
    looks at files, which it cannot trace): a compiled graph keeps the backend chosen then."""
    return kernels.backend(name).status(build)


def available_backends(build: bool = False) -> Dict[str, Tuple[bool, str]]:
    """name -> (available, reason). ``build=True`` builds the C++ extension if needed (~1 min)."""
    return {name: backend_status(name, build) for name in BACKENDS}


def resolve(backend: Optional[str], device: torch.device, op: str, dtype: Optional[torch.dtype] = None,
            classes: Optional[int] = None) -> str:
    """The concrete backend an op call on ``device`` runs with; raises if a named one cannot.
    ``classes``: the call's class count, which ``auto`` weighs (AUTO_MAX_CLASSES)."""
    name = _check_name(backend, op) if backend is not None else get_default_backend()
    dev = torch.device(device).type
    if name != "auto":
        refusal = kernels.backend(name).refusal(dev, lambda build: backend_status(name, build))
        if refusal is not None:
            raise RuntimeError(f"{op}: backend {name!r} {refusal}")
        return name
    if dtype == torch.float64:
        return FALLBACK
    precision = "half" if dtype in (torch.float16, torch.bfloat16) else "float32"
    for candidate in AUTO.get(dev, {}).get(op, {}).get(precision, ()):
        limit = AUTO_MAX_CLASSES.get((op, candidate))
        if limit is not None and classes is not None and classes > limit:
            continue
        if backend_status(candidate)[0]:  # no build: ``auto`` never starts one
            return candidate
    return FALLBACK
