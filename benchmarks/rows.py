"""The one row schema of every benchmark result, written as JSON lines and read back into one table.

A row (one measurement)::

    {"schema": 2, "benchmark": "kernels" | "train_step", "op": "asl", "variant": "",
     "mode": "forward" | "forward+backward" | "train step", "provider": "cpu", "dtype": "float32",
     "shape": {"B": 4096, "C": 80},                      # named fields, per op (benchmarks/cases.py)
     "p20_ms": ..., "p50_ms": ..., "p80_ms": ...,        # absent when the provider failed ("error")
     "gb_per_s": ..., "tflop_per_s": ..., "peak_mib": ..., "images_per_s": ...,
     "device": "NVIDIA H200" | "cpu (x86_64, AVX512)", "commit": "abc1234", "date": "2026-12-02T22:03:33+00:00",
     "torch": ..., "triton": ..., "machine": {...}, ...}  # plus what the benchmark adds (check, speedups ...)

Rows are written by ``kernels``, ``train_step`` and ``gpu_check`` (its ``gpu_check.json`` holds them
under ``rows``). ``compare`` and ``plot`` read JSONL files and ``gpu_check.json`` files with
``load_rows``; nothing is translated on the way.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import re
import subprocess
import sys
from typing import Iterable, List, Optional, Tuple

from benchmarks import RESULTS_DIR, ROOT

SCHEMA = 2
# What one measurement is; two result sets are compared on rows with equal keys. The device is part of
# the key so that a CPU time is never set against a GPU time.
KEY = ["benchmark", "op", "variant", "shape", "dtype", "provider", "mode", "device"]
COLUMNS = KEY + ["p50_ms", "p20_ms", "p80_ms", "gb_per_s", "tflop_per_s", "peak_mib", "images_per_s", "error",
                 "commit", "date", "torch", "triton", "source"]
NUMERIC = ("p50_ms", "p20_ms", "p80_ms", "gb_per_s", "tflop_per_s", "peak_mib", "images_per_s")
# A GPU result folder is named <date>_<card>_<commit>; its name wins over the commit recorded inside
# (the copied tree may carry an older git HEAD).
_RUN_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}_.+_([0-9a-f]{7,40})$")


def shape_text(shape: dict) -> str:
    """``{"B": 4096, "C": 80}`` -> ``"B=4096 C=80"`` (the fields in the op's order)."""
    return " ".join(f"{name}={value}" for name, value in shape.items())


def row(benchmark: str, op: str, mode: str, provider: str, dtype: str, shape: dict, variant: str = "",
        **fields) -> dict:
    """A row of the schema; ``fields``: times, rates, error and anything the benchmark adds."""
    return {"schema": SCHEMA, "benchmark": benchmark, "op": op, "variant": variant, "mode": mode,
            "provider": provider, "dtype": dtype, "shape": dict(shape), **fields}


def timed_fields(times: dict, work: Optional[dict] = None, peak_bytes=None) -> dict:
    """p20/p50/p80 from ``times`` (ms), GB/s and TFLOP/s from ``work`` ({"bytes", "flop"}, either None)
    at the median, and the peak in MiB."""
    out = {k: times[k] for k in ("p20_ms", "p50_ms", "p80_ms")}
    work = work or {}
    if work.get("bytes"):
        out["gb_per_s"] = work["bytes"] / out["p50_ms"] / 1e6
    if work.get("flop"):
        out["tflop_per_s"] = work["flop"] / out["p50_ms"] / 1e9
    if peak_bytes is not None:
        out["peak_mib"] = peak_bytes / 2 ** 20
    return out


def append_rows(name: str, rows: Iterable[dict], folder: Optional[str] = None) -> str:
    folder = folder or RESULTS_DIR
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


# --- reading -------------------------------------------------------------------------------------

def read_file(path: str) -> List[dict]:
    """The rows of a JSONL file or of a ``gpu_check.json`` (its ``rows``); lines of other benchmarks
    (``distributed.jsonl``: no ``op``) are left out with a warning."""
    if path.endswith(".jsonl"):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or "rows" not in doc:
            raise ValueError(f"{path}: not a gpu_check.json of schema {SCHEMA} (no 'rows')")
        rows = doc["rows"]
    kept = [r for r in rows if r.get("schema") == SCHEMA]
    if len(kept) < len(rows):
        print(f"warning: {path}: {len(rows) - len(kept)} rows not of schema {SCHEMA} (another benchmark), skipped",
              file=sys.stderr)
    kept = [r for r in kept if not r.get("skipped")]  # never measured (time budget): absent, not failed
    folder = _RUN_FOLDER.match(os.path.basename(os.path.dirname(os.path.abspath(path))))
    for r in kept:
        if folder:
            r["commit"] = folder.group(1)[:7]
        r["source"] = os.path.relpath(path)
    return kept


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
    """One pandas DataFrame with ``COLUMNS`` (shape as text; plus ``order``, the position as read)."""
    import pandas as pd

    rows = [r for path in paths for file in result_files(path) for r in read_file(file)]
    table = pd.DataFrame([{**r, "shape": shape_text(r.get("shape") or {})} for r in rows], columns=COLUMNS)
    for column in NUMERIC:
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
    return table.assign(_position=positions).sort_values(["date", "_position", "order"], kind="stable").drop(
        columns="_position")


def latest_per_key(table):
    """The latest row of every key (repeated runs: the last by date, then commit order, then file order)."""
    return chronological(table).drop_duplicates(KEY, keep="last")
