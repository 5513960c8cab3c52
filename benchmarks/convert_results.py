"""One-off: rewrite the committed results of benchmarks/results in the row schema of benchmarks/rows.py.

    python -m benchmarks.convert_results

Names change (CPU providers take the suite's names, seconds become ms, bytes MiB); no measured number
changes. Run once on the files written before the schema existed; removed after that run.
"""
from __future__ import annotations

import glob
import json
import os

from benchmarks import RESULTS_DIR
from benchmarks.environment import device_name
from benchmarks.rows import row

CPU_FIELDS = {"asl": ("B", "C"), "class_attention": ("B", "C", "d", "N"), "progressive_enhance": ("B", "C", "L")}
CPU_PROVIDERS = {
    "asl": {"eager AsymmetricLoss": "eager_module", "compile": "compile_autograd", "ops reference": "eager",
            "ops cpu": "cpu"},
    "class_attention": {"eager reference": "eager_direct", "compile": "compile", "ops reference": "eager",
                        "ops cpu": "cpu"},
    "progressive_enhance": {"eager reference": "eager_direct", "compile": "compile", "ops reference": "eager",
                            "ops cpu": "cpu", "ops cpu staged": "cpu_staged"},
}
GPU_FIELDS = {"asl": ("B", "C"), "attention": ("B", "C", "N", "d"), "grid": ("B", "C", "N", "d"),
              "blocks": ("B", "C", "N", "d"), "enhance": ("B", "C", "L")}
GPU_OP = {"asl": "asl", "attention": "attention", "grid": "attention", "blocks": "attention",
          "enhance": "progressive_enhance"}
MIB = 2 ** 20


def cpu_kernel_row(r: dict) -> dict:
    op = r["kernel"]
    variant = {"masked": "masked affinity", "dense": "dense affinity", None: "dense affinity"}[r.get("affinity")] \
        if op == "progressive_enhance" else ""  # enhancement rows without the field ran a dense affinity
    names = CPU_PROVIDERS[op]
    extra = {k: v for k, v in r.items() if k not in ("benchmark", "kernel", "mode", "shape", "dtype", "provider",
                                                     "affinity", "peak_bytes", "speedup_vs_eager")}
    if r.get("peak_bytes") is not None:
        extra["peak_mib"] = r["peak_bytes"] / MIB
    if "speedup_vs_eager" in r:  # against the first provider of the op: the plain-PyTorch definition
        extra.update(baseline=next(iter(names.values())), vs_baseline=r["speedup_vs_eager"])
    return row("kernels", op, r.get("mode", "forward+backward"), names[r["provider"]], r.get("dtype", "float32"),
               dict(zip(CPU_FIELDS[op], r["shape"])), variant, device=device_name(r.get("machine") or {}), **extra)


def train_step_row(r: dict) -> dict:
    def ms(field):
        return None if r.get(field) is None else 1e3 * r[field]

    compile_mode = r.get("compile", "off")
    extra = {k: v for k, v in r.items() if k not in (
        "benchmark", "backbone", "head", "image_size", "batch", "classes", "precision", "kernels", "compile",
        "step_s_p50", "step_s_p20", "step_s_p80", "head_loss_s_p50", "peak_memory_bytes")}
    if r.get("peak_memory_bytes") is not None:
        extra["peak_mib"] = r["peak_memory_bytes"] / MIB
    # rows written before these fields existed ran the defaults
    return row("train_step", f"{r['backbone']}/{r['head']}", "train step", r.get("kernels", "auto"),
               r.get("precision", "fp32"), {"image_size": r["image_size"], "batch": r["batch"], "classes": r["classes"]},
               "" if compile_mode == "off" else f"compile {compile_mode}", p20_ms=ms("step_s_p20"),
               p50_ms=ms("step_s_p50"), p80_ms=ms("step_s_p80"), head_loss_p50_ms=ms("head_loss_s_p50"),
               backbone=r["backbone"], head=r["head"], compile=compile_mode,
               device=device_name(r.get("machine") or {}), **extra)


RENAMED = {"median_ms": "p50_ms", "gbps": "gb_per_s", "tflops_fwd_bwd": "tflop_per_s", "graph_median_ms": "graph_p50_ms",
           "graph_gbps": "graph_gb_per_s"}
FORWARD = {"fwd_median_ms": "p50_ms", "fwd_p20_ms": "p20_ms", "fwd_p80_ms": "p80_ms", "tflops_fwd": "tflop_per_s",
           "fwd_speedup_vs_eager": "speedup_vs_eager", "fwd_speedup_vs_sdpa": "speedup_vs_sdpa"}
TASK = ("id", "kind", "provider", "B", "C", "N", "d", "L", "dtype", "block_c", "block_n", "num_warps", "num_stages")


def gpu_rows(family: str, rec: dict, run: dict) -> list:
    fields = GPU_FIELDS[family]
    variant = {"enhance": "masked affinity"}.get(family, "")
    if family == "blocks":
        variant = f"BLOCK_C={rec['block_c']} BLOCK_N={rec['block_n']} warps={rec['num_warps']} stages={rec['num_stages']}"
    blocks = {k: rec[k] for k in ("block_c", "block_n", "num_warps", "num_stages") if k in rec}
    full = {RENAMED.get(k, k): v for k, v in rec.items() if k not in TASK and k not in FORWARD
            and k not in ("fwd_peak", "peak_above_base_bytes")}
    if rec.get("peak_above_base_bytes") is not None:
        full["peak_mib"] = rec["peak_above_base_bytes"] / MIB
    args = ("kernels", GPU_OP[family])
    shape = {f: rec[f] for f in fields}
    out = [row(*args, "forward+backward", rec["provider"], rec["dtype"], shape, variant, family=family, **blocks,
               **run, **full)]
    if "fwd_median_ms" in rec:
        fwd = {new: rec[old] for old, new in FORWARD.items() if old in rec}
        peak = (rec.get("fwd_peak") or {}).get("peak_above_base_bytes")
        if peak is not None:
            fwd["peak_mib"] = peak / MIB
        out.append(row(*args, "forward", rec["provider"], rec["dtype"], shape, variant, family=family, ok=rec.get("ok"),
                       check=rec.get("check"), **run, **fwd))
    return out


def convert_gpu_check(path: str) -> None:
    with open(path) as f:
        doc = json.load(f)
    env = doc["environment"]
    run = {"device": env.get("device_name") or "unknown",
           "commit": (env.get("commit") or "unknown")[:7] + ("+dirty" if env.get("git_dirty") else ""),
           "date": env.get("date_utc") or doc.get("started_utc"), "torch": env.get("torch"), "triton": env.get("triton")}
    bench = doc["benchmarks"]
    rows = [r for family in GPU_FIELDS for rec in bench.pop(family, []) for r in gpu_rows(family, rec, run)]
    main = bench.pop("main_cases", None)
    doc["schema"] = 2
    if main:
        doc["main_cases"] = {family: dict(zip(GPU_FIELDS[family], case)) for family, case in main.items()}
    doc["rows"] = rows
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def convert_jsonl(path: str) -> None:
    with open(path) as f:
        old = [json.loads(line) for line in f if line.strip()]
    new = []
    for r in old:
        if r.get("schema") == 2 or r.get("benchmark") == "distributed":
            new.append(r)
        elif r.get("benchmark") == "train_step":
            new.append(train_step_row(r))
        else:
            new.append(cpu_kernel_row(r))
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in new)


def main() -> int:
    for path in sorted(glob.glob(os.path.join(RESULTS_DIR, "**", "*.jsonl"), recursive=True)):
        convert_jsonl(path)
        print("converted", os.path.relpath(path))
    for path in sorted(glob.glob(os.path.join(RESULTS_DIR, "**", "gpu_check.json"), recursive=True)):
        convert_gpu_check(path)
        print("converted", os.path.relpath(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
