"""What a result row records about the run: machine, device, versions, commit and date.

torch is imported inside the functions that need it: compare and plot read results without it.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from typing import Dict, Optional

from benchmarks import RESULTS_DIR, ROOT


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


def machine() -> Dict[str, object]:
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return info


def device_name(machine_info: dict) -> str:
    """The row's ``device``: the card's name, or the CPU with its vector capability (AVX2 and AVX-512
    machines time the C++ kernels differently, so their rows are kept apart)."""
    device = machine_info.get("device") or "unknown"
    capability = machine_info.get("cpu_capability")
    if device.startswith("cpu") and capability and device.endswith(")"):
        return f"{device[:-1]}, {capability})"
    return device


def commit() -> str:
    """Short hash (+dirty) from git; where .git did not travel, the hash written to results/COMMIT."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except Exception:
        path = os.path.join(RESULTS_DIR, "COMMIT")
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()[:7] + "(COMMIT file)"
        return "unknown"


def triton_version() -> Optional[str]:
    # Read from the package metadata: importing triton is slow and may fail without a GPU driver.
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def now_utc() -> str:
    # UTC to the second, so that several runs on one day still sort in the order they ran.
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def meta() -> Dict[str, object]:
    """The fields every row of this run shares."""
    import torch

    info = machine()
    return {"device": device_name(info), "machine": info, "torch": torch.__version__, "triton": triton_version(),
            "commit": commit(), "date": now_utc()}
