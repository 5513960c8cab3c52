"""Loader of the C++/CUDA extension (``csrc/``) behind the ``cpu`` and ``cuda`` backends.

How the extension is found (first that works):

1. ``cssfe._C``, built by ``setup.py`` (``pip install -e .`` / ``pip install .``), used when its
   ``build_hash`` matches the current ``csrc/`` sources and compiler flags (``build_spec``; a stale
   build is ignored, with a warning);
2. otherwise a just-in-time build with ``torch.utils.cpp_extension.load`` of the CPU sources (plus
   the CUDA sources when torch sees a GPU and nvcc is found), cached in ``$CSSFE_EXT_DIR``, else
   ``$CSSFE_CACHE/extensions``, else ``~/.cache/cssfe/extensions`` (one sub-folder per build hash,
   torch version and, for a CUDA build, the GPU code it carries: ``jit_target``; the first build
   takes about a minute, later loads are instant). The sources
   are the checkout's ``csrc/``, or in an installed package the copy ``setup.py`` ships in it
   (``cssfe/_csrc``).

``CSSFE_NO_JIT=1`` disables step 2 (the ``cpu`` backend is then unavailable unless ``cssfe._C``
was built). Loading registers the ``cssfe::native_*`` operators (``csrc/ops.cpp``).
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from typing import Optional, Tuple

import torch

from cssfe.cache import default_cache_dir
from cssfe.ops.backends import build_spec

_PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SHIPPED_CSRC = os.path.join(_PACKAGE, "_csrc")
# an installed package: the copy of csrc/ that setup.py ships in it; a checkout (editable install): csrc/
CSRC = _SHIPPED_CSRC if os.path.isdir(_SHIPPED_CSRC) else os.path.join(os.path.dirname(_PACKAGE), "csrc")
_lock = threading.Lock()
_state: dict = {}


def cuda_sources() -> list:
    return build_spec.cuda_sources(CSRC)


def build_hash() -> Optional[str]:
    """Hash of csrc/ and the compiler flags (None when the source tree is not shipped)."""
    return build_spec.build_hash(CSRC)


def extension_dir() -> str:
    base = os.environ.get("CSSFE_EXT_DIR")
    if not base:
        base = os.path.join(default_cache_dir(), "extensions")
    return base


def jit_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST of the just-in-time CUDA build: the variable when set, else the visible
    cards' capabilities with PTX for the newest (build_spec.arch_list_for), else (no GPU) sm_80 and sm_90."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if not torch.cuda.is_available():
        return build_spec.DEFAULT_ARCH_LIST
    supported = [a for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
    newest = max(((int(a[3:-1]), int(a[-1])) for a in supported if a[3:].isdigit()), default=None)
    caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    return build_spec.arch_list_for(caps, newest)


def cuda_build_env() -> dict:
    """Environment for building the CUDA sources: the real CUDA_HOME (nvcc on PATH may be a wrapper), arch list, CPATH."""
    env = {"TORCH_CUDA_ARCH_LIST": jit_arch_list()}
    home = build_spec.cuda_home()
    if home:
        env["CUDA_HOME"] = home
    inc = build_spec.cuda_include_dir(os.path.dirname(torch.__file__))
    if inc:
        env["CPATH"] = os.pathsep.join(p for p in (inc, os.environ.get("CPATH", "")) if p)
    return env


def cuda_code_mismatch(mod) -> Optional[str]:
    """Why the loaded build cannot run on the current GPU (it carries no code for its compute
    capability), or None when it can, or when there is no GPU, no CUDA code or no record to ask about."""
    archs = getattr(mod, "cuda_archs", None)  # None: a build from before the code was recorded
    if archs is None or not getattr(mod, "with_cuda", False) or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    if build_spec.runs_on(archs, (major, minor)):
        return None
    return (f"the extension's CUDA code ({archs.replace('-', ', ') or 'not recorded'}) does not run on this GPU "
            f"(compute capability {major}.{minor}); build it for this card (TORCH_CUDA_ARCH_LIST)")


def _try_prebuilt(want: Optional[str]) -> Tuple[Optional[object], str]:
    try:
        from cssfe import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"cssfe._C not built ({exc})"
    have = getattr(_C, "build_hash", "unknown")
    if want is not None and have != want:
        warnings.warn(f"cssfe._C was built from other csrc/ sources or compiler flags ({have} != {want}); "
                      "rebuilding it just in time")
        return None, "cssfe._C is stale"
    mismatch = cuda_code_mismatch(_C)
    if mismatch is not None:  # e.g. a wheel's sm_80/sm_90 code on an older card
        warnings.warn(f"cssfe._C: {mismatch}; building it just in time")
        return None, f"cssfe._C: {mismatch}"
    return _C, "prebuilt cssfe._C"


def jit_target(want: str):
    """(with_cuda, module name, build folder) of the just-in-time build for these sources; a CUDA
    build's name also carries its GPU code (jit_arch_list), so each card gets a build that runs on it."""
    with_cuda = torch.cuda.is_available() and build_spec.cuda_home() is not None and bool(cuda_sources())
    name = f"cssfe_ext_{want}"
    if with_cuda:
        name += "_cuda_" + "_".join(build_spec.arch_names(jit_arch_list()))
    tag = f"torch{torch.__version__}".replace("+", "_")
    return with_cuda, name, os.path.join(extension_dir(), tag, name)


STALE_LOCK_SECONDS = 900  # a cold build takes a few minutes; an older lock was left by a killed process


def _import_built(name: str, so_path: str):
    """Import a finished build directly: torch's loader would take the build lock even to check
    an up-to-date build, and a process killed then leaves a lock that blocks every later one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, so_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _jit_build(want: str):
    from torch.utils import cpp_extension

    with_cuda, name, build_dir = jit_target(want)
    so_path = os.path.join(build_dir, name + ".so")
    if os.path.exists(so_path):  # the name carries the build hash: a finished build is current
        return _import_built(name, so_path), f"built just in time in {build_dir}"
    os.makedirs(build_dir, exist_ok=True)
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_SECONDS:
        warnings.warn(f"removing a stale build lock {lock} (left by an interrupted build)")
        os.remove(lock)
    sources = build_spec.cpu_sources(CSRC) + (cuda_sources() if with_cuda else [])
    defines = [build_spec.hash_define(CSRC)]
    old = {k: os.environ.get(k) for k in ("MAX_JOBS", "CUDA_HOME", "CPATH", "TORCH_CUDA_ARCH_LIST")}
    os.environ.setdefault("MAX_JOBS", "1")
    if with_cuda:
        build_env = cuda_build_env()
        defines += [build_spec.CUDA_DEFINE, build_spec.arch_define(build_env["TORCH_CUDA_ARCH_LIST"])]
        os.environ.update(build_env)
    try:
        mod = cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=build_spec.CXX_FLAGS + defines,
            extra_cuda_cflags=build_spec.NVCC_FLAGS + defines,
            extra_ldflags=build_spec.LINK_FLAGS,
            build_directory=build_dir,
            verbose=os.environ.get("CSSFE_EXT_VERBOSE") == "1",
        )
    finally:
        for k, val in old.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val
    return mod, f"built just in time in {build_dir}"


def load() -> Tuple[Optional[object], str]:
    """(module or None, reason). Builds at most once per process."""
    with _lock:
        if "result" in _state:
            return _state["result"]
        want = build_hash()
        mod, reason = _try_prebuilt(want)
        if mod is None and want is not None:
            if os.environ.get("CSSFE_NO_JIT") == "1":
                reason += "; CSSFE_NO_JIT=1 forbids a just-in-time build"
            else:
                try:
                    mod, reason = _jit_build(want)
                except Exception as exc:  # compiler missing, build error: report, do not crash
                    mod, reason = None, f"just-in-time build failed: {type(exc).__name__}: {str(exc)[-2000:]}"
        _state["result"] = (mod, reason)
        return mod, reason


def loaded_without_build() -> Tuple[bool, str]:
    """Whether the extension is usable now, without triggering a build (for available_backends)."""
    if "result" in _state:
        mod, reason = _state["result"]
        return mod is not None, reason
    return False, "not loaded yet"


def has_cuda_kernels() -> bool:
    mod, _ = load()
    return bool(mod is not None and getattr(mod, "with_cuda", False))


def can_load_without_build() -> bool:
    """True when ``load()`` needs no compiler: a matching ``cssfe._C`` or a cached JIT build."""
    want = build_hash()
    try:
        from cssfe import _C  # type: ignore[attr-defined]

        if want is None or getattr(_C, "build_hash", None) == want:
            return True
    except ImportError:
        pass
    if want is None or os.environ.get("CSSFE_NO_JIT") == "1":
        return False
    try:
        _, name, build_dir = jit_target(want)
    except ValueError:  # an unreadable TORCH_CUDA_ARCH_LIST: the build that asks for it says so
        return False
    return os.path.exists(os.path.join(build_dir, name + ".so"))
