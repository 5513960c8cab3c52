"""Backend selection for the cssfe operators.

Backends:

- ``reference``: plain PyTorch (``cssfe/ops/backends/reference_impl.py``), any device, any dtype;
- ``cpu``: the C++/OpenMP extension (``csrc/cpu``), CPU tensors;
- ``cuda``: the CUDA extension (``csrc/cuda``), CUDA tensors, when it was built with nvcc;
- ``triton``: Triton kernels (``cssfe/ops/triton``), CUDA tensors; CPU tensors only when
  ``TRITON_INTERPRET=1`` was set before the first use (slow, for tests).

Which backend a call uses, first match wins:

1. the ``backend=`` argument of the op;
2. :func:`use_backend` (context manager) / :func:`set_default_backend` (process-wide), e.g. from
   the model config ``kernels: auto|reference|triton|cuda|cpu``; ``auto`` or ``None`` there sets
   nothing, so that
3. the environment variable ``CSSFE_KERNEL_BACKEND`` overrides a config left at ``auto``;
4. ``auto``: float64 inputs -> ``reference`` (the fused kernels compute in fp32); CPU tensors ->
   ``cpu`` (each C++ kernel measured at least as fast as eager PyTorch at the benchmark's shapes,
   the enhancement with the model's masked affinity: docs/performance.md) if the
   extension is prebuilt (``cssfe._C``) or already built in the extension cache, else
   ``reference``; CUDA tensors -> the first available backend that ``CUDA_AUTO`` lists for the op and
   precision and ``CUDA_AUTO_MAX_CLASSES`` allows at the call's class count (from GPU measurements;
   ``cuda`` only if the extension with CUDA kernels is prebuilt or built), else ``reference``.
   ``auto`` never starts a build.

A backend that is asked for by name and cannot run the call raises ``RuntimeError`` naming the
reason; there is no silent fallback. ``auto`` is the only name that falls back.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Dict, Iterator, Optional, Tuple

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
CPU_AUTO_OPS = ("asymmetric_loss", "class_attention", "progressive_enhance")  # auto picks the C++ kernel on CPU
CHOICES = ("auto",) + BACKENDS
# ``auto`` on CUDA tensors: per op and precision ("half": fp16/bf16), the backends in order of
# preference; the first one available runs. Measured on an H200 at 80 classes (docs/performance.md,
# 2026-11-27): attention + enhancement in bf16 took 2.32 ms with CUDA, 2.88 with Triton and 4.83
# eager; in fp32 eager attention with the CUDA enhancement (2.77 ms) beat CUDA (3.05) and Triton
# (3.66) for both; the enhancement alone was fastest with CUDA (by 0-8 % over Triton in two runs);
# ASL was fastest with CUDA, then Triton. benchmarks/gpu_goals.py prints the fastest backend
# per op and dtype of a GPU run: this table is where such a measurement lands.
CUDA_AUTO: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "class_attention": {"half": ("cuda", "triton"), "float32": ()},
    "progressive_enhance": {"half": ("cuda", "triton"), "float32": ("cuda", "triton")},
    "asymmetric_loss": {"half": ("cuda", "triton"), "float32": ("cuda", "triton")},
}
# (op, backend) -> the most classes at which ``auto`` picks that backend on CUDA; above it the next
# candidate of CUDA_AUTO runs. The enhancement alone (B=64, L=512, H200, fwd+bwd with the affinity
# gradient): CUDA 5 % faster than Triton at 80 classes (bf16 1.88 / 1.98 ms, fp32 1.98 / 2.08),
# 30 % slower at 160 (2.82 / 2.16), 4x slower at 1,000 (80 / 19 ms): each block of the CUDA kernel
# reads the whole C x C affinity for a few columns. (Measured before the cuda backend took its staged
# strategy from 256 classes on, cssfe/ops/library.py: not yet timed on a GPU.)
CUDA_AUTO_MAX_CLASSES: Dict[Tuple[str, str], int] = {("progressive_enhance", "cuda"): 80}
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


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    # the module search costs tens of microseconds and ran on every call of a triton-backed op
    return importlib.util.find_spec("triton") is not None


def _triton_status() -> Tuple[bool, str]:
    if not _triton_installed():
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, "triton with a CUDA device"
    if triton_interpreting():
        return True, "triton interpreter (TRITON_INTERPRET=1), CPU tensors"
    return False, "triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"


def _native_status(build: bool) -> Tuple[bool, str, object]:
    from .backends import native

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


def _cuda_status(native_status: Tuple[bool, str, object]) -> Tuple[bool, str]:
    """Whether the CUDA backend can run, given what ``_native_status`` found."""
    ok, reason, mod = native_status
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if not ok:
        return False, reason
    if not getattr(mod, "with_cuda", False):
        return False, "the extension was built without CUDA kernels (no nvcc or CSSFE_NO_CUDA=1)"
    from .backends import native

    mismatch = native.cuda_code_mismatch(mod)  # "no kernel image" at the first launch otherwise
    if mismatch is not None:
        return False, mismatch
    return True, reason


@torch.compiler.assume_constant_result
def backend_status(name: str, build: bool = False) -> Tuple[bool, str]:
    """(available, reason) of one backend; ``build=True`` builds the C++ extension if needed (~1 min).
    ``torch.compile`` takes the answer as a constant when it traces an op (the check takes a lock and
    looks at files, which it cannot trace): a compiled graph keeps the backend chosen then."""
    if name == "cpu":
        return _native_status(build)[:2]
    if name == "cuda":
        return _cuda_status(_native_status(build))
    if name == "triton":
        return _triton_status()
    return True, "plain PyTorch, always available"


def available_backends(build: bool = False) -> Dict[str, Tuple[bool, str]]:
    """name -> (available, reason). ``build=True`` builds the C++ extension if needed (~1 min)."""
    return {name: backend_status(name, build) for name in BACKENDS}


def resolve(backend: Optional[str], device: torch.device, op: str, dtype: Optional[torch.dtype] = None,
            classes: Optional[int] = None) -> str:
    """The concrete backend an op call on ``device`` runs with; raises if a named one cannot.
    ``classes``: the call's class count, which ``auto`` on CUDA weighs (CUDA_AUTO_MAX_CLASSES)."""
    name = _check_name(backend, op) if backend is not None else get_default_backend()
    dev = torch.device(device).type
    if name == "auto":
        if dtype == torch.float64:
            return "reference"
        if dev == "cpu":
            # Measured (docs/performance.md): every C++ kernel is at least as fast as eager PyTorch
            # on CPU (the enhancement with the model's masked affinity; with a dense 1000-class one
            # it measured 0.88-1.01x); an op added later joins CPU_AUTO_OPS once it is measured so.
            if op not in CPU_AUTO_OPS:
                return "reference"
            return "cpu" if backend_status("cpu")[0] else "reference"
        if dev == "cuda":
            precision = "half" if dtype in (torch.float16, torch.bfloat16) else "float32"
            for candidate in CUDA_AUTO.get(op, {}).get(precision, ()):
                limit = CUDA_AUTO_MAX_CLASSES.get((op, candidate))
                if limit is not None and classes is not None and classes > limit:
                    continue
                if backend_status(candidate)[0]:  # no build: ``auto`` never starts one
                    return candidate
        return "reference"
    if name == "reference":
        return name
    if name == "cpu":
        if dev != "cpu":
            raise RuntimeError(f"{op}: backend 'cpu' runs on CPU tensors, the inputs are on {dev}")
        ok, reason = backend_status("cpu", build=True)
        if not ok:
            raise RuntimeError(f"{op}: backend 'cpu' is not available: {reason}")
        return name
    if name == "cuda":
        if dev != "cuda":
            raise RuntimeError(f"{op}: backend 'cuda' runs on CUDA tensors, the inputs are on {dev}")
        ok, reason = backend_status("cuda", build=True)
        if not ok:
            raise RuntimeError(f"{op}: backend 'cuda' is not available: {reason}")
        return name
    # triton
    ok, reason = backend_status("triton")
    if not ok:
        raise RuntimeError(f"{op}: backend 'triton' is not available: {reason}")
    if dev == "cpu" and not triton_interpreting():
        raise RuntimeError(f"{op}: backend 'triton' needs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)")
    if dev not in ("cpu", "cuda"):
        raise RuntimeError(f"{op}: backend 'triton' does not run on {dev} tensors")
    return name
