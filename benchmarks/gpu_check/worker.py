"""The worker process: runs the tasks of a spec file, one JSON event per line in a result file.

Events: ``start`` (a task began: the orchestrator's watchdog times it), ``sub`` (one parity check),
``result`` (a task's record), ``unhealthy`` (the CUDA context broke: the worker exits), ``fatal``
(the worker could not start). Imports only torch, triton and ``cssfe`` (plus the suite's modules and
``tests/ops/kernel_cases.py`` for the parity checks).

    python -m benchmarks.gpu_check.worker SPEC RESULT
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
import traceback

from benchmarks import ROOT, cases, providers
from benchmarks.harness import Harness, error_text
from benchmarks.rows import timed_fields

FULL, FORWARD = "forward+backward", "forward"


def clean(obj):
    """JSON-safe copy: non-finite floats become None, tuples lists, unknown objects strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in list(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in list(obj)]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def err_record(exc: BaseException) -> dict:
    return {"ok": False, "error": error_text(exc), "traceback": traceback.format_exc()[-6000:]}


class Ctx:
    """Per-worker state: torch, the device, the options, the harness, one cached case."""

    def __init__(self, spec):
        import torch

        self.torch = torch
        self.opts = spec["opts"]
        self.device = torch.device(spec["device"])
        self.cuda = self.device.type == "cuda"
        if not self.cuda:  # dry run on a shared CPU: one thread (no thread-pool wake-ups in tiny ops)
            torch.set_num_threads(1)
        o = self.opts
        self.harness = Harness(self.device, o["warmup"], o["reps"], o["max_case_s"], o["flush_bytes"])
        self._case_key, self._case, self._kc = None, None, None

    def healthy(self) -> bool:
        if not self.cuda:
            return True
        try:
            self.torch.cuda.synchronize()
            return float(self.torch.ones(4, device=self.device).sum().item()) == 4.0
        except Exception:
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
            self._case, self._case_key = make(), key
        return self._case

    def kernel_cases(self):
        """tests/ops/kernel_cases.py (needs only torch and cssfe), loaded by path."""
        if self._kc is None:
            spec = importlib.util.spec_from_file_location("kernel_cases", os.path.join(ROOT, "tests", "ops",
                                                                                       "kernel_cases.py"))
            kc = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(kc)
            kc.DEVICE = str(self.device)
            self._kc = kc
        return self._kc


# ----------------------------------------------------------------------------- checks against eager
def _errors(names, got, want) -> dict:
    errs = {}
    for name, g, w in zip(names, got, want):
        try:
            g, w = g.detach().float(), w.detach().float()
            if g.shape != w.shape:
                raise ValueError(f"shape {tuple(g.shape)} != {tuple(w.shape)}")
            scale = w.abs().max().item() if w.numel() else 0.0
            err = (g - w).abs().max().item() if w.numel() else 0.0
            errs[name] = err / scale if scale > 0 else err
        except Exception as exc:
            errs[name] = error_text(exc)
    return errs


def compare(names, got, want, dtype_name, eager_err=None) -> dict:
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


def _reference(case):
    """(fp32 eager outputs on the case's inputs, eager's own errors in the case's dtype or None), once."""
    if "ref" not in case:
        names = cases.OPS[case["op"]].outputs
        case["ref"] = case["make_ref"](True)
        case["eager_err"] = _errors(names, case["make_ref"](False), case["ref"]) if case["half"] else None
    return case["ref"], case["eager_err"]


# ----------------------------------------------------------------------------- tasks
def _copy_bandwidth(roofs, ctx, nbytes: int) -> dict:
    torch = ctx.torch
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=ctx.device)
    dst = torch.empty_like(src)
    ms = roofs.time({"copy": lambda: dst.copy_(src)}, flush=False)["copy"]["p50_ms"]
    return {"copy_bytes": nbytes, "copy_ms": ms, "copy_gbps": 2 * nbytes / (ms * 1e-3) / 1e9}


def _matmul_throughput(roofs, ctx, n: int) -> dict:
    torch = ctx.torch
    a, b = (torch.randn(n, n, device=ctx.device).to(torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device=ctx.device, dtype=torch.bfloat16)
    ms = roofs.time({"mm": lambda: torch.mm(a, b, out=c)}, flush=False)["mm"]["p50_ms"]
    return {"matmul_n": n, "matmul_ms": ms, "matmul_bf16_tflops": 2 * n ** 3 / (ms * 1e-3) / 1e12}


def task_env(task, ctx, emit):
    torch = ctx.torch
    rec = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "float32_matmul_precision": torch.get_float32_matmul_precision(), "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(Exception):
        rec["cudnn"] = torch.backends.cudnn.version()
    try:
        import triton

        rec["triton"] = triton.__version__
    except Exception as exc:
        rec.update(triton=None, triton_error=error_text(exc))
    errors = {}
    if ctx.cuda:
        try:
            props = torch.cuda.get_device_properties(ctx.device)
            rec.update({"device_name": torch.cuda.get_device_name(ctx.device),
                        "capability": "%d.%d" % torch.cuda.get_device_capability(ctx.device),
                        "sm_count": getattr(props, "multi_processor_count", None),
                        "total_memory_bytes": getattr(props, "total_memory", None),
                        "l2_cache_bytes": getattr(props, "L2_cache_size", None)})
        except Exception as exc:
            errors["device"] = err_record(exc)
    else:
        rec["device_name"] = f"cpu ({platform.processor() or platform.machine()})"
    roofs = Harness(ctx.device, warmup=3, reps=20, max_case_s=2.0)
    try:  # device-to-device copy bandwidth, read + write
        rec.update(_copy_bandwidth(roofs, ctx, int(ctx.opts["copy_bytes"])))
    except Exception as exc:
        errors["copy"] = err_record(exc)
    try:  # a large bf16 matmul
        rec.update(_matmul_throughput(roofs, ctx, int(ctx.opts["matmul_n"])))
    except Exception as exc:
        errors["matmul"] = err_record(exc)
    ctx.free()
    rec.update(errors=errors, ok=not errors)
    return rec


def task_parity(task, ctx, emit):
    """The kernel_cases checks (as in test_cuda.py / triton_cases.py) for one backend and dtype."""
    from benchmarks.gpu_check.plan import parity_cases

    torch = ctx.torch
    kc = ctx.kernel_cases()
    checks = {"attention": kc.check_attention, "enhance": kc.check_enhance, "asl": kc.check_asl}
    passed = failed = 0
    for op, shape, kwargs in parity_cases(kc, task.get("limit") or None):
        sub = {"backend": task["backend"], "dtype": task["dtype"], "op": op, "shape": list(shape),
               "kwargs": {k: str(v) for k, v in kwargs.items()}}
        old_det = torch.are_deterministic_algorithms_enabled()
        old_fill = torch.utils.deterministic.fill_uninitialized_memory
        t0 = time.perf_counter()
        try:  # poison: unwritten outputs are NaN, as in the tests
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = True
            checks[op](task["backend"], shape, getattr(torch, task["dtype"]), **kwargs)
            ctx.harness.sync()
            sub["ok"] = True
            passed += 1
        except Exception as exc:
            sub.update(err_record(exc))
            failed += 1
        finally:
            torch.use_deterministic_algorithms(old_det)
            torch.utils.deterministic.fill_uninitialized_memory = old_fill
        sub["seconds"] = time.perf_counter() - t0
        emit({"event": "sub", "id": task["id"], "record": sub})
        if not sub["ok"] and not ctx.healthy():
            raise RuntimeError(f"CUDA context unhealthy after {op} {shape}: stopping this suite")
    return {"ok": failed == 0, "passed": passed, "failed": failed}


def _block_config(task):
    """The block sweep's Triton launch configuration (flash strategy forced), or nothing."""
    if task["family"] != "blocks":
        return contextlib.nullcontext()
    from cssfe.ops.backends.triton import attention as triton_attention

    stack = contextlib.ExitStack()
    stack.enter_context(triton_attention.strategy("flash"))
    stack.enter_context(triton_attention.block_config(task["block_c"], task["block_n"], num_warps=task["num_warps"],
                                                      num_stages=task["num_stages"]))
    return stack


def task_bench(task, ctx, emit):
    """One provider on one case: checked against eager, timed, its peak memory; the forward alone
    too (where the provider has one and the family asks), and a CUDA-graph replay (ASL, attention)."""
    op, shape, dt, variant = task["op"], task["shape"], task["dtype"], task.get("variant", "")
    case = ctx.case((op, tuple(shape.items()), dt, variant),
                    lambda: cases.make_case(op, shape, dt, ctx.device, variant))
    h = ctx.harness
    with _block_config(task):
        full, fwd = providers.build(op, task["provider"], case, ctx.opts["compile_backend"])
        out, first_call_s = h.first_call(full)
        if task.get("prewarm"):  # fill the compile caches: a second call, nothing measured
            full()
            return {"ok": True, "prewarm": True}
        want, eager_err = _reference(case)
        check = compare(cases.OPS[op].outputs, out, want, dt, eager_err)
        del out
        timed = h.time({"full": full}, back_to_back=True)["full"]
        if "error" in timed:
            raise RuntimeError(timed["error"])
        work = cases.work(op, shape, FULL, dt)
        peak, _ = h.peak_memory(full)
        row = {"mode": FULL, **timed_fields(timed, work, peak), "first_call_s": first_call_s, "check": check,
               **{k: timed[k] for k in ("reps", "timer", "back_to_back_ms")}}
        if task["family"] in ("asl", "attention"):  # device time alone: the per-call time may be bound by the host
            row.update(h.graph(full))
            if row.get("graph_p50_ms") and work["bytes"]:
                row["graph_gb_per_s"] = work["bytes"] / row["graph_p50_ms"] / 1e6
        if task["provider"] == "auto":
            from cssfe.ops import dispatch

            row["resolved"] = {name: dispatch.resolve("auto", ctx.device, name, getattr(ctx.torch, dt),
                                                      classes=shape["C"])
                               for name in ("class_attention", "progressive_enhance")}
        rows = [row]
        if fwd is not None and task.get("fwd", True):
            try:
                h.max_case_s, saved = ctx.opts["max_case_s"] / 2, h.max_case_s
                timed = h.time({"fwd": fwd})["fwd"]
                h.max_case_s = saved
                if "error" in timed:
                    raise RuntimeError(timed["error"])
                rows.append({"mode": FORWARD, **timed_fields(timed, cases.work(op, shape, FORWARD, dt),
                                                             h.peak_memory(fwd)[0]), "check": check})
            except Exception as exc:  # recorded without losing the forward + backward row
                row["fwd_error"] = error_text(exc)
    return {"ok": True, "rows": rows}


HANDLERS = {"env": task_env, "parity": task_parity, "bench": task_bench}


def _handler(kind):
    if kind == "build":  # the extension build lives with the other build code
        from benchmarks.gpu_check.build import task_build

        return task_build
    return HANDLERS[kind]


def inject_fault(task):
    """Fail the way a broken kernel would, for the tasks GPU_CHECK_FAULT names (``plan.fault_for``)."""
    from benchmarks.gpu_check.plan import fault_for

    what = fault_for(task)
    if what == "crash":
        os._exit(139)  # the process dies as on a segfault
    if what == "hang":
        while True:  # a kernel that never returns: only the watchdog ends this
            time.sleep(60)
    if what:
        raise RuntimeError(f"injected fault ({task.get('provider')}: {what})")


def worker_main(spec_path: str, result_path: str) -> int:
    with open(spec_path) as fh:
        spec = json.load(fh)
    out = open(result_path, "a", buffering=1)

    def emit(ev):
        out.write(json.dumps(clean(ev)) + "\n")
        out.flush()

    try:
        ctx = Ctx(spec)
    except BaseException as exc:  # e.g. torch not importable
        emit({"event": "fatal", "error": error_text(exc), "traceback": traceback.format_exc()[-4000:]})
        return 2
    for task in spec["tasks"]:
        if time.time() > spec["deadline"]:
            emit({"event": "result", "id": task["id"], "record": {"ok": False, "skipped": "time budget"}})
            continue
        emit({"event": "start", "id": task["id"]})
        print(f"[gpu_check worker] {time.strftime('%H:%M:%S')} start {task['id']}", flush=True)
        t0 = time.perf_counter()
        try:
            inject_fault(task)
            rec = _handler(task["kind"])(task, ctx, emit)
        except Exception as exc:
            rec = err_record(exc)
            print(rec["traceback"], flush=True)
        rec.setdefault("ok", True)
        rec["seconds"] = time.perf_counter() - t0
        emit({"event": "result", "id": task["id"], "record": rec})
        if not rec["ok"] and ctx.cuda and not ctx.healthy():
            emit({"event": "unhealthy", "id": task["id"]})
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1], sys.argv[2]))
