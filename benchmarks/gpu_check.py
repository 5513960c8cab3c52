#!/usr/bin/env python
"""One-shot GPU check of the cssfe kernels: environment, CUDA extension build, parity, benchmarks.

    bash benchmarks/run_gpu_check.sh OUT_DIR            # on the GPU machine (sets MAX_JOBS, caches, timeout)
    python benchmarks/gpu_check.py --out DIR [--quick] [--budget-s 455]
    python benchmarks/gpu_check.py --out DIR --cpu-dry-run   # same code path on CPU, tiny sizes

Writes ``DIR/gpu_check.json`` (one object, rewritten after every step, so a kill leaves the latest
state), ``DIR/summary.md`` and ``DIR/logs/*.log``, and prints the summary.

Design (everything is recorded, nothing is allowed to stop the rest):

- this process (the orchestrator) imports only the standard library; every step runs in a worker
  subprocess (this file with ``--worker``) or a pytest subprocess, each in its own process group,
  with a per-task watchdog and the global ``--budget-s``. A worker that dies (segfault, sticky
  CUDA error, hang) is restarted on the tasks it had not finished; a provider that kills two
  workers is skipped;
- phase 1, two lanes at once: (A) the just-in-time build of the C++/CUDA extension
  (``cssfe.ops.backends.native``, CPU-bound) and (B) the environment measurements (copy bandwidth,
  bf16 matmul), the Triton parity tests, then a warm-up of the torch.compile / Triton caches
  (stopped when the build ends, so no timing runs beside another GPU job);
- phase 2: the CUDA parity tests, then the benchmarks (main cases first, then per-check parity
  diagnosis when a parity test failed or pytest is missing, then the other ASL shapes, the
  attention in fp32 and the progressive enhancement alone, then the SPEC section 6 grid).

Workers import only torch, triton and ``cssfe.ops`` (plus ``cssfe.losses`` for the unfused ASL
module and ``tests/ops/kernel_cases.py`` for the parity checks): no numpy, yaml, sklearn, open_clip.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET

SCRIPT = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(SCRIPT))
sys.path.insert(0, os.path.dirname(SCRIPT))

import gpu_goals  # noqa: E402 - the goals, judged on the finished result (standard library only)

TESTS_OPS = os.path.join(ROOT, "tests", "ops")
SCHEMA = 1
RESERVE_S = 8.0  # kept at the end of the budget to write the JSON and the summary
IDLE_TIMEOUT_S = 120.0  # a worker that reports nothing this long outside a task is killed (start-up/exit hang)

# The GPU parity tests of each backend (the NaN / inf, earlier_only, opcheck and d = 256 / 512 / 768
# cases live in them): the whole CUDA file but its slow nvcc-only check, and the check that a
# warmed-up model + loss step reads nothing back from the device; of the Triton file, the GPU test (the other one runs the interpreter on the host). The dry run selects the GPU tests alone
# (they skip without a device).
PYTEST_NODES = {
    "triton": ["tests/ops/test_triton.py::test_triton_kernels_on_gpu"],
    "cuda": ["tests/ops/test_cuda.py", "tests/ops/test_host_sync.py::test_cuda_step_reads_nothing_back_after_warm_up_on_gpu"],
}
PYTEST_DRY_SELECT = {"triton": "on_gpu", "cuda": "on_gpu"}
TRAIN = os.path.join(ROOT, "launch", "train.py")

DEFINITIONS = {
    "timing": "forward+backward per call; GPU: CUDA events around each call, L2 flushed (256 MB write) "
              "before each call, after warm-up; median/p20/p80 over the repeats. back_to_back_ms: wall time "
              "per call of calls issued back to back then synchronised (includes launch overhead). CPU dry-run: "
              "perf_counter per call.",
    "asl_bytes": "B*C*(2*sizeof(logits) + 1): read logits and bool targets, write the gradient (the minimum a "
                 "one-pass loss+grad moves). The op as called through autograd also multiplies the saved "
                 "gradient by d loss in backward (one more read + write of B*C*sizeof(logits)), not counted.",
    "graph_timing": "ASL and attention rows, graph_*: the call captured once in a CUDA graph, each replay timed with CUDA events "
                    "after the L2 flush: device time without the host's per-call work (graph_error says why a "
                    "call could not be captured).",
    "blocks": "Triton attention + enhancement at the main attention shape with the block configuration of the "
              "row (BLOCK_SWEEP); speedup_vs_eager against the attention family's eager row of the same case.",
    "copy_bandwidth": "dst.copy_(src) of a large device buffer; GB/s = 2*bytes/time (read + write), 1e9 bytes.",
    "attention_flop": "4*B*C*N*d for the forward (QK^T and AV); forward+backward = 3.5x forward (FlashAttention "
                      "benchmark convention: backward recomputes QK^T). The progressive enhancement (C x C mixing) "
                      "is timed but not counted.",
    "enhance": "progressive_enhance alone, forward+backward (gradients of z, the affinity and lam), on z of the "
               "main attention case's Z0 shape [B, C, d] with its masked affinity: which backend kernels=auto "
               "should pick for the enhancement (the attention family times the two ops together). bytes: read z, "
               "write the output, read its gradient, write dz (B*C*L*4*sizeof(z)).",
    "peak_memory": "torch.cuda.max_memory_allocated during one call minus memory_allocated before it (inputs "
                   "excluded, returned gradients included).",
    "check": "max |out - ref| / max |ref| per output (z and every gradient; ASL: loss and grad), where ref is the "
             "eager reference backend in fp32 on the same inputs (half-precision cases: the inputs upcast). 'agrees': "
             "every error <= 1e-3 (fp32) or 3e-2 (bf16/fp16), or <= twice the eager reference's own error in the "
             "case's dtype ('eager_err'; a sum over millions of half-precision terms, such as d lam, can be off by "
             "more than 3e-2 in eager PyTorch itself).",
}

PROVIDER_DOC = {
    "eager": "ops.* with backend='reference' (plain PyTorch, autograd through the op)",
    "eager_module": "cssfe.losses.AsymmetricLoss with autograd (the unfused loss)",
    "compile": "torch.compile of the plain-PyTorch reference functions (ASL: closed-form loss+grad "
               "reference_impl.asl; attention: reference_impl.attention_fwd + enhance_fwd, autograd)",
    "compile_ro": "compile with mode='reduce-overhead' (CUDA graphs; the dry run's aot_eager has no modes)",
    "compile_autograd": "torch.compile(cssfe.losses.AsymmetricLoss) with autograd",
    "triton": "ops.* with backend='triton' (autograd through the op); attention: the strategy its width picks "
              "(cssfe/ops/triton/attention.py strategy_for: flash up to d=128, GEMM above)",
    "auto": "ops.* with backend='auto': what `kernels: auto` runs on this device (CUDA_AUTO in "
            "cssfe/ops/dispatch.py; the backends it resolved to are in the row's `resolved`)",
    "triton_flash": "triton with the attention's flash kernels forced (triton.attention.strategy('flash'))",
    "triton_gemm": "triton with the attention's GEMM strategy forced (batched GEMMs + Triton row kernels)",
    "triton_kernel": "library.asymmetric_loss_op(..., 'triton') under no_grad: the fused kernel alone",
    "cuda": "ops.* with backend='cuda' (the C++/CUDA extension)",
    "cuda_kernel": "library.asymmetric_loss_op(..., 'cuda') under no_grad: the fused kernel alone",
    "cpu": "ops.* with backend='cpu' (the C++/OpenMP extension; dry-run stand-in for cuda)",
    "cpu_kernel": "library.asymmetric_loss_op(..., 'cpu') under no_grad",
    "cuda_block": "enhance: cuda with the one-launch block program forced (library.native_enhance_strategy)",
    "cuda_staged": "enhance: cuda with the staged strategy forced (batched GEMMs per stage, csrc/enhance_staged.cpp)",
    "cpu_block": "enhance: cpu with its one-launch kernel forced (dry-run stand-in for cuda_block)",
    "cpu_staged": "enhance: cpu with the staged strategy forced (dry-run stand-in for cuda_staged)",
    "sdpa": "F.scaled_dot_product_attention (C queries of one head of dim d attend over N keys, q shared over "
            "the batch; K/V given as [B,1,N,d]) + progressive_enhance(backend='reference') in eager PyTorch",
    "sdpa_flash": "sdpa restricted to SDPBackend.FLASH_ATTENTION",
    "sdpa_efficient": "sdpa restricted to SDPBackend.EFFICIENT_ATTENTION",
    "sdpa_cudnn": "sdpa restricted to SDPBackend.CUDNN_ATTENTION",
    "sdpa_math": "sdpa restricted to SDPBackend.MATH",
}


# =============================================================================== small helpers
def _now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _clean(obj):
    """JSON-safe copy: non-finite floats become None, tuples lists, unknown objects strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in list(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in list(obj)]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _quantile(xs, q):
    s = sorted(xs)
    if not s:
        return None
    pos = (len(s) - 1) * q
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _err_record(exc: BaseException) -> dict:
    return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:3000]}",
            "traceback": traceback.format_exc()[-6000:]}


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - n))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _run_text(cmd, timeout=30) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (p.stdout + p.stderr).strip()
    except Exception as exc:  # noqa: BLE001 - recorded, never fatal
        return f"unavailable ({type(exc).__name__}: {exc})"


def _fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** -nd):
            return f"{x:.2e}"
        return f"{x:.{nd}f}"
    return str(x)


# =============================================================================== worker side
class Ctx:
    """Per-worker state: torch, the device, options, a timer, one cached case (inputs + reference)."""

    def __init__(self, spec):
        sys.path.insert(0, ROOT)
        import torch

        self.torch = torch
        self.spec = spec
        self.opts = spec["opts"]
        self.device = torch.device(spec["device"])
        self.cuda = self.device.type == "cuda"
        self.native = self.opts["native"]
        if not self.cuda:  # dry-run on a shared CPU: one thread (no thread-pool wake-ups in tiny ops)
            torch.set_num_threads(1)
        self._flush = None
        self._case_key = None
        self._case = None
        self._kc = None

    # -- device helpers
    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def healthy(self) -> bool:
        if not self.cuda:
            return True
        try:
            self.torch.cuda.synchronize()
            return float(self.torch.ones(4, device=self.device).sum().item()) == 4.0
        except Exception:  # noqa: BLE001
            return False

    def free(self):
        import gc

        gc.collect()
        if self.cuda:
            with contextlib.suppress(Exception):
                self.torch.cuda.empty_cache()

    def case(self, key, make):
        if key != self._case_key:
            self._case, self._case_key = None, None
            self.free()
            self._case = make()
            self._case_key = key
        return self._case

    def kernel_cases(self):
        if self._kc is None:
            if TESTS_OPS not in sys.path:
                sys.path.insert(0, TESTS_OPS)
            import kernel_cases as kc  # noqa: PLC0415 - tests/ops, needs only torch + cssfe

            kc.DEVICE = str(self.device)
            self._kc = kc
        return self._kc

    # -- timing
    def measure(self, fn, warmup=None, reps=None, max_s=None, flush=True) -> dict:
        torch = self.torch
        warmup = self.opts["warmup"] if warmup is None else warmup
        reps = self.opts["reps"] if reps is None else reps
        max_s = self.opts["max_case_s"] if max_s is None else max_s
        self.sync()
        t = time.perf_counter()
        for _ in range(max(1, warmup)):
            fn()
        self.sync()
        est = (time.perf_counter() - t) / max(1, warmup)
        n = int(max(3, min(reps, max_s / max(est, 1e-6))))
        if self.cuda:
            times = self._event_times(fn, n, flush)
        else:
            times = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        self.sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        b2b = (time.perf_counter() - t) * 1e3 / n
        return {"median_ms": _quantile(times, 0.5), "p20_ms": _quantile(times, 0.2), "p80_ms": _quantile(times, 0.8),
                "min_ms": min(times), "reps": n, "back_to_back_ms": b2b, "timer": "cuda_events" if self.cuda else "perf_counter"}

    def _event_times(self, fn, n, flush) -> list:
        """n CUDA-event timings (ms) of fn, each after the L2 flush when asked."""
        torch = self.torch
        if flush and self._flush is None and self.opts.get("flush_bytes"):
            self._flush = torch.empty(self.opts["flush_bytes"] // 4, dtype=torch.int32, device=self.device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            if flush and self._flush is not None:
                self._flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in events]

    def measure_graph(self, fn, reps=None) -> dict:
        """Device time alone: ``fn`` captured once in a CUDA graph, each replay timed with CUDA
        events after the L2 flush (the host's launch work is one graph launch, done while the
        flush runs). Says why when ``fn`` cannot be captured (a host sync inside, a CPU device)."""
        torch = self.torch
        if not self.cuda:
            return {"graph_note": "CPU: no CUDA graph"}
        reps = max(3, self.opts["reps"] if reps is None else reps)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            torch.cuda.synchronize()
            return {"graph_error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        times = self._event_times(graph.replay, reps, flush=True)
        del graph
        return {"graph_median_ms": _quantile(times, 0.5), "graph_p20_ms": _quantile(times, 0.2),
                "graph_p80_ms": _quantile(times, 0.8)}

    def peak_memory(self, fn) -> dict:
        if not self.cuda:
            return {"peak_bytes": None, "peak_above_base_bytes": None, "memory_note": "CPU: not measured"}
        torch = self.torch
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return {"peak_bytes": peak, "peak_above_base_bytes": peak - base}


def _dtype(ctx, name):
    return getattr(ctx.torch, name)


def _rel_err(got, want) -> float:
    got, want = got.detach().float(), want.detach().float()
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    return err / scale if scale > 0 else err


def _errors(names, got, want) -> dict:
    errs = {}
    for name, g, w in zip(names, got, want):
        try:
            errs[name] = _rel_err(g, w)
        except Exception as exc:  # noqa: BLE001
            errs[name] = f"{type(exc).__name__}: {exc}"
    return errs


def _compare(names, got, want, dtype_name, eager_err=None) -> dict:
    """Errors of ``got`` against the fp32 reference ``want``; ``eager_err``: the eager reference's own
    errors in the case's dtype (half precision), twice which is also accepted."""
    errs = _errors(names, got, want)
    tol = 1e-3 if dtype_name == "float32" else 3e-2
    floor = {n: 2 * v for n, v in (eager_err or {}).items() if isinstance(v, float) and math.isfinite(v)}
    finite = all(isinstance(v, float) and math.isfinite(v) for v in errs.values())
    rec = {"max_rel_err": errs, "tol": tol,
           "agrees": bool(finite and all(v <= max(tol, floor.get(n, 0.0)) for n, v in errs.items()))}
    if eager_err:
        rec["eager_err"] = eager_err
    return rec


# ----------------------------------------------------------------------------- env task
def task_env(task, ctx, emit):
    torch = ctx.torch
    rec = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "float32_matmul_precision": torch.get_float32_matmul_precision(), "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(Exception):
        rec["cudnn"] = torch.backends.cudnn.version()
    try:
        import triton

        rec["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        rec["triton"] = None
        rec["triton_error"] = f"{type(exc).__name__}: {exc}"
    errors = {}
    if ctx.cuda:
        try:
            props = torch.cuda.get_device_properties(ctx.device)
            rec.update({"device_name": torch.cuda.get_device_name(ctx.device),
                        "capability": "%d.%d" % torch.cuda.get_device_capability(ctx.device),
                        "sm_count": getattr(props, "multi_processor_count", None),
                        "total_memory_bytes": getattr(props, "total_memory", None),
                        "l2_cache_bytes": getattr(props, "L2_cache_size", None)})
        except Exception as exc:  # noqa: BLE001
            errors["device"] = _err_record(exc)
    else:
        rec["device_name"] = f"cpu ({platform.processor() or platform.machine()})"
    # device-to-device copy bandwidth
    try:
        nbytes = int(ctx.opts["copy_bytes"])
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=ctx.device)
        dst = torch.empty_like(src)
        m = ctx.measure(lambda: dst.copy_(src), warmup=3, reps=20, max_s=2.0, flush=False)
        rec["copy_bytes"] = nbytes
        rec["copy_ms"] = m["median_ms"]
        rec["copy_gbps"] = 2 * nbytes / (m["median_ms"] * 1e-3) / 1e9
        del src, dst
    except Exception as exc:  # noqa: BLE001
        errors["copy"] = _err_record(exc)
    # large bf16 matmul
    try:
        n = int(ctx.opts["matmul_n"])
        a = torch.randn(n, n, device=ctx.device).to(torch.bfloat16)
        b = torch.randn(n, n, device=ctx.device).to(torch.bfloat16)
        c = torch.empty(n, n, device=ctx.device, dtype=torch.bfloat16)
        m = ctx.measure(lambda: torch.mm(a, b, out=c), warmup=3, reps=20, max_s=2.0, flush=False)
        rec["matmul_n"] = n
        rec["matmul_ms"] = m["median_ms"]
        rec["matmul_bf16_tflops"] = 2 * n ** 3 / (m["median_ms"] * 1e-3) / 1e12
        del a, b, c
    except Exception as exc:  # noqa: BLE001
        errors["matmul"] = _err_record(exc)
    ctx.free()
    rec["errors"] = errors
    rec["ok"] = not errors
    return rec


# ----------------------------------------------------------------------------- build task
def _setup_py_build(timeout_s):
    """Fallback when ninja is missing: ``setup.py build_ext --inplace`` (slower, serial compile)."""
    from cssfe.ops.backends import native

    tmp = os.path.join(native.extension_dir(), "setup_build")
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp", tmp]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    return {"cmd": " ".join(cmd), "rc": p.returncode, "output_tail": (p.stdout + p.stderr)[-6000:]}


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
    except Exception:  # noqa: BLE001
        rec["ninja"] = False
    # A build killed midway leaves cpp_extension's lock file, and every later load then waits on it
    # forever. Nothing else builds while this task runs (phase 1, lane A), so a lock here is stale.
    if rec["build_hash"] is not None:
        _, _, build_dir = native.jit_target(rec["build_hash"])
        lock = os.path.join(build_dir, "lock")
        if os.path.exists(lock):
            with contextlib.suppress(OSError):
                os.remove(lock)
                rec.setdefault("removed_stale_locks", []).append(lock)
    t0 = time.perf_counter()
    if not rec["ninja"] and ctx.cuda and task.get("setup_py_fallback", True):
        try:
            rec["setup_py"] = _setup_py_build(task.get("timeout_s", 300) - 10)
        except Exception as exc:  # noqa: BLE001
            rec["setup_py"] = _err_record(exc)
    mod, reason = native.load()
    rec["build_s"] = time.perf_counter() - t0
    rec["loaded"] = mod is not None
    rec["reason"] = reason[-4000:] if isinstance(reason, str) else str(reason)
    rec["with_cuda"] = bool(getattr(mod, "with_cuda", False))
    rec["module_file"] = getattr(mod, "__file__", None)
    try:
        from cssfe.ops.dispatch import available_backends

        rec["available_backends"] = {k: {"ok": v[0], "reason": v[1]} for k, v in available_backends(build=False).items()}
    except Exception as exc:  # noqa: BLE001
        rec["available_backends_error"] = f"{type(exc).__name__}: {exc}"
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
            ctx.sync()
            rec["smoke"] = {"ok": bool(torch.isfinite(loss).item() and grad.shape == x.shape)}
        except Exception as exc:  # noqa: BLE001
            rec["smoke"] = _err_record(exc)
            rec["ok"] = False
            rec["error"] = f"native_asl smoke call failed: {rec['smoke']['error']}"
    return rec


# ----------------------------------------------------------------------------- parity task
def _parity_cases(kc, limit):
    cases = []
    for i, shape in enumerate(kc.ATTENTION_SHAPES[:limit]):
        cases.append(("attention", tuple(shape), {"batched_q": i % 2 == 1, "seed": i}))
    for i, shape in enumerate(kc.ENHANCE_SHAPES[:limit]):
        cases.append(("enhance", tuple(shape), {"mask": i % 2 == 0, "seed": i}))
    for i, shape in enumerate(kc.ASL_SHAPES[:limit]):
        cases.append(("asl", tuple(shape), dict(kc.ASL_VARIANTS[i % len(kc.ASL_VARIANTS)], seed=i)))
    for variant in kc.ASL_VARIANTS[:limit]:
        cases.append(("asl", (37, 20), dict(variant)))
    return cases


def task_parity(task, ctx, emit):
    """The kernel_cases checks (as in test_cuda.py / triton_cases.py) for one backend and dtype."""
    torch = ctx.torch
    kc = ctx.kernel_cases()
    dtype = _dtype(ctx, task["dtype"])
    fns = {"attention": kc.check_attention, "enhance": kc.check_enhance, "asl": kc.check_asl}
    limit = task.get("limit") or None
    passed = failed = 0
    for op, shape, kwargs in _parity_cases(kc, limit):
        sub = {"backend": task["backend"], "dtype": task["dtype"], "op": op, "shape": list(shape),
               "kwargs": {k: str(v) for k, v in kwargs.items()}}
        old_det = torch.are_deterministic_algorithms_enabled()
        old_fill = torch.utils.deterministic.fill_uninitialized_memory
        t0 = time.perf_counter()
        try:  # poison: unwritten outputs are NaN, as in the tests
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = True
            fns[op](task["backend"], shape, dtype, **kwargs)
            ctx.sync()
            sub["ok"] = True
            passed += 1
        except Exception as exc:  # noqa: BLE001
            sub.update(_err_record(exc))
            failed += 1
        finally:
            torch.use_deterministic_algorithms(old_det)
            torch.utils.deterministic.fill_uninitialized_memory = old_fill
        sub["seconds"] = time.perf_counter() - t0
        emit({"event": "sub", "id": task["id"], "record": sub})
        if not sub["ok"] and not ctx.healthy():
            raise RuntimeError(f"CUDA context unhealthy after {op} {shape}: stopping this suite")
    return {"ok": failed == 0, "passed": passed, "failed": failed}


# ----------------------------------------------------------------------------- ASL bench
ASL_ARGS = (0.0, 4.0, 0.05, 1e-8)  # gamma_pos, gamma_neg, clip, eps (the ASL defaults of the project)


def _asl_case(ctx, b, c, dtype_name):
    torch = ctx.torch
    import cssfe.ops as ops

    torch.manual_seed(0)
    x = (torch.randn(b, c, device=ctx.device) * 3).to(_dtype(ctx, dtype_name)).requires_grad_()
    y = torch.rand(b, c, device=ctx.device) < 0.1

    def ref(precise):
        xr = _leaf(x, precise)
        loss = ops.asymmetric_loss(xr, y, backend="reference")
        (g,) = torch.autograd.grad(loss, xr)
        return loss.detach(), g
    return {"x": x, "y": y, "make_ref": ref, "half": dtype_name != "float32"}


def _ref(case, names):
    """(fp32 eager result on the case's inputs, the eager result's own errors in the case's dtype or
    None), computed once (not for warm-up tasks). ``make_ref(precise)`` runs the eager reference, with
    the inputs upcast to fp32 when ``precise``."""
    if "ref" not in case:
        case["ref"] = case["make_ref"](True)
        case["eager_err"] = None
        if case["half"]:
            case["eager_err"] = _errors(names, case["make_ref"](False), case["ref"])
    return case["ref"], case["eager_err"]


def _leaf(t, precise):
    """A fresh fp32 copy of input ``t`` for the precise reference (a leaf that needs grad if ``t`` does)."""
    if not precise:
        return t
    out = t.detach().float().clone()
    return out.requires_grad_() if t.requires_grad else out


def _compiled(ctx, f, provider):
    """torch.compile of ``f`` for provider compile (default mode) or compile_ro (reduce-overhead:
    CUDA graphs, inductor only), shapes static."""
    torch = ctx.torch
    torch._dynamo.reset()
    backend = ctx.opts["compile_backend"]
    mode = "reduce-overhead" if provider == "compile_ro" and backend == "inductor" else None
    cf = torch.compile(f, dynamic=False, backend=backend, mode=mode)
    if mode is None:
        return cf

    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: its graph may be replayed
        return cf(*args)
    return call


def _asl_fn(provider, case, ctx):
    torch = ctx.torch
    import cssfe.ops as ops
    from cssfe.ops import library
    from cssfe.ops.backends import reference_impl

    x, y = case["x"], case["y"]
    gp, gn, clip, eps = ASL_ARGS

    def autograd_of(loss_fn):
        def fn():
            loss = loss_fn(x, y)
            (g,) = torch.autograd.grad(loss, x)
            return loss.detach(), g
        return fn

    def module():
        from cssfe.losses import AsymmetricLoss

        return AsymmetricLoss(gamma_neg=gn, gamma_pos=gp, clip=clip, eps=eps)

    if provider == "eager":
        return autograd_of(lambda a, b: ops.asymmetric_loss(a, b, backend="reference"))
    if provider == "eager_module":
        return autograd_of(module())
    if provider in ("compile", "compile_ro"):
        f = _compiled(ctx, lambda a, b: reference_impl.asl(a, b, gp, gn, clip, eps, False, False, True), provider)
        xd = x.detach()
        return lambda: f(xd, y)
    if provider == "compile_autograd":
        torch._dynamo.reset()
        return autograd_of(torch.compile(module(), dynamic=False, backend=ctx.opts["compile_backend"]))
    if provider.endswith("_kernel"):
        backend, xd = provider[: -len("_kernel")], x.detach()

        def fn():
            with torch.no_grad():
                return library.asymmetric_loss_op(xd, y, gp, gn, clip, eps, False, False, True, backend)
        return fn
    return autograd_of(lambda a, b: ops.asymmetric_loss(a, b, backend=provider))


def _run_checked(task, ctx, fn, names, case, dt):
    """First call (timed: compilation included), then either a second warm-up call (prewarm tasks)
    or the check against the eager result, the timing and the peak memory."""
    t0 = time.perf_counter()
    out = fn()
    ctx.sync()
    rec = {"first_call_s": time.perf_counter() - t0}
    if task.get("prewarm"):
        fn()
        ctx.sync()
        return dict(rec, ok=True, prewarm=True)
    want, eager_err = _ref(case, names)
    rec["check"] = _compare(names, out, want, dt, eager_err)
    del out
    rec.update(ctx.measure(fn))
    rec.update(ctx.peak_memory(fn))
    return rec


def task_bench_asl(task, ctx, emit):
    b, c, dt = task["B"], task["C"], task["dtype"]
    case = ctx.case(("asl", b, c, dt), lambda: _asl_case(ctx, b, c, dt))
    fn = _asl_fn(task["provider"], case, ctx)
    rec = _run_checked(task, ctx, fn, ("loss", "grad"), case, dt)
    if rec.get("prewarm"):
        return rec
    esize = case["x"].element_size()
    rec["bytes"] = b * c * (2 * esize + 1)
    rec["gbps"] = rec["bytes"] / (rec["median_ms"] * 1e-3) / 1e9
    rec.update(ctx.measure_graph(fn))
    if rec.get("graph_median_ms"):
        rec["graph_gbps"] = rec["bytes"] / (rec["graph_median_ms"] * 1e-3) / 1e9
    rec["ok"] = True
    return rec


# ----------------------------------------------------------------------------- attention bench
def masked_affinity(c, device):
    """(groups, affinity) of C classes: random thirds and the model's masked affinity (seeded); also
    what benchmarks/profile_ops.py profiles."""
    import torch
    from cssfe.ops import reference

    gen = torch.Generator().manual_seed(0)
    groups = torch.randperm(c, generator=gen) % 3
    affinity = reference.semantic_affinity(torch.randn(c, 32, generator=gen), groups, mask=True, tau=0.1)
    return groups.to(device), affinity.to(device)


def _attn_case(ctx, b, c, n, d, dtype_name):
    torch = ctx.torch
    import cssfe.ops as ops

    dtype = _dtype(ctx, dtype_name)
    groups, affinity = masked_affinity(c, ctx.device)
    torch.manual_seed(0)
    q = torch.randn(c, d, device=ctx.device, dtype=dtype).requires_grad_()
    k = torch.randn(b, d, n, device=ctx.device, dtype=dtype).requires_grad_()
    v = torch.randn(b, d, n, device=ctx.device, dtype=dtype).requires_grad_()
    gate = torch.rand(b, c, device=ctx.device).to(dtype)
    lam = torch.tensor(0.9, device=ctx.device, requires_grad=True)
    gout = torch.randn(b, c, d, device=ctx.device, dtype=dtype)
    case = {"q": q, "k": k, "v": v, "R": affinity, "groups": groups, "gate": gate, "lam": lam,
            "gout": gout, "shape": (b, c, n, d), "half": dtype_name != "float32"}

    def ref(precise):
        qr, kr, vr, lr = (_leaf(t, precise) for t in (q, k, v, lam))
        z0 = ops.class_attention(qr, kr, vr, backend="reference")
        z1 = ops.progressive_enhance(z0, case["R"], groups, _leaf(gate, precise), lr, backend="reference")
        return (z1.detach(),) + tuple(torch.autograd.grad(z1, (qr, kr, vr, lr), _leaf(gout, precise)))
    case["make_ref"] = ref
    return case


def _attn_fns(provider, case, ctx):
    """(fwd+bwd fn returning (z1, dq, dk, dv, dlam), forward-only fn or None)."""
    torch = ctx.torch
    import cssfe.ops as ops
    from cssfe.ops.backends import reference_impl

    q, k, v, R, groups, gate, lam, gout = (case[n] for n in ("q", "k", "v", "R", "groups", "gate", "lam", "gout"))
    b, c, n, d = case["shape"]

    def with_grad(forward, leaves=(q, k, v, lam), post=None):
        def fn():
            z1 = forward()
            grads = torch.autograd.grad(z1, leaves, gout)
            if post is not None:
                grads = post(grads)
            return (z1.detach(),) + tuple(grads)

        def fwd():
            with torch.no_grad():
                return forward()
        return fn, fwd

    if provider in ("triton_flash", "triton_gemm"):  # backward reads the strategy too: wrap whole calls
        from cssfe.ops.triton import attention as triton_attention

        return tuple(_within(triton_attention.strategy, provider.split("_")[1], f) for f in _attn_fns("triton", case, ctx))
    if provider in ("eager", "auto", "triton", "cuda", "cpu"):
        be = "reference" if provider == "eager" else provider
        return with_grad(lambda: ops.progressive_enhance(ops.class_attention(q, k, v, backend=be), R, groups, gate,
                                                         lam, backend=be))
    if provider in ("compile", "compile_ro"):
        def f(q_, k_, v_, lam_):
            z0, _ = reference_impl.attention_fwd(q_.unsqueeze(0), k_, v_)
            return reference_impl.enhance_fwd(z0, R, groups, (lam_.float() * gate.float()).contiguous())

        cf = _compiled(ctx, f, provider)
        return with_grad(lambda: cf(q, k, v, lam))[0], None
    if provider.startswith("sdpa"):
        import torch.nn.functional as F

        kernel = None
        if provider != "sdpa":
            from torch.nn.attention import SDPBackend

            kernel = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                      "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_math": SDPBackend.MATH}[provider]
        ks = k.detach().transpose(1, 2).unsqueeze(1).contiguous().requires_grad_()  # [B, 1, N, d]
        vs = v.detach().transpose(1, 2).unsqueeze(1).contiguous().requires_grad_()

        def forward():
            if kernel is None:
                cm = contextlib.nullcontext()
            else:
                from torch.nn.attention import sdpa_kernel

                cm = sdpa_kernel(kernel)
            with cm:
                z0 = F.scaled_dot_product_attention(q.unsqueeze(0).unsqueeze(0).expand(b, 1, c, d), ks, vs).squeeze(1)
            return ops.progressive_enhance(z0, R, groups, gate, lam, backend="reference")

        post = lambda g: (g[0], g[1].squeeze(1).transpose(1, 2), g[2].squeeze(1).transpose(1, 2), g[3])  # noqa: E731
        return with_grad(forward, (q, ks, vs, lam), post)
    raise ValueError(f"unknown attention provider {provider!r}")


def task_bench_attention(task, ctx, emit):
    b, c, n, d, dt = task["B"], task["C"], task["N"], task["d"], task["dtype"]
    case = ctx.case(("attn", b, c, n, d, dt), lambda: _attn_case(ctx, b, c, n, d, dt))
    fn, fwd = _attn_fns(task["provider"], case, ctx)
    rec = _run_checked(task, ctx, fn, ("z", "dq", "dk", "dv", "dlam"), case, dt)
    if rec.get("prewarm"):
        return rec
    if task["provider"] == "auto":
        from cssfe.ops import dispatch

        rec["resolved"] = {op: dispatch.resolve("auto", case["k"].device, op, case["k"].dtype, classes=c)
                           for op in ("class_attention", "progressive_enhance")}
    flop = 4.0 * b * c * n * d
    rec["flop_fwd"] = flop
    rec["flop_fwd_bwd"] = 3.5 * flop
    rec["tflops_fwd_bwd"] = 3.5 * flop / (rec["median_ms"] * 1e-3) / 1e12
    if fwd is not None and task.get("fwd", True):
        _measure_fwd(ctx, rec, fwd)
        if rec.get("fwd_median_ms"):
            rec["tflops_fwd"] = flop / (rec["fwd_median_ms"] * 1e-3) / 1e12
    if task["kind"] == "attention":  # device time alone: the per-call time was bound by the host
        rec.update(ctx.measure_graph(fn))
    rec["ok"] = True
    return rec


def _measure_fwd(ctx, rec, fwd):
    """The forward alone, into rec (fwd_*); a failure there is recorded without losing the row."""
    try:
        m = ctx.measure(fwd, max_s=ctx.opts["max_case_s"] / 2)
        rec["fwd_median_ms"], rec["fwd_p20_ms"], rec["fwd_p80_ms"] = m["median_ms"], m["p20_ms"], m["p80_ms"]
        rec["fwd_peak"] = ctx.peak_memory(fwd)
    except Exception as exc:  # noqa: BLE001
        rec["fwd_error"] = f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- enhancement bench
def _enh_case(ctx, b, c, l, dtype_name):
    torch = ctx.torch
    import cssfe.ops as ops

    dtype = _dtype(ctx, dtype_name)
    groups, affinity = masked_affinity(c, ctx.device)
    torch.manual_seed(0)
    case = {"z": torch.randn(b, c, l, device=ctx.device, dtype=dtype).requires_grad_(),
            "R": affinity.requires_grad_(), "groups": groups,
            "gate": torch.rand(b, c, device=ctx.device).to(dtype),
            "lam": torch.tensor(0.9, device=ctx.device, requires_grad=True),
            "gout": torch.randn(b, c, l, device=ctx.device, dtype=dtype), "half": dtype_name != "float32"}

    def ref(precise):
        z, r, lam = (_leaf(case[k], precise) for k in ("z", "R", "lam"))
        out = ops.progressive_enhance(z, r, groups, _leaf(case["gate"], precise), lam, backend="reference")
        return (out.detach(),) + tuple(torch.autograd.grad(out, (z, r, lam), _leaf(case["gout"], precise)))
    case["make_ref"] = ref
    return case


def _enh_fns(provider, case, ctx):
    """(fwd+bwd fn returning (out, dz, dR, dlam), forward-only fn)."""
    torch = ctx.torch
    import cssfe.ops as ops
    from cssfe.ops import library
    from cssfe.ops.backends import reference_impl

    z, R, groups, gate, lam, gout = (case[n] for n in ("z", "R", "groups", "gate", "lam", "gout"))
    if provider == "compile":
        def f(z_, r_, lam_):
            return reference_impl.enhance_fwd(z_, r_, groups, (lam_.float() * gate.float()).contiguous())

        torch._dynamo.reset()
        cf = torch.compile(f, dynamic=False, backend=ctx.opts["compile_backend"])
        forward = lambda: cf(z, R, lam)  # noqa: E731
    elif provider in gpu_goals.THROUGH_OP:  # one backend through the op
        be = "reference" if provider == "eager" else provider
        forward = lambda: ops.progressive_enhance(z, R, groups, gate, lam, backend=be)  # noqa: E731
    elif provider.rsplit("_", 1)[-1] in library.NATIVE_ENHANCE_STRATEGIES:  # cuda_staged ...: both directions
        be, strategy = provider.rsplit("_", 1)
        plain = _enh_fns(be, case, ctx)
        return tuple(_within(library.native_enhance_strategy, strategy, f) for f in plain)
    else:
        raise ValueError(f"unknown enhance provider {provider!r}")

    def fn():
        out = forward()
        return (out.detach(),) + tuple(torch.autograd.grad(out, (z, R, lam), gout))

    def fwd():
        with torch.no_grad():
            return forward()
    return fn, fwd


def _within(context, name, f):
    """f, run inside ``context(name)`` (a strategy override: the backward must see it too)."""
    def run():
        with context(name):
            return f()
    return run


def task_bench_enhance(task, ctx, emit):
    b, c, l, dt = task["B"], task["C"], task["L"], task["dtype"]
    case = ctx.case(("enhance", b, c, l, dt), lambda: _enh_case(ctx, b, c, l, dt))
    fn, fwd = _enh_fns(task["provider"], case, ctx)
    rec = _run_checked(task, ctx, fn, ("out", "dz", "dR", "dlam"), case, dt)
    if rec.get("prewarm"):
        return rec
    rec["bytes"] = 4 * b * c * l * case["z"].element_size()
    rec["gbps"] = rec["bytes"] / (rec["median_ms"] * 1e-3) / 1e9
    _measure_fwd(ctx, rec, fwd)
    rec["ok"] = True
    return rec


# Triton flash attention blocks tried at the main attention shape: (BLOCK_C, BLOCK_N, num_warps,
# num_stages). The first is what _blocks (cssfe/ops/triton/attention.py) picks at d = 512 when the flash
# strategy is forced (wide features take the GEMM strategy by default).
# Compiled offline for sm_90 (as tests/ops/test_triton_compile.py does), the largest kernel of each asks
# 64, 97, 192, 97, 97, 130, 97 and 130 KB of shared memory; BLOCK_C = 64 (288 and 320 KB) does not fit
# in 227 KB and is left out.
BLOCK_SWEEP = [(16, 16, 8, 1), (16, 32, 8, 1), (16, 64, 8, 1), (16, 32, 4, 1), (32, 16, 8, 1), (32, 32, 8, 1),
               (16, 32, 8, 2), (32, 32, 8, 2)]
BLOCK_SWEEP_DRY = [(8, 8, 4, 1), (16, 16, 4, 1)]


def task_bench_blocks(task, ctx, emit):
    """The Triton flash attention + enhancement at one block configuration (checked against eager)."""
    from cssfe.ops.triton import attention as triton_attention

    b, c, n, d, dt = task["B"], task["C"], task["N"], task["d"], task["dtype"]
    case = ctx.case(("attn", b, c, n, d, dt), lambda: _attn_case(ctx, b, c, n, d, dt))
    with triton_attention.strategy("flash"), triton_attention.block_config(
            task["block_c"], task["block_n"], num_warps=task["num_warps"], num_stages=task["num_stages"]):
        fn, _ = _attn_fns("triton", case, ctx)
        rec = _run_checked(task, ctx, fn, ("z", "dq", "dk", "dv", "dlam"), case, dt)
    rec["tflops_fwd_bwd"] = 3.5 * 4.0 * b * c * n * d / (rec["median_ms"] * 1e-3) / 1e12
    rec["ok"] = True
    return rec


HANDLERS = {"env": task_env, "build": task_build, "parity": task_parity, "asl": task_bench_asl,
            "attention": task_bench_attention, "grid": task_bench_attention, "blocks": task_bench_blocks,
            "enhance": task_bench_enhance}
BENCH_FAMILIES = ("asl", "attention", "enhance", "blocks", "grid")  # benchmark kinds, in the summary's order


def _inject_fault(task):
    """Testing aid: GPU_CHECK_FAULT="provider[:dtype]=crash|hang|raise,..." makes matching tasks fail the
    way a broken kernel would (crash: the process dies as on a segfault; hang: never returns)."""
    spec = os.environ.get("GPU_CHECK_FAULT")
    if not spec or task.get("prewarm"):
        return
    for item in spec.split(","):
        target, _, what = item.partition("=")
        prov, _, dt = target.partition(":")
        if prov == task.get("provider") and (not dt or dt == task.get("dtype")):
            if what == "crash":
                os._exit(139)
            if what == "hang":
                time.sleep(3600)
            raise RuntimeError(f"injected fault ({item})")


def worker_main(spec_path: str, result_path: str) -> int:
    with open(spec_path) as fh:
        spec = json.load(fh)
    out = open(result_path, "a", buffering=1)

    def emit(ev):
        out.write(json.dumps(_clean(ev)) + "\n")
        out.flush()

    try:
        ctx = Ctx(spec)
    except BaseException as exc:  # noqa: BLE001 - e.g. torch not importable
        emit({"event": "fatal", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]})
        return 2
    for task in spec["tasks"]:
        if time.time() > spec["deadline"]:
            emit({"event": "result", "id": task["id"], "record": {"ok": False, "skipped": "time budget"}})
            continue
        emit({"event": "start", "id": task["id"]})
        print(f"[gpu_check worker] {time.strftime('%H:%M:%S')} start {task['id']}", flush=True)
        t0 = time.perf_counter()
        try:
            _inject_fault(task)
            rec = HANDLERS[task["kind"]](task, ctx, emit)
        except Exception as exc:  # noqa: BLE001
            rec = _err_record(exc)
            print(rec["traceback"], flush=True)
        rec.setdefault("ok", True)
        rec["seconds"] = time.perf_counter() - t0
        emit({"event": "result", "id": task["id"], "record": rec})
        if not rec["ok"] and ctx.cuda and not ctx.healthy():
            emit({"event": "unhealthy", "id": task["id"]})
            return 3
    return 0


# =============================================================================== orchestrator
def host_env() -> dict:
    e = {"date_utc": _now_utc(), "python": sys.version.split()[0], "platform": platform.platform(),
         "cpu_count": os.cpu_count(),
         "env": {k: os.environ.get(k) for k in ("MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "CSSFE_EXT_DIR", "CUDA_HOME",
                                               "TRITON_INTERPRET", "CSSFE_NO_CUDA", "CSSFE_NO_JIT",
                                               "CSSFE_KERNEL_BACKEND", "CUDA_VISIBLE_DEVICES")}}
    commit, source = None, None
    if os.path.exists(os.path.join(ROOT, ".git")) and shutil.which("git"):
        try:
            p = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=20)
            if p.returncode == 0 and p.stdout.strip():
                commit, source = p.stdout.strip(), "git"
                d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=20)
                e["git_dirty"] = bool(d.stdout.strip())
        except Exception:  # noqa: BLE001
            pass
    if commit is None:
        path = os.path.join(ROOT, "benchmarks", "results", "COMMIT")
        if os.path.exists(path):
            with open(path) as fh:
                commit, source = fh.read().strip() or None, "benchmarks/results/COMMIT"
    e["commit"], e["commit_source"] = commit or "unknown", source or "none"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
                nvcc = os.path.join(home, "bin", "nvcc")
                break
    e["nvcc_path"] = nvcc
    if nvcc:
        text = _run_text([nvcc, "--version"])
        e["nvcc_version"] = " ".join(text.splitlines()[-2:]) if text else None
    else:
        e["nvcc_version"] = None
    if shutil.which("nvidia-smi"):
        e["nvidia_smi"] = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap,"
                                     "clocks.max.sm,power.limit", "--format=csv,noheader"])
    e["ninja"] = shutil.which("ninja")
    e["pytest_available"] = importlib.util.find_spec("pytest") is not None
    e["triton_installed"] = importlib.util.find_spec("triton") is not None
    return e


class Orchestrator:
    def __init__(self, args):
        self.args = args
        self.dry = args.cpu_dry_run
        self.t_start = time.time()
        self.deadline = self.t_start + args.budget_s
        self.out = os.path.abspath(args.out)
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.work = tempfile.mkdtemp(prefix="cssfe_gpu_check_")
        self.json_path = os.path.join(self.out, "gpu_check.json")
        self.lock = threading.RLock()
        self.save_lock = threading.Lock()
        self.children = set()
        self.native = "cpu" if self.dry else "cuda"
        self.device = "cpu" if self.dry else "cuda"
        self.opts = self._opts()
        self.child_env = self._child_env()
        self.R = {
            "schema": SCHEMA, "mode": "cpu-dry-run" if self.dry else "gpu", "status": "running",
            "started_utc": _now_utc(), "args": vars(args), "budget_s": args.budget_s,
            "environment": {}, "build": {}, "parity": {"pytest": {"runs": []}, "direct": {"checks": []}},
            "benchmarks": {"definitions": DEFINITIONS, "providers": {}, **{fam: [] for fam in BENCH_FAMILIES}},
            "steps": [], "errors": [],
        }
        self._counter = 0

    # -------------------------------------------------------------- configuration
    def _opts(self):
        a = self.args
        if self.dry:
            return {"native": "cpu", "warmup": 1, "reps": 3, "max_case_s": 0.3, "flush_bytes": 0,
                    "copy_bytes": 16 << 20, "matmul_n": 256, "compile_backend": a.compile_backend or "aot_eager"}
        return {"native": "cuda", "warmup": 5, "reps": 15 if a.quick else 30, "max_case_s": 1.0 if a.quick else 1.5,
                "flush_bytes": 256 << 20, "copy_bytes": 1 << 30, "matmul_n": 8192,
                "compile_backend": a.compile_backend or "inductor"}

    def _child_env(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        for k in ("CSSFE_KERNEL_BACKEND",):
            env.pop(k, None)
        if not self.dry:
            env.pop("TRITON_INTERPRET", None)
            env.pop("CSSFE_NO_JIT", None)
            env.pop("CSSFE_NO_CUDA", None)
        if shutil.which("ninja") is None:  # a pip `ninja` whose binary is not on PATH
            try:
                import ninja  # type: ignore

                env["PATH"] = ninja.BIN_DIR + os.pathsep + env.get("PATH", "")
            except Exception:  # noqa: BLE001
                pass
        return env

    # -------------------------------------------------------------- recording
    def save(self):
        with self.save_lock:  # both lanes save: one writer of the temporary file at a time
            with self.lock:
                data = _clean(self.R)
            tmp = self.json_path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(data, fh, indent=1)
            os.replace(tmp, self.json_path)

    def error(self, where, exc=None, message=None):
        with self.lock:
            item = {"where": where, "error": message or (f"{type(exc).__name__}: {exc}" if exc else "error")}
            if exc is not None:
                item["traceback"] = traceback.format_exc()[-4000:]
            self.R["errors"].append(item)

    def time_left(self):
        return self.deadline - RESERVE_S - time.time()

    def step_record(self, name, lane, **kw):
        with self.lock:
            rec = {"name": name, "lane": lane, "start_s": round(time.time() - self.t_start, 2), **kw}
            self.R["steps"].append(rec)
            return rec

    def _register(self, proc):
        with self.lock:
            self.children.add(proc)
            self._write_pgids()

    def _unregister(self, proc):
        with self.lock:
            self.children.discard(proc)
            self._write_pgids()

    def _write_pgids(self):
        path = os.environ.get("GPU_CHECK_PGID_FILE")
        if path:
            with contextlib.suppress(OSError), open(path, "w") as fh:
                fh.write("\n".join(str(p.pid) for p in self.children if p.poll() is None))

    @staticmethod
    def _kill(proc):
        if proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            with contextlib.suppress(Exception):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)

    def kill_all(self):
        for proc in list(self.children):
            self._kill(proc)

    # -------------------------------------------------------------- running workers
    def _next_id(self, prefix):
        with self.lock:
            self._counter += 1
            return f"{prefix}{self._counter}"

    def run_worker(self, step, tasks, cap_s, stop_event=None, lane="main", max_launches=6, env=None):
        """Runs ``tasks`` in worker processes, restarting after crashes; returns ({id: record}, {id: [subs]})."""
        records, subs, crashes, reported = {}, {}, {}, set()
        child_env = dict(self.child_env, **(env or {}))
        info = self.step_record(step, lane, tasks=len(tasks), launches=0, log=f"logs/{step}.log")
        t0 = time.time()
        step_deadline = min(time.time() + cap_s, self.deadline - RESERVE_S)
        log_path = os.path.join(self.logs, f"{step}.log")
        by_id = {t["id"]: t for t in tasks}
        pending = list(tasks)
        status = "done"

        def key(t):
            return t.get("provider") or t.get("backend") or t["kind"]

        while pending:
            reason = None
            if time.time() > step_deadline - 3:
                reason = "skipped: time budget"
            elif stop_event is not None and stop_event.is_set():
                reason = "skipped: stopped (the build finished)"
            elif info["launches"] >= max_launches:
                reason = "skipped: too many worker restarts"
            if reason:
                for t in pending:
                    records[t["id"]] = {"ok": False, "skipped": reason}
                status = reason
                break
            info["launches"] += 1
            spec_path = os.path.join(self.work, f"{step}_{info['launches']}.json")
            res_path = os.path.join(self.work, f"{step}_{info['launches']}.jsonl")
            with open(spec_path, "w") as fh:
                json.dump({"device": self.device, "opts": self.opts, "tasks": pending, "deadline": step_deadline}, fh)
            with open(log_path, "a") as log:
                log.write(f"\n===== {_now_utc()} launch {info['launches']}: {len(pending)} tasks\n")
                log.flush()
                proc = subprocess.Popen([sys.executable, SCRIPT, "--worker", spec_path, "--result", res_path],
                                        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env,
                                        start_new_session=True)
            self._register(proc)
            offset, current, current_start, killed, fatal, unhealthy = 0, None, None, None, None, None
            last_event = time.time()
            while True:
                rc = proc.poll()
                offset, events = _read_events(res_path, offset)
                if events:
                    last_event = time.time()
                for ev in events:
                    kind = ev.get("event")
                    if kind == "start":
                        current, current_start = ev["id"], time.time()
                    elif kind == "sub":
                        subs.setdefault(ev["id"], []).append(ev["record"])
                    elif kind == "result":
                        records[ev["id"]] = ev["record"]
                        current = None
                        self.on_record(step, by_id.get(ev["id"]), ev["record"], subs.get(ev["id"]))
                        reported.add(ev["id"])
                    elif kind == "fatal":
                        fatal = ev
                    elif kind == "unhealthy":
                        unhealthy = ev["id"]
                if rc is not None:
                    break
                now = time.time()
                if current is not None and now - current_start > by_id[current].get("timeout_s", 120):
                    killed = f"timeout: task ran over {by_id[current].get('timeout_s', 120)} s"
                elif current is None and now - last_event > IDLE_TIMEOUT_S:
                    killed = f"timeout: worker idle for {IDLE_TIMEOUT_S:.0f} s between tasks (start-up or exit hang)"
                elif now > step_deadline:
                    killed = "step time budget ran out while running"
                elif stop_event is not None and stop_event.is_set():
                    killed = "stopped (the build finished)"
                if killed:
                    self._kill(proc)
                    rc = proc.poll()
                    offset, events = _read_events(res_path, offset)
                    for ev in events:
                        if ev.get("event") == "result":
                            records[ev["id"]] = ev["record"]
                            current = None
                        elif ev.get("event") == "sub":
                            subs.setdefault(ev["id"], []).append(ev["record"])
                    break
                time.sleep(0.25)
            self._unregister(proc)
            if fatal:
                for t in pending:
                    records.setdefault(t["id"], {"ok": False, "error": f"worker could not start: {fatal['error']}",
                                                 "traceback": fatal.get("traceback")})
                status = "fatal"
                pending = []
                break
            if current is not None and current not in records:
                msg = killed or f"worker died (exit code {rc}) while running this task"
                records[current] = {"ok": False, "error": msg, "log_tail": _tail(log_path)}
                crashes[key(by_id[current])] = crashes.get(key(by_id[current]), 0) + 1
            if unhealthy is not None:
                crashes[key(by_id[unhealthy])] = crashes.get(key(by_id[unhealthy]), 0) + 1
            pending = [t for t in pending if t["id"] not in records]
            for t in pending:
                if crashes.get(key(t), 0) >= 2:
                    records[t["id"]] = {"ok": False, "skipped": f"{key(t)} broke the worker twice (crash, hang "
                                                                  "or unusable CUDA context)"}
            pending = [t for t in pending if t["id"] not in records]
            if killed and not killed.startswith("timeout"):
                for t in pending:
                    records[t["id"]] = {"ok": False, "skipped": f"skipped: {killed}"}
                status = killed
                pending = []
            elif rc == 0 and pending:  # should not happen: the worker answers every task
                for t in pending:
                    records[t["id"]] = {"ok": False, "error": "worker exited without running this task"}
                pending = []
        for t in tasks:  # results that did not come from the worker (crash, timeout, skipped)
            if t["id"] in records and t["id"] not in reported:
                self.on_record(step, t, records[t["id"]], subs.get(t["id"]))
        info.update(seconds=round(time.time() - t0, 2), status=status,
                    failed=sum(1 for r in records.values() if not r.get("ok") and not r.get("skipped")),
                    skipped=sum(1 for r in records.values() if r.get("skipped")))
        self.save()
        return records, subs

    def on_record(self, step, task, record, subs):
        """Called as results arrive: keep the JSON current."""
        if task is None:
            return
        with self.lock:
            if task["kind"] in BENCH_FAMILIES and not task.get("prewarm"):
                self.R["benchmarks"][task["kind"]].append(dict(_task_fields(task), **record))
            elif task["kind"] == "parity":
                self.R["parity"]["direct"]["suites"] = self.R["parity"]["direct"].get("suites", [])
                self.R["parity"]["direct"]["suites"].append(dict(_task_fields(task), **record))
                self.R["parity"]["direct"]["checks"].extend(subs or [])
        with contextlib.suppress(Exception):
            self.save()

    # -------------------------------------------------------------- pytest
    def run_pytest(self, name, nodes, cap_s, lane):
        run = {"name": name, "nodes": nodes}
        info = self.step_record(f"pytest_{name}", lane, log=f"logs/pytest_{name}.log")
        timeout = min(cap_s, self.time_left())
        if timeout < 20:
            run["skipped"] = "time budget"
            info["status"] = "skipped"
            with self.lock:
                self.R["parity"]["pytest"]["runs"].append(run)
            return run
        xml = os.path.join(self.work, f"junit_{name}.xml")
        cmd = [sys.executable, "-m", "pytest", *nodes, "-q", "-rs", "-p", "no:cacheprovider", "-m", "not slow",
               f"--junitxml={xml}"]
        run["cmd"] = " ".join(cmd[1:])
        log_path = os.path.join(self.logs, f"pytest_{name}.log")
        t0 = time.time()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.child_env,
                                    start_new_session=True)
        self._register(proc)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            run["error"] = f"pytest ran over {timeout:.0f} s and was killed"
        self._unregister(proc)
        run["rc"] = proc.returncode
        run["seconds"] = round(time.time() - t0, 2)
        run["output_tail"] = _tail(log_path, 4000)
        run["tests"] = _parse_junit(xml)
        counts = {}
        for t in run["tests"]:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        run["counts"] = counts
        info.update(seconds=run["seconds"], status=run.get("error") or f"rc={run['rc']} {counts}")
        with self.lock:
            self.R["parity"]["pytest"]["runs"].append(run)
        self.save()
        return run

    # -------------------------------------------------------------- steps
    def step_build(self):
        if not self.wants_native():
            with self.lock:
                self.R["build"] = {"ok": False, "skipped": f"--providers {self.args.providers} names no {self.native} provider"}
            self.save()
            return
        task = {"id": "build", "kind": "build", "timeout_s": int(self.args.build_timeout_s),
                "setup_py_fallback": not self.dry}
        records, _ = self.run_worker("build", [task], cap_s=self.args.build_timeout_s + 15, lane="A",
                                     env={"CSSFE_EXT_VERBOSE": "1"})  # compiler output goes to logs/build.log
        rec = records.get("build", {"ok": False, "error": "no result"})
        if not rec.get("ok"):
            rec["log_tail"] = _tail(os.path.join(self.logs, "build.log"), 8000)
        with self.lock:
            self.R["build"] = rec
        self.save()

    def step_env(self):
        records, _ = self.run_worker("env", [{"id": "env", "kind": "env", "timeout_s": 150}], cap_s=180, lane="B")
        rec = records.get("env", {"ok": False, "error": "no result"})
        with self.lock:
            self.R["environment"].update({k: v for k, v in rec.items() if k not in ("seconds",)})
            self.R["environment"]["env_step_ok"] = rec.get("ok", False)
        self.save()

    def triton_available(self):
        env = self.R["environment"]
        if not env.get("triton"):
            return False, "triton not importable"
        if self.dry:
            if os.environ.get("TRITON_INTERPRET") == "1":
                return True, "TRITON_INTERPRET=1 (CPU interpreter)"
            return False, "dry-run: set TRITON_INTERPRET=1 to include triton"
        if not env.get("cuda_available"):
            return False, "no CUDA device"
        return True, "triton with a CUDA device"

    def native_available(self):
        b = self.R.get("build") or {}
        if b.get("ok"):
            return True, b.get("reason", "built")
        return False, b.get("error") or b.get("skipped") or "extension not built"

    def parity_direct_tasks(self, backend):
        if self.dry:
            dtypes = ["float32"] if backend == "triton" else ["float32", "bfloat16"]
            limit = 1 if backend == "triton" else 2
        else:
            dtypes, limit = ["float32", "float16", "bfloat16"], None
        return [{"id": self._next_id(f"parity:{backend}:{dt}:"), "kind": "parity", "backend": backend, "dtype": dt,
                 "limit": limit, "timeout_s": 240} for dt in dtypes]

    def parity_for(self, node, backend, lane, cap_s):
        """pytest test ``node`` when pytest is importable, else the direct checks of ``backend``;
        returns 'passed' | 'failed' | 'error' | 'skipped' for the summary."""
        if self.R["environment"].get("pytest_available") and not self.args.no_pytest:
            nodes = PYTEST_NODES[node] + (["-k", PYTEST_DRY_SELECT[node]] if self.dry else [])
            run = self.run_pytest(node, nodes, cap_s, lane)
            counts = run.get("counts", {})
            if run.get("skipped") or run.get("error") or not run.get("tests"):
                return "error"
            if counts.get("failed") or counts.get("error"):
                return "failed"
            if counts.get("passed"):
                return "passed"
            return "skipped"
        with self.lock:
            self.R["parity"]["pytest"]["note"] = "skipped: pytest not installed (or --no-pytest); direct checks run"
        records, _ = self.run_worker(f"parity_{backend}", self.parity_direct_tasks(backend), cap_s, lane=lane)
        return "passed" if records and all(r.get("ok") for r in records.values()) else "failed"

    def set_parity_summary(self, backend, value):
        with self.lock:
            self.R["parity"].setdefault("summary", {})[backend] = value
        self.save()

    # -------------------------------------------------------------- benchmark plans
    def wants_native(self):
        keep = self.args.providers
        return not keep or any(p.split("_")[0] == self.native for p in keep.split(","))

    def providers(self, triton_ok, native_ok):
        plist = self._providers(triton_ok, native_ok)
        if self.args.providers:  # --providers eager,triton keeps those (and their *_kernel variants)
            keep = set(self.args.providers.split(","))
            plist = {f: [p for p in names if p in keep or p.rsplit("_kernel", 1)[0] in keep] for f, names in plist.items()}
        return plist

    def _providers(self, triton_ok, native_ok):
        a = self.args
        plist = {
            "asl": ["eager", "eager_module", "compile", "compile_ro"] + ([] if a.quick else ["compile_autograd"])
                   + (["triton", "triton_kernel"] if triton_ok else []) + ([self.native, self.native + "_kernel"] if native_ok else []),
            "attention": ["eager", "compile", "compile_ro", "auto"] + (["triton", "triton_flash", "triton_gemm"] if triton_ok else [])
                         + ([self.native] if native_ok else [])
                         + ["sdpa"] + (["sdpa_math"] if self.dry else ["sdpa_flash", "sdpa_efficient", "sdpa_cudnn"]),
            "enhance": ["eager"] + ([] if a.quick else ["compile"]) + (["triton"] if triton_ok else [])
                       + ([self.native, self.native + "_block", self.native + "_staged"] if native_ok else []),
            "grid": ["eager", "auto"] + (["triton", "triton_flash"] if triton_ok else [])
                    + ([self.native] if native_ok else []) + ["sdpa"],
        }
        return plist

    def bench_tasks(self, plist, prewarm=False):
        """(tier1, tier2, grid) task lists. Prewarm: only the providers with disk caches (compile, triton)."""
        a = self.args
        if self.dry:
            asl_shapes, asl_main = [(64, 20), (16, 100)], (64, 20)
            attn, attn_dtypes = (2, 8, 16, 32), ["bfloat16", "float32"]
            grid_b, grid = 2, [(c, n, d) for c in (4, 8) for n in (9,) for d in (16,)]
            grid_dt = "float32"  # so the Triton interpreter (fp32 only) runs the grid too
        else:
            asl_shapes, asl_main = [(16384, 1024), (4096, 80), (256, 1000)], (16384, 1024)
            attn, attn_dtypes = (64, 80, 784, 512), ["bfloat16", "float32"]
            grid_b, grid_dt = 32, "bfloat16"
            if a.quick:
                grid = [(c, n, 512) for c in (80, 1000) for n in (196, 784)]
            else:
                grid = [(c, n, d) for c in (20, 80, 1000) for n in (49, 196, 784) for d in (256, 512, 768)]
        enh = (attn[0], attn[1], attn[3])  # z of the main attention case's Z0 shape [B, C, d]
        # where the goals and the fastest backends are judged
        self.R["benchmarks"]["main_cases"] = {"asl": list(asl_main), "attention": list(attn), "enhance": list(enh)}
        fams = set(a.families.split(","))
        keep_p = (lambda p: p.startswith("compile") or p.startswith("triton")) if prewarm else (lambda p: True)

        def keep(p, dt="float32"):  # bf16 is broken in the Triton interpreter (tests/ops/test_triton.py)
            return keep_p(p) and not (self.dry and p.startswith("triton") and dt != "float32")

        tier1, tier2, grid_tasks = [], [], []

        def to(p):
            if a.task_timeout_s:
                return a.task_timeout_s
            return 300 if p.startswith("compile") else 150

        if "asl" in fams:
            for (b, c) in asl_shapes:
                for dt in ("float32", "bfloat16"):
                    for p in plist["asl"]:
                        if keep(p, dt):
                            t = {"id": self._next_id("asl:"), "kind": "asl", "provider": p, "B": b, "C": c, "dtype": dt,
                                 "prewarm": prewarm, "timeout_s": to(p)}
                            (tier1 if (b, c) == asl_main else tier2).append(t)
        if "attention" in fams:
            b, c, n, d = attn
            for dt in attn_dtypes:
                for p in plist["attention"]:
                    if keep(p, dt) and not (dt != "bfloat16" and p in ("sdpa_flash", "sdpa_cudnn")):
                        t = {"id": self._next_id("attention:"), "kind": "attention", "provider": p, "B": b, "C": c,
                             "N": n, "d": d, "dtype": dt, "prewarm": prewarm, "timeout_s": to(p)}
                        (tier1 if dt == "bfloat16" else tier2).append(t)
        if "enhance" in fams:
            classes = a.enhance_classes or [enh[1]]
            for c in classes:
                for dt in attn_dtypes:
                    for p in plist["enhance"]:
                        if keep(p, dt):
                            tier2.append({"id": self._next_id("enhance:"), "kind": "enhance", "provider": p,
                                          "B": enh[0], "C": c, "L": enh[2], "dtype": dt, "prewarm": prewarm,
                                          "timeout_s": to(p)})
        if "grid" in fams:
            for (c, n, d) in grid:
                for p in plist["grid"]:
                    if keep(p, grid_dt):
                        grid_tasks.append({"id": self._next_id("grid:"), "kind": "grid", "provider": p, "B": grid_b,
                                           "C": c, "N": n, "d": d, "dtype": grid_dt, "fwd": False,
                                           "prewarm": prewarm, "timeout_s": to(p)})
        if "blocks" in fams and not prewarm and "triton" in plist["attention"]:
            b, c, n, d = attn
            dt = "float32" if self.dry else "bfloat16"
            grid_tasks[:0] = [{"id": self._next_id("blocks:"), "kind": "blocks", "provider": "triton", "B": b, "C": c,
                               "N": n, "d": d, "dtype": dt, "block_c": bc, "block_n": bn, "num_warps": warps,
                               "num_stages": stages, "timeout_s": to("triton")}
                              for bc, bn, warps, stages in (BLOCK_SWEEP_DRY if self.dry else BLOCK_SWEEP)]
        return tier1, tier2, grid_tasks

    # -------------------------------------------------------------- phases
    def phase1(self):
        build_done = threading.Event()

        def lane_a():
            try:
                self.step_build()
            finally:
                build_done.set()

        def lane_b():
            self.step_env()
            if not self.R["environment"].get("cuda_available") and not self.dry:
                self.error("environment", message="torch sees no CUDA device: GPU steps will fail")
            ok, why = self.triton_available()
            if self.args.no_parity:
                self.set_parity_summary("triton", "skipped: --no-parity")
            elif "triton" not in self.args.parity_backends:
                self.set_parity_summary("triton", "skipped: not in --parity-backends")
            elif ok:
                self.set_parity_summary("triton", self.parity_for("triton", "triton", "B", cap_s=240))
            else:
                self.set_parity_summary("triton", f"skipped: {why}")
            if not self.args.no_prewarm and not build_done.is_set():
                tier1, tier2, grid = self.bench_tasks(self.providers(ok, False), prewarm=True)
                if tier1 + tier2 + grid:
                    self.run_worker("prewarm", tier1 + tier2 + grid, cap_s=300, stop_event=build_done, lane="B")

        threads = [threading.Thread(target=self._guard, args=(f, name), daemon=True)
                   for f, name in ((lane_a, "lane A (build)"), (lane_b, "lane B (env, triton parity, prewarm)"))]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)

    def phase2(self):
        triton_ok, triton_why = self.triton_available()
        native_ok, native_why = self.native_available()
        parity_native = "not run"
        if self.args.no_parity:
            parity_native = "skipped: --no-parity"
        elif "cuda" not in self.args.parity_backends:
            parity_native = "skipped: not in --parity-backends"
        elif native_ok:
            # dry-run: the same pytest path; the GPU test is collected and skips (no CUDA device)
            parity_native = self.parity_for("cuda", self.native, "main", cap_s=240)
        else:
            parity_native = f"skipped: {native_why}"
        self.set_parity_summary("cuda", parity_native)
        plist = self.providers(triton_ok, native_ok)
        with self.lock:
            prov = self.R["benchmarks"]["providers"]
            for fam, names in plist.items():
                for p in names:
                    prov.setdefault(p, {"available": True, "what": PROVIDER_DOC.get(p, p)})
            if not triton_ok:
                prov["triton"] = {"available": False, "why": triton_why}
            if not native_ok:
                prov[self.native] = {"available": False, "why": native_why}
            self.R["benchmarks"]["plan"] = plist
        tier1, tier2, grid = self.bench_tasks(plist)
        # per-check diagnosis: always in the dry-run; on a GPU when pytest ran and reported a failure
        diag = []
        if not self.args.no_parity:
            pyt = self.R["environment"].get("pytest_available") and not self.args.no_pytest
            summ = self.R["parity"].get("summary", {})
            for backend, ok in ((self.native, native_ok), ("triton", triton_ok)):
                key = "cuda" if backend in ("cuda", "cpu") else backend
                wanted = key in self.args.parity_backends
                if ok and pyt and wanted and (self.dry or summ.get(key) in ("failed", "error")):
                    diag += self.parity_direct_tasks(backend)
        tasks = tier1 + diag + tier2 + grid
        if not self.dry and not self.R["environment"].get("cuda_available"):
            with self.lock:
                self.R["benchmarks"]["skipped"] = "torch sees no CUDA device (see environment.errors)"
            tasks = []
        if tasks:  # the training steps of phase 3 keep their share of the budget
            self.run_worker("bench", tasks, cap_s=max(30.0, self.time_left() - self.training_reserve_s()), lane="main")
        if diag:
            with self.lock:
                for s in self.R["parity"]["direct"].get("suites", []):
                    be = s.get("backend")
                    key = "cuda" if be in ("cuda", "cpu") else be
                    if not s.get("ok"):
                        self.R["parity"]["summary"][f"{key}_direct"] = "failed"
                    else:
                        self.R["parity"]["summary"].setdefault(f"{key}_direct", "passed")

    # -------------------------------------------------------------- phase 3: training steps
    def training_reserve_s(self):
        a = self.args
        return (0 if a.no_train_step else a.train_step_s) + (0 if a.no_deepspeed else a.deepspeed_s)

    def run_command(self, name, cmd, cap_s, env=None, wait=True):
        """A subprocess in its own process group, output to logs/NAME.log; returns (proc, record)."""
        log_path = os.path.join(self.logs, f"{name}.log")
        rec = {"cmd": " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd), "log": f"logs/{name}.log"}
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**self.child_env, **(env or {})}, start_new_session=True)
        self._register(proc)
        rec["t0"] = time.time()
        if wait:
            self.wait_command(proc, rec, cap_s)
        return proc, rec

    def wait_command(self, proc, rec, cap_s):
        try:
            proc.wait(timeout=max(1.0, cap_s))
        except subprocess.TimeoutExpired:
            self._kill(proc)
            rec["error"] = f"ran over {cap_s:.0f} s and was killed"
        self._unregister(proc)
        rec["rc"] = proc.returncode
        rec["seconds"] = round(time.time() - rec.pop("t0"), 2)
        rec["output_tail"] = _tail(os.path.join(self.out, rec["log"]), 3000)
        return rec

    def train_step_args(self):
        """ResNet50 448 px b32 bf16 on a GPU: the baseline head and CSSFE under each kernels x compile
        setting, eager first (a compiled case spends most of its time compiling)."""
        if self.dry:
            # aot_eager has no modes: default and reduce-overhead would be the same run
            return ["--backbone", "smallcnn", "--image-size", "32", "--batch-size", "2", "--classes", "8",
                    "--precision", "bf16", "--kernels", "auto,cpu", "--compile", "off,default",
                    "--warmup", "1", "--repeats", "2", "--device", "cpu", "--compile-backend",
                    self.args.compile_backend or "aot_eager"]
        return ["--backbone", "resnet50", "--image-size", "448", "--batch-size", "32", "--classes", "80",
                "--precision", "bf16", "--kernels", "auto,cuda,triton,reference", "--compile", "off,default,reduce-overhead",
                "--warmup", "3", "--repeats", "10", "--device", "cuda"]

    def step_train_step(self):
        cap = min(self.args.train_step_s, self.time_left() - (0 if self.args.no_deepspeed else self.args.deepspeed_s))
        info = self.step_record("train_step", "main", log="logs/train_step.log")
        out = os.path.join(self.work, "train_step")
        if cap < 20:
            info["status"] = "skipped: time budget"
            with self.lock:
                self.R["train_step"] = {"skipped": "time budget"}
            return
        _, rec = self.run_command("train_step", [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"),
                                                 *self.train_step_args(), "--out", out], cap)
        rows = []
        with contextlib.suppress(OSError):
            with open(os.path.join(out, "train_step.jsonl")) as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
        base = {(r["compile"], r["precision"]): r for r in rows if r["head"] == "baseline"}
        for r in rows:
            b = base.get((r["compile"], r["precision"]))
            if r["head"] == "cssfe" and b:
                r["vs_baseline"] = r["images_per_s"] / b["images_per_s"]
        rec["rows"] = rows
        info.update(seconds=rec["seconds"], status=rec.get("error") or f"rc={rec['rc']}, {len(rows)} rows")
        with self.lock:
            self.R["train_step"] = rec
        self.save()

    def deepspeed_args(self):
        """(config overrides, kill once this checkpoint tag prefix is written, steps per checkpoint)."""
        zero2 = os.path.join(ROOT, "configs", "deepspeed", "zero2.yaml")
        # group norm: DeepSpeed's bf16 module keeps batch norm's running statistics in fp32, which
        # CPU batch norm refuses beside bf16 weights (the dry run); no download: rie embeddings
        common = ["model.backbone=smallcnn_gn", "model.embedding=rie", "progress=false", "compile=true",
                  f"distributed.deepspeed_config={zero2}", "distributed.precision=bf16"]
        if self.dry:  # 2 epochs of 9 steps at 16 px
            return common + ["data.image_size=16", "data.batch_size=128", "optim.epochs=2", "model.dim=16",
                             "checkpoint_every_steps=3"], "epoch0001-step"
        # about 35 steps an epoch at batch 32: 280 steps, killed in epoch 5
        return common + ["data.image_size=64", "optim.epochs=8", "checkpoint_every_steps=20"], "epoch0004-step"

    def step_deepspeed(self):
        """``deepspeed --num_gpus 1 launch/train.py``, ZeRO-2 bf16, compiled: an uninterrupted run, then
        one killed (SIGKILL to the launcher and its rank) after a mid-epoch checkpoint and resumed."""
        cap = min(self.args.deepspeed_s, self.time_left())
        info = self.step_record("deepspeed", "main", log="logs/deepspeed_*.log")
        if cap < 30:
            info["status"] = "skipped: time budget"
            with self.lock:
                self.R["deepspeed"] = {"skipped": "time budget"}
            return
        import glob
        import socket

        shm_before = set(glob.glob("/dev/shm/deepspeed_*"))
        overrides, kill_at = self.deepspeed_args()
        env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
               "CSSFE_COMPILE_BACKEND": self.args.compile_backend or "aot_eager"} if self.dry else {}
        deadline = time.time() + cap

        def launch(name, out, resume=False, wait=True):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
                   TRAIN, "--output-dir", out, *(["--resume"] if resume else []), *overrides]
            return self.run_command(f"deepspeed_{name}", cmd, deadline - time.time(), env=env, wait=wait)

        R = {"overrides": overrides, "kill_after_checkpoint": kill_at, "runs": {}}
        whole, cut = os.path.join(self.work, "ds_whole"), os.path.join(self.work, "ds_killed")
        try:
            # dry run: the uninterrupted run beside the killed one (the launchers' start-up dominates on
            # CPU); on a GPU one after the other, so that the images/s are the card's alone
            whole_proc, whole_rec = launch("whole", whole, wait=not self.dry)
            if not self.dry:
                R["runs"]["whole"] = whole_rec
            proc, rec = launch("killed", cut, wait=False)
            latest = os.path.join(cut, "checkpoints", "deepspeed", "latest")
            while proc.poll() is None and time.time() < deadline:
                with contextlib.suppress(OSError):
                    with open(latest) as fh:
                        if fh.read().strip().startswith(kill_at):
                            os.killpg(proc.pid, signal.SIGKILL)
                            rec["killed_at"] = kill_at
                            break
                time.sleep(0.05)
            R["runs"]["killed"] = self.wait_command(proc, rec, max(1.0, deadline - time.time()))
            if self.dry:
                R["runs"]["whole"] = self.wait_command(whole_proc, whole_rec, max(1.0, deadline - time.time()))
            R["runs"]["resumed"] = launch("resumed", cut, resume=True)[1]
            R.update(_deepspeed_outcome(whole, cut, R["runs"]))
        finally:
            for path in set(glob.glob("/dev/shm/deepspeed_*")) - shm_before:
                with contextlib.suppress(OSError):
                    os.remove(path)
        info.update(seconds=round(sum(r.get("seconds", 0) for r in R["runs"].values()), 2),
                    status=f"trains {R.get('trains')}, resumes to the same loss {R.get('resumed_same_loss')}")
        with self.lock:
            self.R["deepspeed"] = R
        self.save()

    def phase3(self):
        if not self.dry and not self.R["environment"].get("cuda_available"):
            with self.lock:
                self.R["train_step"] = self.R["deepspeed"] = {"skipped": "torch sees no CUDA device"}
            return
        if not self.args.no_train_step:
            self._guard(self.step_train_step, "train_step")
        if not self.args.no_deepspeed:
            self._guard(self.step_deepspeed, "deepspeed")

    def _guard(self, fn, where):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            self.error(where, exc)
            with contextlib.suppress(Exception):
                self.save()

    # -------------------------------------------------------------- finishing
    def postprocess(self):
        with self.lock:
            env = self.R["environment"]
            copy = env.get("copy_gbps")
            b = self.R["benchmarks"]
            order = {}  # case -> provider -> row; a block-sweep row's peers are the attention rows of its case
            for fam in ("asl", "attention", "enhance", "grid"):
                for r in b[fam]:
                    order.setdefault(_case_key(r), {})[r["provider"]] = r
            for fam in BENCH_FAMILIES:
                rows = b[fam]
                for r in rows:
                    if not r.get("ok") or not r.get("median_ms"):
                        continue
                    peers = order.get(_case_key(dict(r, kind="attention") if fam == "blocks" else r), {})
                    for base in ("eager", "sdpa"):
                        e = peers.get(base)
                        if e and e.get("ok") and e.get("median_ms"):
                            r[f"speedup_vs_{base}"] = e["median_ms"] / r["median_ms"]
                            if r.get("fwd_median_ms") and e.get("fwd_median_ms"):
                                r[f"fwd_speedup_vs_{base}"] = e["fwd_median_ms"] / r["fwd_median_ms"]
                    if fam == "asl" and copy and r.get("gbps"):
                        r["copy_fraction"] = r["gbps"] / copy
                        if r.get("graph_gbps"):
                            r["graph_copy_fraction"] = r["graph_gbps"] / copy
                    e = peers.get("eager")
                    if fam in ("asl", "attention") and r.get("graph_median_ms") and e and e.get("graph_median_ms"):
                        r["graph_speedup_vs_eager"] = e["graph_median_ms"] / r["graph_median_ms"]
                rows.sort(key=lambda r: (_case_key(r), r.get("provider", "")))
            checks = self.R["parity"]["direct"]["checks"]
            counts = {}
            for c in checks:
                k = counts.setdefault(c.get("backend", "?"), {"passed": 0, "failed": 0})
                k["passed" if c.get("ok") else "failed"] += 1
            self.R["parity"]["direct"]["counts"] = counts
            self.R["goals"] = gpu_goals.evaluate(self.R)

    def finish(self, status="done"):
        with self.lock:
            skipped = [r for fam in BENCH_FAMILIES for r in self.R["benchmarks"][fam]
                       if "time budget" in str(r.get("skipped", ""))]
            if skipped:
                self.R["budget_exhausted"] = f"{len(skipped)} benchmark tasks skipped for time"
                if status == "done":
                    status = "done (time budget ran out: some tasks skipped)"
            self.R["status"] = status
            self.R["finished_utc"] = _now_utc()
            self.R["elapsed_s"] = round(time.time() - self.t_start, 2)
        try:
            self.postprocess()
        except Exception as exc:  # noqa: BLE001
            self.error("postprocess", exc)
        try:
            text = summarize(self.R)
        except Exception as exc:  # noqa: BLE001
            self.error("summary", exc)
            text = f"# GPU check\n\nsummary failed: {exc}\n"
        with contextlib.suppress(Exception):
            with open(os.path.join(self.out, "summary.md"), "w") as fh:
                fh.write(text)
        self.save()
        for name in os.listdir(self.logs):  # keep logs small
            p = os.path.join(self.logs, name)
            with contextlib.suppress(OSError):
                if os.path.getsize(p) > 2_000_000:
                    tail = _tail(p, 2_000_000)
                    with open(p, "w") as fh:
                        fh.write("[... truncated ...]\n" + tail)
        shutil.rmtree(self.work, ignore_errors=True)
        return text

    def on_signal(self, signum, frame):
        self.kill_all()
        self.error("signal", message=f"terminated by signal {signum} after {time.time() - self.t_start:.0f} s")
        with contextlib.suppress(Exception):
            text = self.finish(status=f"terminated (signal {signum})")
            print(text, flush=True)
        os._exit(124)

    def run(self):
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        with self.lock:
            self.R["environment"].update(host_env())
        self.save()
        for phase in (self.phase1, self.phase2, self.phase3):
            try:
                phase()
            except Exception as exc:  # noqa: BLE001
                self.error(phase.__name__, exc)
            self.save()
        text = self.finish()
        print(text, flush=True)
        return 0


def _training_lines(R) -> list:
    """The summary's sections of phase 3: the training-step table and the DeepSpeed run."""
    lines = []
    ts = R.get("train_step")
    if ts:
        lines += ["", "## Training step (forward + loss + backward + AdamW)", ""]
        if ts.get("skipped") or ts.get("error"):
            lines.append(f"- {ts.get('skipped') or ts.get('error')}")
        rows = ts.get("rows", [])
        if rows:
            r0 = rows[0]
            lines.append(f"- {r0['backbone']} {r0['image_size']} px, batch {r0['batch']}, {r0['precision']}, "
                         f"{r0['classes']} classes; `{ts.get('cmd')}`")
            lines += ["", "| compile | head | kernels | images/s | vs baseline | step p50 ms | first step s | peak MiB |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                peak = r.get("peak_memory_bytes")
                lines.append(f"| {r['compile']} | {r['head']} | {r['kernels']} | {_fmt(r['images_per_s'], 1)} | "
                             f"{_fmt(r.get('vs_baseline'))} | {_fmt(r['step_s_p50'] * 1e3, 2)} | {_fmt(r.get('first_step_s'), 1)} | "
                             f"{_fmt(peak / 2**20, 0) if peak else ''} |")
    ds = R.get("deepspeed")
    if ds:
        lines += ["", "## DeepSpeed (ZeRO-2, bf16, compiled, one rank): killed and resumed", ""]
        if ds.get("skipped"):
            lines.append(f"- {ds['skipped']}")
        for name, run in ds.get("runs", {}).items():
            lines.append(f"- {name}: rc {run.get('rc')} in {run.get('seconds')} s" + (f" ({run['error']})" if run.get("error") else "")
                         + (f", killed once `{run['killed_at']}*` was written" if run.get("killed_at") else ""))
        if "trains" in ds:
            ips = ds.get("images_per_s") or []
            lines.append(f"- trains: {ds['trains']} ({ds.get('steps')} steps, loss {ds.get('train_loss', {}).get('whole')}); "
                         f"resumes to the same loss: {ds.get('resumed_same_loss')} (final loss relative difference "
                         f"{_fmt(ds.get('final_loss_rel_diff'), 6)}, mAP {ds.get('final_map')}); images/s per epoch "
                         + ", ".join(_fmt(x, 1) for x in ips))
    return lines


def _read_jsonl(path):
    with contextlib.suppress(OSError):
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    return []


def _deepspeed_outcome(whole, cut, runs) -> dict:
    """Did the run train (finite, falling loss), does the killed-and-resumed run end where the
    uninterrupted one does (final loss and mAP), and its images/s (training steps only)."""
    logs = {name: _read_jsonl(os.path.join(path, "log.jsonl")) for name, path in (("whole", whole), ("resumed", cut))}
    out = {"train_loss": {k: [r.get("train_loss") for r in v] for k, v in logs.items()}}
    w, r = logs["whole"], logs["resumed"]
    losses = [x.get("train_loss") for x in w]
    out["trains"] = bool(losses) and all(isinstance(x, float) and math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    out["killed_mid_run"] = runs.get("killed", {}).get("rc") not in (0, None) and bool(runs["killed"].get("killed_at"))
    if w and r and len(w) == len(r):
        rel = abs(r[-1]["train_loss"] - w[-1]["train_loss"]) / max(abs(w[-1]["train_loss"]), 1e-12)
        out["final_loss_rel_diff"] = rel
        out["final_map"] = {"whole": w[-1].get("mAP", {}).get("total"), "resumed": r[-1].get("mAP", {}).get("total")}
        out["resumed_same_loss"] = out["killed_mid_run"] and rel <= 1e-3
    else:
        out["resumed_same_loss"] = False
    # images/s of each epoch's training steps (evaluation excluded), from rank 0's own log; the first
    # epoch includes the compilation, the last is the steady state
    ranks = _read_jsonl(os.path.join(whole, "ranks", "rank0.log"))
    out["images_per_s"] = [x["micro_batches"] * x["micro_batch"] * x["world_size"] / x["epoch_seconds"]
                           for x in ranks if x.get("epoch_seconds")]
    out["steps"] = sum(x["micro_batches"] for x in ranks)
    return out


def _task_fields(task):
    return {k: v for k, v in task.items() if k not in ("timeout_s", "prewarm", "fwd", "limit")}


def _check_cell(r):
    """A summary table's check column: ok, or the mismatch against eager."""
    chk = r.get("check", {})
    return "ok" if chk.get("agrees") else "MISMATCH " + str(chk.get("max_rel_err"))[:80]


def _parity_backends(text):
    """--parity-backends: a comma-separated subset of triton, cuda."""
    names = tuple(n for n in text.split(",") if n)
    if not names or not set(names) <= {"triton", "cuda"}:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of triton,cuda, got {text!r}")
    return names


def _class_counts(text):
    """--enhance-classes: comma-separated positive integers."""
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return counts


def _case_key(r):
    return (r.get("kind"), r.get("B"), r.get("C"), r.get("N"), r.get("d"), r.get("L"), r.get("dtype"))


def _read_events(path, offset):
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return offset, []
    end = data.rfind(b"\n")
    if end < 0:
        return offset, []
    events = []
    for line in data[: end + 1].splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return offset + end + 1, events


def _parse_junit(path):
    tests = []
    try:
        root = ET.parse(path).getroot()
    except Exception:  # noqa: BLE001 - missing or truncated
        return tests
    for tc in root.iter("testcase"):
        t = {"id": f"{tc.get('classname')}::{tc.get('name')}", "seconds": float(tc.get("time") or 0),
             "outcome": "passed"}
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                t["outcome"] = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                t["message"] = ((el.get("message") or "") + "\n" + (el.text or ""))[-6000:]
                break
        tests.append(t)
    return tests


# =============================================================================== summary
def _table(lines, title, key_cols, value_cols, rows, err_of):
    """One summary table: key columns, measurement columns and the check, one line per row; a row
    that did not run shows its error in place of the measurements. Columns are (header, row -> text)."""
    heads = [h for h, _ in key_cols] + [h for h, _ in value_cols] + ["check"]
    lines += [""] + title + ["", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        keys = [f(r) for _, f in key_cols]
        values = [f(r) for _, f in value_cols] + [_check_cell(r)] if r.get("ok") else [err_of(r)] + [""] * len(value_cols)
        lines.append("| " + " | ".join(keys + values) + " |")


def summarize(R) -> str:
    env, b, lines = R.get("environment", {}), R.get("build", {}), []
    lines.append(f"# cssfe GPU check ({R.get('mode')}, {R.get('status')})")
    lines.append("")
    lines.append(f"- device: {env.get('device_name') or 'NO CUDA DEVICE'} (capability {env.get('capability')}, "
                 f"{_fmt((env.get('total_memory_bytes') or 0) / 2**30, 1)} GiB); date {env.get('date_utc')}; "
                 f"commit {env.get('commit')} ({env.get('commit_source')})")
    lines.append(f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
                 f"nvcc: {env.get('nvcc_version')}")
    lines.append(f"- device copy bandwidth {_fmt(env.get('copy_gbps'), 1)} GB/s, bf16 matmul "
                 f"({env.get('matmul_n')}^3) {_fmt(env.get('matmul_bf16_tflops'), 1)} TFLOP/s")
    berr = b.get("error") or b.get("skipped")
    lines.append(f"- build: {'ok' if b.get('ok') else 'FAILED'} in {_fmt(b.get('build_s') or b.get('seconds'), 1)} s "
                 f"(with_cuda={b.get('with_cuda')}, ninja={b.get('ninja')})" + (f": {str(berr)[:300]}" if berr else ""))
    summ = R.get("parity", {}).get("summary", {})
    lines.append("- parity: " + (", ".join(f"{k}: {v}" for k, v in summ.items()) or "not run"))
    counts = R.get("parity", {}).get("direct", {}).get("counts")
    if counts:
        lines.append("- direct parity checks: " + ", ".join(f"{k} {v['passed']} passed / {v['failed']} failed"
                                                           for k, v in counts.items()))
    for run in R.get("parity", {}).get("pytest", {}).get("runs", []):
        for t in run.get("tests", []):
            msg = (t.get("message") or "").strip().splitlines()
            lines.append(f"  - pytest {t['id']}: {t['outcome']}" + (f" ({msg[0][:160]})" if msg else ""))
        if run.get("error") or run.get("skipped"):
            lines.append(f"  - pytest {run['name']}: {run.get('error') or run.get('skipped')}")
    lines.append(f"- elapsed {R.get('elapsed_s')} s of budget {R.get('budget_s')} s")
    if R.get("benchmarks", {}).get("skipped"):
        lines.append(f"- benchmarks skipped: {R['benchmarks']['skipped']}")
    bench = R.get("benchmarks", {})

    def err_of(r):
        return (r.get("skipped") or r.get("error") or "failed").splitlines()[0][:90]

    goal_lines = gpu_goals.markdown(R.get("goals", {}))
    if goal_lines:
        lines += [""] + goal_lines
    def cell(key, nd=3, scale=1.0):
        return lambda r: _fmt(r[key] * scale, nd) if isinstance(r.get(key), (int, float)) else "-"

    def spread(prefix=""):
        return lambda r: f"{_fmt(r.get(prefix + 'p20_ms'))}-{_fmt(r.get(prefix + 'p80_ms'))}"

    def graph_ms(r):
        return _fmt(r.get("graph_median_ms")) if r.get("graph_median_ms") else (r.get("graph_error") or "-")[:40]

    def field(key):
        return lambda r: str(r.get(key))

    def provider(r):  # auto: with the backends it resolved to
        resolved = r.get("resolved") or {}
        return str(r.get("provider")) + (" (" + ", ".join(f"{op}: {be}" for op, be in resolved.items()) + ")"
                                         if resolved else "")

    timing = [("median ms", cell("median_ms")), ("p20-p80", spread())]
    peak = ("peak MiB", cell("peak_above_base_bytes", 1, 2 ** -20))
    rows = bench.get("asl", [])
    if rows:
        _table(lines, ["## ASL forward+backward (bytes: read logits + targets, write grad)", "",
                       "Per call: CUDA events around each eager call (host work included when the GPU waits for "
                       "it). Graph: the same call captured in a CUDA graph and replayed (device time alone)."],
               [("B x C", lambda r: f"{r.get('B')}x{r.get('C')}"), ("dtype", field("dtype")),
                ("provider", field("provider"))],
               timing + [("GB/s", cell("gbps", 1)), ("% copy BW", cell("copy_fraction", 1, 100.0)),
                         ("x eager", cell("speedup_vs_eager", 2)), ("graph ms", graph_ms),
                         ("graph % copy BW", cell("graph_copy_fraction", 1, 100.0)),
                         ("graph x eager", cell("graph_speedup_vs_eager", 2))],
               rows, err_of)
    rows = bench.get("attention", [])
    if rows:
        r0 = rows[0]
        _table(lines, [f"## class_attention + progressive_enhance fwd+bwd (B={r0.get('B')} C={r0.get('C')} "
                       f"N={r0.get('N')} d={r0.get('d')}; TFLOP/s on 3.5 x 4BCNd)"],
               [("dtype", field("dtype")), ("provider", provider)],
               timing + [("fwd ms", cell("fwd_median_ms")), ("TFLOP/s", cell("tflops_fwd_bwd", 2)), peak,
                         ("x eager", cell("speedup_vs_eager", 2)), ("x sdpa", cell("speedup_vs_sdpa", 2)),
                         ("graph ms", graph_ms), ("graph x eager", cell("graph_speedup_vs_eager", 2))],
               rows, err_of)
    rows = bench.get("enhance", [])
    if rows:
        r0 = rows[0]
        _table(lines, [f"## progressive_enhance alone, fwd+bwd (z: B={r0.get('B')} x C x L={r0.get('L')}; "
                       "bytes: read z, write out, read its gradient, write dz)"],
               [("C", field("C")), ("dtype", field("dtype")), ("provider", field("provider"))],
               timing + [("fwd ms", cell("fwd_median_ms")), ("GB/s", cell("gbps", 1)), peak,
                         ("x eager", cell("speedup_vs_eager", 2))],
               rows, err_of)
    rows = bench.get("blocks", [])
    if rows:
        r0 = rows[0]
        _table(lines, [f"## Triton attention + enhancement block sweep, fwd+bwd (B={r0.get('B')} C={r0.get('C')} "
                       f"N={r0.get('N')} d={r0.get('d')})"],
               [("dtype", field("dtype")), ("BLOCK_C", field("block_c")), ("BLOCK_N", field("block_n")),
                ("warps", field("num_warps")), ("stages", field("num_stages"))],
               [("median ms", cell("median_ms")), ("TFLOP/s", cell("tflops_fwd_bwd", 2)),
                ("x eager", cell("speedup_vs_eager", 2))],
               rows, err_of)
    rows = bench.get("grid", [])
    if rows:
        provs = []
        for r in rows:
            if r.get("provider") not in provs:
                provs.append(r.get("provider"))
        cases = {}
        for r in rows:
            cases.setdefault((r.get("C"), r.get("N"), r.get("d")), {})[r.get("provider")] = r
        lines += ["", f"## SPEC section 6 grid: fwd+bwd median ms (B={rows[0].get('B')}, {rows[0].get('dtype')}; "
                  "* = check mismatch)", "",
                  "| C | N | d | " + " | ".join(provs) + " |", "|---|---|---|" + "---|" * len(provs)]
        for (c, n, d), per in sorted(cases.items(), key=lambda kv: tuple(x or 0 for x in kv[0])):
            cells = []
            for p in provs:
                r = per.get(p)
                if r is None:
                    cells.append("")
                elif not r.get("ok"):
                    cells.append("err" if not r.get("skipped") else "skip")
                else:
                    cells.append(_fmt(r.get("median_ms")) + ("" if r.get("check", {}).get("agrees") else "*"))
            lines.append(f"| {c} | {n} | {d} | " + " | ".join(cells) + " |")
    lines += _training_lines(R)
    errs = []
    for fam in BENCH_FAMILIES:
        for r in bench.get(fam, []):
            if not r.get("ok") and not r.get("skipped"):
                errs.append(f"{fam} {r.get('provider')} {_case_key(r)[1:]}: {err_of(r)}")
    failed_checks = [c for c in R.get("parity", {}).get("direct", {}).get("checks", []) if not c.get("ok")]
    for c in failed_checks[:20]:
        errs.append(f"parity {c.get('backend')} {c.get('op')} {c.get('shape')} {c.get('dtype')}: "
                    f"{(c.get('error') or '').splitlines()[0][:160] if c.get('error') else ''}")
    for e in R.get("errors", []):
        errs.append(f"{e.get('where')}: {str(e.get('error'))[:200]}")
    if errs:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errs[:60]]
    lines.append("")
    return "\n".join(lines)


# =============================================================================== entry point
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (gpu_check.json, summary.md, logs/)")
    p.add_argument("--quick", action="store_true", help="fewer repeats, main grid shapes only, no compile_autograd")
    p.add_argument("--parity-backends", type=_parity_backends, default=("triton", "cuda"),
                   help="comma-separated backends whose parity tests run: triton, cuda (default both; cuda "
                        "means the extension's kernels, C++ ones in the dry-run)")
    p.add_argument("--enhance-classes", type=_class_counts, default=None,
                   help="comma-separated class counts for the enhance family (default: the main case's)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="same code path on CPU: tiny shapes, backends reference + cpu (+ triton with TRITON_INTERPRET=1)")
    p.add_argument("--budget-s", type=float, default=None, help="total time budget (default 455 on GPU, 700 dry-run)")
    p.add_argument("--build-timeout-s", type=float, default=None,
                   help="cap on the extension build (default: the budget less 30 s, at most 300)")
    p.add_argument("--families", default="asl,attention,enhance,blocks,grid",
                   help="benchmark families to run (blocks: Triton attention block-size sweep; enhance: the "
                        "progressive enhancement alone)")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers to benchmark (default all); without cuda/cpu the extension is not built")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; aot_eager dry-run)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity checks")
    p.add_argument("--no-pytest", action="store_true", help="direct kernel_cases checks instead of pytest")
    p.add_argument("--no-prewarm", action="store_true", help="no cache warm-up beside the build")
    p.add_argument("--task-timeout-s", type=float, default=None,
                   help="watchdog per benchmark task (default 300 s for torch.compile, 150 s otherwise)")
    p.add_argument("--train-step-s", type=float, default=None,
                   help="cap on the ResNet50 training-step benchmark (default 170 s on a GPU, 120 dry-run)")
    p.add_argument("--deepspeed-s", type=float, default=None,
                   help="cap on the DeepSpeed run, killed and resumed (default 110 s on a GPU, 330 dry-run: three launches of CPU ranks)")
    p.add_argument("--no-train-step", action="store_true", help="skip the training-step benchmark")
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.result)
    if not args.out:
        p.error("--out is required")
    if args.budget_s is None:
        args.budget_s = 700.0 if args.cpu_dry_run else 455.0
    if args.train_step_s is None:
        args.train_step_s = 120.0 if args.cpu_dry_run else 170.0
    if args.deepspeed_s is None:
        args.deepspeed_s = 330.0 if args.cpu_dry_run else 110.0
    if args.build_timeout_s is None:
        # nothing else of the CUDA backend runs without the build: it may take all but 30 s
        args.build_timeout_s = min(300.0, max(60.0, args.budget_s - 30))
    orch = Orchestrator(args)
    try:
        return orch.run()
    except Exception as exc:  # noqa: BLE001 - last resort: the JSON must exist
        orch.error("main", exc)
        orch.finish(status="crashed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
