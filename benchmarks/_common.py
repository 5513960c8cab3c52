"""Shared by the benchmarks: machine description, commit, warmed timing and peak memory, result rows
written (``append_rows``) and read back into one normalised table (``load_rows``) for compare and plot.
"""
from __future__ import annotations

import datetime
import functools
import glob
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


# --- describing the run -------------------------------------------------------------------------
# torch is imported inside the functions that measure: compare and plot read results without it.

def machine() -> Dict[str, object]:
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return info


def cpu_model() -> str:
    """The CPU's model name: the vector width the C++ kernels get (AVX-512 or AVX2) moves their times."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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

def append_rows(name: str, rows, folder: Optional[str] = None) -> str:
    folder = folder or RESULTS_DIR
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


# --- reading rows back: JSONL of kernels.py / train_step.py and gpu_check.json, one table ----------

# What one measurement is; two result sets are compared on rows with equal keys. The device is part of
# the key so that a CPU time is never set against a GPU time.
KEY = ["benchmark", "op", "shape", "dtype", "provider", "mode", "device"]
COLUMNS = KEY + ["median_ms", "p20_ms", "p80_ms", "peak_bytes", "images_per_s", "error", "commit", "date", "torch",
                 "triton", "source"]
# A GPU result folder is named <date>_<card>_<commit>; its name wins over the commit recorded inside
# (the copied tree may carry an older git HEAD).
_RUN_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}_.+_([0-9a-f]{7,40})$")


def _shape_text(shape) -> str:
    return "x".join(str(s) for s in shape) if isinstance(shape, (list, tuple)) else str(shape)


def _kernel_row(row: dict) -> dict:
    op = row.get("kernel", row.get("op"))
    if row.get("affinity") not in (None, "dense"):  # enhancement rows without the field ran a dense one
        op = f"{op} ({row['affinity']} affinity)"
    return {
        "benchmark": row.get("benchmark", "kernels"), "op": op,
        "shape": _shape_text(row.get("shape")), "dtype": row.get("dtype", "float32"), "provider": row.get("provider"),
        "mode": row.get("mode", "forward+backward"), "median_ms": row.get("p50_ms"), "p20_ms": row.get("p20_ms"),
        "p80_ms": row.get("p80_ms"), "peak_bytes": row.get("peak_bytes"), "error": row.get("error"),
    }


def _train_step_row(row: dict) -> dict:
    def ms(field):
        return None if row.get(field) is None else 1e3 * row[field]

    return {
        "benchmark": "train_step", "op": f"{row['backbone']}/{row['head']}",
        "shape": f"{row['image_size']}px b{row['batch']} c{row['classes']}",
        # Rows written before these fields existed ran the defaults.
        "dtype": row.get("precision", "fp32"), "provider": row.get("kernels", "auto"), "mode": "train step",
        "median_ms": ms("step_s_p50"), "p20_ms": ms("step_s_p20"), "p80_ms": ms("step_s_p80"),
        "peak_bytes": row.get("peak_memory_bytes"), "images_per_s": row.get("images_per_s"), "error": row.get("error"),
    }


def _jsonl_rows(path: str) -> Iterable[dict]:
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("benchmark") == "train_step":
                out = _train_step_row(row)
            elif "kernel" in row or row.get("benchmark") == "kernels":
                out = _kernel_row(row)
            else:
                print(f"warning: {path}:{n}: not a kernels or train_step row, skipped", file=sys.stderr)
                continue
            machine_info = row.get("machine") or {}
            device = machine_info.get("device", "unknown")
            if device.startswith("cpu") and machine_info.get("cpu_capability"):  # AVX2 and AVX-512 times apart
                device = f"{device[:-1]}, {machine_info['cpu_capability']})" if device.endswith(")") else device
            yield {**out, "device": device, "commit": row.get("commit"),
                   "date": row.get("date"), "torch": row.get("torch"), "triton": row.get("triton")}


# gpu_check.json families read back: family -> (op, the fields that make the shape). The enhancement
# runs the model's masked affinity, named as kernels.py names its masked rows.
_GPU_CHECK_FAMILIES = {"asl": ("asl", ("B", "C")), "attention": ("attention", ("B", "C", "d", "N")),
                       "enhance": ("progressive_enhance (masked affinity)", ("B", "C", "L")),
                       "grid": ("grid", ("B", "C", "d", "N"))}


def _gpu_check_rows(doc: dict) -> Iterable[dict]:
    env = doc.get("environment", {})
    recorded = (env.get("commit") or "unknown")[:7] + ("+dirty" if env.get("git_dirty") else "")
    common = {"benchmark": "kernels", "device": env.get("device_name") or "unknown", "commit": recorded,
              "date": env.get("date_utc") or doc.get("started_utc"), "torch": env.get("torch"), "triton": env.get("triton")}
    for family, (op, fields) in _GPU_CHECK_FAMILIES.items():
        for rec in doc.get("benchmarks", {}).get(family, []):
            if rec.get("skipped"):
                continue  # never measured (time budget): absent, not failed
            shape = "x".join(str(rec[f]) for f in fields)
            error = None if rec.get("ok", True) else (rec.get("error") or "failed")
            base = {**common, "op": op, "shape": shape, "dtype": rec.get("dtype"), "provider": rec.get("provider"),
                    "error": error}
            yield {**base, "mode": "forward+backward", "median_ms": rec.get("median_ms"), "p20_ms": rec.get("p20_ms"),
                   "p80_ms": rec.get("p80_ms"), "peak_bytes": rec.get("peak_above_base_bytes")}
            if "fwd_median_ms" in rec:
                yield {**base, "mode": "forward", "median_ms": rec["fwd_median_ms"], "p20_ms": rec.get("fwd_p20_ms"),
                       "p80_ms": rec.get("fwd_p80_ms"), "peak_bytes": (rec.get("fwd_peak") or {}).get("peak_above_base_bytes")}


def _file_rows(path: str) -> List[dict]:
    if path.endswith(".jsonl"):
        rows = list(_jsonl_rows(path))
    else:
        with open(path) as f:
            doc = json.load(f)
        if not (isinstance(doc, dict) and "benchmarks" in doc and "environment" in doc):
            raise ValueError(f"{path}: not a gpu_check.json (no 'benchmarks' and 'environment')")
        rows = list(_gpu_check_rows(doc))
    folder = _RUN_FOLDER.match(os.path.basename(os.path.dirname(os.path.abspath(path))))
    for row in rows:
        if folder:
            row["commit"] = folder.group(1)[:7]
        row["source"] = os.path.relpath(path)
    return rows


def result_files(path: str) -> List[str]:
    """A JSONL file, a gpu_check.json, or a folder searched recursively for both (sorted)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(path)
    found = glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True)
    found += glob.glob(os.path.join(path, "**", "gpu_check.json"), recursive=True)
    return sorted(found)


def load_rows(paths: Iterable[str]):
    """One pandas DataFrame with ``COLUMNS`` (plus ``order``, the position in the files as read)."""
    import pandas as pd

    rows = [row for path in paths for file in result_files(path) for row in _file_rows(file)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    for column in ("median_ms", "p20_ms", "p80_ms", "peak_bytes", "images_per_s"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    for column in KEY + ["commit", "date"]:
        table[column] = table[column].fillna("").astype(str)
    table["order"] = range(len(table))
    return table


def select(table, conditions: Iterable[str]):
    """Keep rows matching every ``COLUMN=VALUE``; a commit matches by prefix (short or long hash)."""
    for condition in conditions or ():
        column, sep, value = condition.partition("=")
        if not sep or column not in table.columns:
            raise ValueError(f"expected COLUMN=VALUE with COLUMN in {', '.join(COLUMNS)}, got {condition!r}")
        text = table[column].astype(str)
        table = table[text.str.startswith(value) if column == "commit" else text == value]
    return table


@functools.lru_cache(maxsize=1)
def _git_history() -> Tuple[str, ...]:
    try:
        out = subprocess.run(["git", "rev-list", "--topo-order", "--reverse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    except Exception:
        return ()
    return tuple(out.split())


def commit_position(commit: str) -> int:
    """Index of the commit in this repository's history (oldest first); -1 when unknown here."""
    match = re.match(r"[0-9a-f]{7,40}", commit or "")
    if match:
        for position, full in enumerate(_git_history()):
            if full.startswith(match.group(0)):
                return position
    return -1


def chronological(table):
    """Rows sorted oldest first: by date, then by commit in history, then as read."""
    positions = table["commit"].map(commit_position)
    return table.assign(_position=positions).sort_values(["date", "_position", "order"], kind="stable").drop(columns="_position")


def latest_per_key(table):
    """The latest row of every key (repeated runs: the last by date, then commit order, then file order)."""
    return chronological(table).drop_duplicates(KEY, keep="last")
