"""Shared by the benchmarks: machine description, commit, warmed timing and peak memory, result rows."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


# --- describing the run -------------------------------------------------------------------------
# torch is imported inside the functions that measure, so that reading results does not need it.

def machine() -> Dict[str, object]:
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return info


def commit() -> str:
    """Short hash (+dirty) from git; where .git did not travel, the hash written to results/COMMIT."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except Exception:
        path = os.path.join(RESULTS_DIR, "COMMIT")
        if os.path.exists(path):
            return open(path).read().strip()[:7] + "(COMMIT file)"
        return "unknown"


def triton_version() -> Optional[str]:
    # Read from the package metadata: importing triton is slow and may fail without a GPU driver.
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def meta() -> Dict[str, object]:
    import torch

    # UTC to the second, so that several runs on one day still sort in the order they ran.
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"machine": machine(), "torch": torch.__version__, "triton": triton_version(), "commit": commit(), "date": date}


# --- measuring ----------------------------------------------------------------------------------

def percentiles_ms(fn: Callable[[], None], repeats: int, warmup: int = 3) -> Dict[str, float]:
    """p20 / p50 / p80 wall time in ms after ``warmup`` calls (CUDA synchronised when used)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    p20, p50, p80 = np.percentile(times, [20, 50, 80])
    return {"p20_ms": float(p20), "p50_ms": float(p50), "p80_ms": float(p80)}


def _profiled_cpu_peak(fn: Callable[[], None]) -> int:
    """Peak of bytes held by torch's CPU allocator during one call, above what it held at the start.

    torch exposes no CPU allocator statistics, but the profiler with ``profile_memory`` records every
    allocation and free with the running total; the maximum of that total is the peak (inputs excluded,
    returned gradients included: the same definition as the GPU check's ``peak_above_base_bytes``).
    """
    import torch
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and str(event.extra_fields.device) == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.total_allocated))
    if not events:
        return 0
    events.sort()
    start = events[0][2] - events[0][1]
    return int(max(total for _, _, total in events) - start)


def _rss_high_water_delta(fn: Callable[[], None]) -> int:
    """Linux: reset the resident-set high-water mark, call, read how far it rose above the RSS before.

    Underestimates once malloc keeps freed pages for reuse, hence only the fallback.
    """
    def status_kb(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field)).split()[1])

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5 resets VmHWM to the current RSS
    before = status_kb("VmRSS:")
    fn()
    return max(0, status_kb("VmHWM:") - before) * 1024


def peak_memory(fn: Callable[[], None]) -> Tuple[Optional[int], str]:
    """(bytes, method) for one extra, untimed call: CUDA allocator peak on a GPU; on CPU torch's CPU
    allocations seen by the profiler, else the RSS high-water mark delta; (None, reason) when neither works."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "cuda_max_memory_allocated"
    errors = []
    for method, measure in (("torch_profiler_cpu_allocations", _profiled_cpu_peak), ("rss_high_water_delta", _rss_high_water_delta)):
        try:
            return measure(fn), method
        except Exception as exc:  # private profiler API or /proc missing: try the next method
            errors.append(f"{method}: {type(exc).__name__}: {exc}")
    return None, "; ".join(errors)


# --- writing rows -------------------------------------------------------------------------------

def append_rows(name: str, rows, folder: str = None) -> str:
    folder = folder or RESULTS_DIR
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
