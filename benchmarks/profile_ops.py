"""Where an op's time goes: the kernels (and host calls) of a few forward+backward steps of one op per
backend, from ``torch.profiler``, sorted by device time.

    python -m benchmarks.profile_ops --op attention --backends cuda,triton,reference --dtype bfloat16 \\
        --shape 64,80,784,512 --out DIR                 # on a GPU: the goals' main case
    python -m benchmarks.profile_ops --op enhance --shape 64,80,512 --affinity-grad --out DIR
    python -m benchmarks.profile_ops --op asl --shape 16384,1024 --out DIR
    python -m benchmarks.profile_ops --op attention --shape 2,8,16,32 --backends reference,cpu --dtype float32

Ops and shapes: ``attention`` = class attention followed by the progressive enhancement, B,C,N,d (the
GPU check's attention family: q [C, d], k and v [B, d, N], the model's masked affinity, no affinity
gradient); ``enhance`` = the enhancement alone, B,C,L (``--affinity-grad`` adds d loss / d R, which the
model needs when the label embeddings train); ``asl`` = the asymmetric loss, B,C, bool targets.

Per backend, after warm-up calls: ``--steps`` profiled forward+backward calls. Writes
``DIR/profile_<op>_<backend>_<dtype>.txt`` (torch's table, top ``--rows`` by device time, or by CPU
time on CPU) and one ``DIR/profile_<op>.json`` with, per backend, the rows (name, calls, self device
and CPU microseconds per step) and the step's wall time; prints the tables. Nothing is asserted: a
backend that fails records its error and the others still run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import cssfe.ops as ops
from benchmarks.cases import make_case
from benchmarks.environment import meta

SHAPE_FIELDS = {"attention": ("B", "C", "N", "d"), "enhance": ("B", "C", "L"), "asl": ("B", "C")}
CASE_OP = {"attention": "attention", "enhance": "progressive_enhance", "asl": "asl"}  # benchmarks.cases' names


def make_step(op: str, shape, dtype, device, backend: str, affinity_grad: bool = False):
    """A closure running one forward+backward of ``op`` with ``backend`` on the suite's seeded case
    (``benchmarks.cases``: the same inputs the kernel benchmarks time)."""
    if op not in SHAPE_FIELDS:
        raise ValueError(f"unknown op {op!r}; choose one of {sorted(SHAPE_FIELDS)}")
    case = make_case(CASE_OP[op], dict(zip(SHAPE_FIELDS[op], shape)), str(dtype).replace("torch.", ""), device)
    if op == "asl":
        x, y = case["x"], case["y"]

        def step():
            torch.autograd.grad(ops.asymmetric_loss(x, y, backend=backend), x)
        return step
    if op == "attention":
        q, k, v, lam = case["q"], case["k"], case["v"], case["lam"]

        def step():
            z0 = ops.class_attention(q, k, v, backend=backend)
            z1 = ops.progressive_enhance(z0, case["R"], case["groups"], case["gate"], lam, plan=case["plan"],
                                         backend=backend)
            torch.autograd.grad(z1, (q, k, v, lam), case["gout"])
        return step
    case["R"].requires_grad_(affinity_grad)
    wrt = (case["z"], case["R"], case["lam"]) if affinity_grad else (case["z"], case["lam"])

    def step():
        out = ops.progressive_enhance(case["z"], case["R"], case["groups"], case["gate"], case["lam"], plan=case["plan"],
                                      backend=backend)
        torch.autograd.grad(out, wrt, case["gout"])
    return step


def _event_us(evt, field: str) -> float:
    # torch >= 2.4 names device times "device"; older releases "cuda"
    for name in (f"self_{field}_time_total",) + (("self_cuda_time_total",) if field == "device" else ()):
        value = getattr(evt, name, None)
        if value is not None:
            return float(value)
    return 0.0


def profile_backend(step, device, steps: int, warmup: int, rows: int):
    """(rows sorted by self device time, or CPU time on CPU; torch's table; wall ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) / steps * 1e3
    averages = prof.key_averages()
    key = "device" if device.type == "cuda" else "cpu"
    sort_by = "self_cuda_time_total" if key == "device" else "self_cpu_time_total"
    table = averages.table(sort_by=sort_by, row_limit=rows)
    out = [{"name": e.key, "calls_per_step": e.count / steps,
            "self_device_us_per_step": _event_us(e, "device") / steps,
            "self_cpu_us_per_step": _event_us(e, "cpu") / steps} for e in averages]
    out.sort(key=lambda r: -r[f"self_{key}_us_per_step"])
    return out[:rows], table, wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=sorted(SHAPE_FIELDS), default="attention")
    p.add_argument("--shape", default="", help="comma-separated sizes (attention B,C,N,d; enhance B,C,L; asl B,C)")
    p.add_argument("--backends", default="reference,cuda,triton", help="comma-separated backends to profile")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--affinity-grad", action="store_true", help="enhance: also d loss / d affinity")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--out", default="", help="folder for the tables and the JSON (default: print only)")
    a = p.parse_args(argv)

    defaults = {"attention": "64,80,784,512", "enhance": "64,80,512", "asl": "16384,1024"}
    fields = SHAPE_FIELDS[a.op]
    try:
        shape = tuple(int(s) for s in (a.shape or defaults[a.op]).split(","))
    except ValueError:
        p.error(f"--shape: expected integers separated by commas, got {a.shape!r}")
    if len(shape) != len(fields) or min(shape) < 1:
        p.error(f"--shape for {a.op}: expected {len(fields)} positive sizes ({','.join(fields)}), got {a.shape!r}")
    if a.steps < 1 or a.warmup < 0 or a.rows < 1:
        p.error("--steps and --rows must be >= 1, --warmup >= 0")
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    if a.out:
        os.makedirs(a.out, exist_ok=True)

    result = {"op": a.op, "shape": dict(zip(fields, shape)), "dtype": a.dtype, "affinity_grad": a.affinity_grad,
              "steps": a.steps, "meta": meta(), "backends": {}}
    for backend in [b for b in a.backends.split(",") if b]:
        try:
            step = make_step(a.op, shape, dtype, device, backend, a.affinity_grad)
            rows, table, wall = profile_backend(step, device, a.steps, a.warmup, a.rows)
        except Exception as exc:  # noqa: BLE001 - one failing backend must not stop the others
            result["backends"][backend] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"== {a.op} {backend} {a.dtype}: {type(exc).__name__}: {exc}")
            continue
        result["backends"][backend] = {"wall_ms_per_step": wall, "rows": rows}
        print(f"== {a.op} {backend} {a.dtype} {dict(zip(fields, shape))}: {wall:.3f} ms per step (wall, profiled)")
        print(table)
        if a.out:
            with open(os.path.join(a.out, f"profile_{a.op}_{backend}_{a.dtype}.txt"), "w") as fh:
                fh.write(table)
    if a.out:
        with open(os.path.join(a.out, f"profile_{a.op}.json"), "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
