"""What the GPU check runs: its providers per family, its benchmark tasks (the suite's cases of
``benchmarks.cases``, runs ``gpu`` / ``dry``), its parity checks and the faults a test may inject.

A benchmark task: ``{"id", "kind": "bench", "family", "op", "variant", "provider", "shape", "dtype",
"timeout_s", "prewarm", ...}``; families: ``asl``, ``attention`` (class attention + enhancement, the
goals' case), ``enhance`` (the enhancement alone, on z of the attention case's shape), ``grid`` (the
SPEC section 6 grid) and ``blocks`` (Triton block configurations at the attention case).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from benchmarks import cases

# The GPU parity tests of each backend: the whole CUDA file but its slow nvcc-only check, and the check
# that a warmed-up model + loss step reads nothing back from the device; of the Triton file, the GPU
# test. The dry run selects the GPU tests alone (they skip without a device).
PYTEST_NODES = {
    "triton": ["tests/ops/test_triton.py::test_triton_kernels_on_gpu"],
    "cuda": ["tests/ops/test_cuda.py", "tests/ops/test_host_sync.py::test_cuda_step_reads_nothing_back_after_warm_up_on_gpu"],
}
PYTEST_DRY_SELECT = {"triton": "on_gpu", "cuda": "on_gpu"}
FAMILY_OP = {"asl": "asl", "attention": "attention", "enhance": "progressive_enhance", "grid": "attention",
             "blocks": "attention"}
# Triton flash attention blocks tried at the main attention shape: (BLOCK_C, BLOCK_N, num_warps,
# num_stages). The first is what cssfe/ops/backends/triton/attention.py picks at d = 512 when the flash strategy
# is forced. Compiled offline for sm_90 the largest kernel of each asks 64, 97, 192, 97, 97, 130, 97 and
# 130 KB of shared memory; BLOCK_C = 64 (288 and 320 KB) does not fit in 227 KB and is left out.
BLOCK_SWEEP = [(16, 16, 8, 1), (16, 32, 8, 1), (16, 64, 8, 1), (16, 32, 4, 1), (32, 16, 8, 1), (32, 32, 8, 1),
               (16, 32, 8, 2), (32, 32, 8, 2)]
BLOCK_SWEEP_DRY = [(8, 8, 4, 1), (16, 16, 4, 1)]
HANG_BUDGET_S = 1.0  # the watchdog of a task made to hang (GPU_CHECK_FAULT): it can never finish


def fault_for(task) -> Optional[str]:
    """Testing aid: GPU_CHECK_FAULT="provider[:dtype]=crash|hang|raise,..." names the tasks that fail
    the way a broken kernel would (crash: the process dies as on a segfault; hang: never returns)."""
    spec = os.environ.get("GPU_CHECK_FAULT")
    if not spec or task.get("prewarm"):
        return None
    for item in spec.split(","):
        target, _, what = item.partition("=")
        prov, _, dt = target.partition(":")
        if prov == task.get("provider") and (not dt or dt == task.get("dtype")):
            return what
    return None


def providers(native: str, triton_ok: bool, native_ok: bool, quick: bool, dry: bool) -> Dict[str, List[str]]:
    """Per family, the providers of ``benchmarks.providers`` this run times (``native``: cuda, or cpu in
    the dry run)."""
    triton = triton_ok
    return {
        "asl": ["eager", "eager_module", "compile", "compile_ro"] + ([] if quick else ["compile_autograd"])
               + (["triton", "triton_kernel"] if triton else []) + ([native, native + "_kernel"] if native_ok else []),
        "attention": ["eager", "compile", "compile_ro", "auto"] + (["triton", "triton_flash", "triton_gemm"] if triton else [])
                     + ([native] if native_ok else [])
                     + ["sdpa"] + (["sdpa_math"] if dry else ["sdpa_flash", "sdpa_efficient", "sdpa_cudnn"]),
        "enhance": ["eager"] + ([] if quick else ["compile"]) + (["triton"] if triton else [])
                   + ([native, native + "_block", native + "_staged"] if native_ok else []),
        "grid": ["eager", "auto"] + (["triton", "triton_flash"] if triton else []) + ([native] if native_ok else [])
                + ["sdpa"],
    }


def main_cases(dry: bool) -> Dict[str, dict]:
    """Where the goals and the fastest backends are judged, per family."""
    run = "dry" if dry else "gpu"
    attention = cases.main_shape("attention", run)
    return {"asl": cases.main_shape("asl", run), "attention": attention,
            "enhance": {"B": attention["B"], "C": attention["C"], "L": attention["d"]}}


def bench_tasks(args, plist, next_id, dry: bool, prewarm: bool = False):
    """(tier1, tier2, grid) task lists: the main cases first, then the other shapes and dtypes, then the
    grid and the block sweep. Prewarm: only the providers with disk caches (compile, triton)."""
    run = "dry" if dry else "gpu"
    main = main_cases(dry)
    attn_dtypes = ["bfloat16", "float32"]
    grid_dt = "float32" if dry else "bfloat16"  # so the Triton interpreter (fp32 only) runs the grid too
    grid_run = "dry_grid" if dry else ("gpu_grid_quick" if args.quick else "gpu_grid")
    fams = set(args.families.split(","))

    def keep(p, dt="float32"):  # bf16 is broken in the Triton interpreter (tests/ops/test_triton.py)
        return (not prewarm or p.startswith(("compile", "triton"))) and not (dry and p.startswith("triton")
                                                                            and dt != "float32")

    def task(family, provider, shape, dt, **extra):
        if args.task_timeout_s:
            timeout = args.task_timeout_s
        else:
            timeout = 300 if provider.startswith("compile") else 150
        t = {"id": next_id(f"{family}:"), "kind": "bench", "family": family, "op": FAMILY_OP[family],
             "variant": "masked affinity" if family == "enhance" else "", "provider": provider, "shape": shape,
             "dtype": dt, "prewarm": prewarm, "timeout_s": timeout, **extra}
        if fault_for(t) == "hang":
            t["timeout_s"] = HANG_BUDGET_S
        return t

    tier1, tier2, grid = [], [], []
    if "asl" in fams:
        for shape in cases.shapes("asl", run):
            for dt in ("float32", "bfloat16"):
                for p in plist["asl"]:
                    if keep(p, dt):
                        (tier1 if shape == main["asl"] else tier2).append(task("asl", p, shape, dt, fwd=False))
    if "attention" in fams:
        for dt in attn_dtypes:
            for p in plist["attention"]:
                if keep(p, dt) and not (dt != "bfloat16" and p in ("sdpa_flash", "sdpa_cudnn")):
                    (tier1 if dt == "bfloat16" else tier2).append(task("attention", p, main["attention"], dt))
    if "enhance" in fams:
        for c in args.enhance_classes or [main["enhance"]["C"]]:
            for dt in attn_dtypes:
                for p in plist["enhance"]:
                    if keep(p, dt):
                        tier2.append(task("enhance", p, dict(main["enhance"], C=c), dt))
    if "grid" in fams:
        for shape in cases.shapes("attention", grid_run):
            for p in plist["grid"]:
                if keep(p, grid_dt):
                    grid.append(task("grid", p, shape, grid_dt, variant="SPEC grid", fwd=False))
    if "blocks" in fams and not prewarm and "triton" in plist["attention"]:
        dt = "float32" if dry else "bfloat16"
        # the rows' provider names the launch configuration (the task builds provider triton inside it)
        grid[:0] = [task("blocks", "triton", main["attention"], dt, fwd=False, block_c=bc, block_n=bn, num_warps=w,
                         num_stages=s, label=f"triton_flash BLOCK_C={bc} BLOCK_N={bn} warps={w} stages={s}")
                    for bc, bn, w, s in (BLOCK_SWEEP_DRY if dry else BLOCK_SWEEP)]
    return tier1, tier2, grid


def parity_cases(kc, limit):
    """The kernel_cases checks the direct parity tasks run: (op, shape, kwargs)."""
    out = []
    for i, shape in enumerate(kc.ATTENTION_SHAPES[:limit]):
        out.append(("attention", tuple(shape), {"batched_q": i % 2 == 1, "seed": i}))
    for i, shape in enumerate(kc.ENHANCE_SHAPES[:limit]):
        out.append(("enhance", tuple(shape), {"mask": i % 2 == 0, "seed": i}))
    for i, shape in enumerate(kc.ASL_SHAPES[:limit]):
        out.append(("asl", tuple(shape), dict(kc.ASL_VARIANTS[i % len(kc.ASL_VARIANTS)], seed=i)))
    for variant in kc.ASL_VARIANTS[:limit]:
        out.append(("asl", (37, 20), dict(variant)))
    return out


def parity_tasks(backend: str, dry: bool, next_id) -> List[dict]:
    """The direct parity checks of one backend, per dtype (fewer in the dry run)."""
    if dry:
        dtypes = ["float32"] if backend == "triton" else ["float32", "bfloat16"]
        limit = 1 if backend == "triton" else 2
    else:
        dtypes, limit = ["float32", "float16", "bfloat16"], None
    return [{"id": next_id(f"parity:{backend}:{dt}:"), "kind": "parity", "backend": backend, "dtype": dt,
             "limit": limit, "timeout_s": 240} for dt in dtypes]
