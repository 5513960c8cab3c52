"""Shared by the CPU benchmarks: machine description, commit, warmed timing, result rows."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from typing import Callable, Dict

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


def machine() -> Dict[str, object]:
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


def meta() -> Dict[str, object]:
    return {"machine": machine(), "torch": torch.__version__, "commit": commit(), "date": datetime.date.today().isoformat()}


def percentiles_ms(fn: Callable[[], None], repeats: int, warmup: int = 3) -> Dict[str, float]:
    """p20 / p50 / p80 wall time in ms after ``warmup`` calls (CUDA synchronised when used)."""
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


def append_rows(name: str, rows, folder: str = None) -> str:
    folder = folder or RESULTS_DIR
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
