"""The worker task that builds the C++/CUDA extension just in time and calls it once."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

from benchmarks import ROOT
from benchmarks.gpu_check.worker import err_record, error_text


def _setup_py_build(timeout_s):
    """Fallback when ninja is missing: ``setup.py build_ext --inplace`` (slower, serial compile)."""
    from cssfe.ops.backends import native

    tmp = os.path.join(native.extension_dir(), "setup_build")
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp", tmp]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    return {"cmd": " ".join(cmd), "rc": p.returncode, "output_tail": (p.stdout + p.stderr)[-6000:]}


def _remove_stale_lock(rec, native):
    """A build killed midway leaves cpp_extension's lock file, and every later load then waits on it
    forever. Nothing else builds while this task runs (phase 1, lane A), so a lock here is stale."""
    if rec["build_hash"] is None:
        return
    _, _, build_dir = native.jit_target(rec["build_hash"])
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock):
        with contextlib.suppress(OSError):
            os.remove(lock)
            rec.setdefault("removed_stale_locks", []).append(lock)


def task_build(task, ctx, emit):
    torch = ctx.torch
    from torch.utils import cpp_extension

    from cssfe.ops.backends import build_spec, native

    rec = {"torch_cuda_available": torch.cuda.is_available(), "cuda_home": build_spec.cuda_home(),
           "extension_dir": native.extension_dir(), "build_hash": native.build_hash(),
           "nvcc_flags": list(build_spec.NVCC_FLAGS), "want_cuda": ctx.cuda,
           "env": {k: os.environ.get(k) for k in ("MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "CSSFE_EXT_DIR", "CUDA_HOME",
                                                   "CSSFE_NO_CUDA", "CSSFE_NO_JIT")}}
    try:
        rec["ninja"] = bool(cpp_extension.is_ninja_available())
    except Exception:
        rec["ninja"] = False
    _remove_stale_lock(rec, native)
    t0 = time.perf_counter()
    if not rec["ninja"] and ctx.cuda and task.get("setup_py_fallback", True):
        try:
            rec["setup_py"] = _setup_py_build(task.get("timeout_s", 300) - 10)
        except Exception as exc:
            rec["setup_py"] = err_record(exc)
    mod, reason = native.load()
    rec["build_s"] = time.perf_counter() - t0
    rec["loaded"] = mod is not None
    rec["reason"] = reason[-4000:] if isinstance(reason, str) else str(reason)
    rec["with_cuda"] = bool(getattr(mod, "with_cuda", False))
    rec["module_file"] = getattr(mod, "__file__", None)
    try:
        from cssfe.ops.dispatch import available_backends

        rec["available_backends"] = {k: {"ok": v[0], "reason": v[1]} for k, v in available_backends(build=False).items()}
    except Exception as exc:
        rec["available_backends_error"] = error_text(exc)
    rec["ok"] = rec["loaded"] and (rec["with_cuda"] or not ctx.cuda)
    if not rec["loaded"]:
        rec["error"] = f"extension did not build/load: {rec['reason']}"
    elif ctx.cuda and not rec["with_cuda"]:
        rec["error"] = ("the extension loaded without CUDA kernels (torch.cuda.is_available()="
                        f"{rec['torch_cuda_available']}, cuda_home={rec['cuda_home']})")
    if rec["loaded"] and rec["ok"]:
        try:  # smoke: the native op runs on the target device
            x = torch.randn(8, 5, device=ctx.device)
            y = torch.rand(8, 5, device=ctx.device) > 0.5
            loss, grad = torch.ops.cssfe.native_asl(x, y, 0.0, 4.0, 0.05, 1e-8, False, False, True)
            ctx.harness.sync()
            rec["smoke"] = {"ok": bool(torch.isfinite(loss).item() and grad.shape == x.shape)}
        except Exception as exc:
            rec["smoke"] = err_record(exc)
            rec["ok"] = False
            rec["error"] = f"native_asl smoke call failed: {rec['smoke']['error']}"
    return rec
