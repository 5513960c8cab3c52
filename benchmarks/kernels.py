"""Kernel micro-benchmarks on CPU: forward and forward + backward per provider, p20/p50/p80, peak memory.

    python -m benchmarks.kernels [--threads 2] [--repeats 30] [--compile-backend inductor] [--out DIR]
    python -m benchmarks.kernels --smoke          # tiny sizes, 2 repeats, nothing appended

The ops' CPU cases (``benchmarks.cases``, run ``cpu``) with the providers of ``CPU_PROVIDERS`` (defined
in ``benchmarks.providers``; the first of each op is the baseline its ``vs_baseline`` is against),
timed interleaved by ``benchmarks.harness``. The run first measures the CPU's copy bandwidth and fp32
matmul throughput; each row carries them beside its own GB/s and TFLOP/s. A provider that fails (for
example ``torch.compile`` without a working compiler) gets a row with its ``error``; the run goes on.
Rows (``benchmarks.rows``) are appended to ``DIR/kernels_cpu.jsonl`` (default ``benchmarks/results``);
in smoke mode only when ``--out`` is given. Smoke mode compiles with ``aot_eager`` (the graph capture
and autograd without inductor's C++ build, which takes tens of seconds on two cores).
"""
from __future__ import annotations

import argparse
import sys

from benchmarks import cases, providers
from benchmarks.environment import meta
from benchmarks.harness import Harness
from benchmarks.rows import append_rows, row, timed_fields

# op -> providers timed on CPU, the baseline first (the plain-PyTorch definition, called directly)
CPU_PROVIDERS = {
    "asl": ("eager_module", "compile_autograd", "eager", "cpu"),
    "class_attention": ("eager_direct", "compile", "eager", "cpu"),
    "progressive_enhance": ("eager_direct", "compile", "eager", "cpu", "cpu_staged"),
}
MODES = ("forward", "forward+backward")


def device_peaks(harness: Harness, smoke: bool) -> dict:
    """What this CPU reaches, measured in the same run: copy bandwidth (read + write of a buffer larger
    than the caches) and fp32 matmul throughput, the roofs for GB/s and TFLOP/s."""
    import torch

    n = (1 << 20) if smoke else (1 << 26)  # 256 MiB of fp32 outside smoke mode
    m = 256 if smoke else 2048
    src, dst = torch.randn(n), torch.empty(n)
    a, b = torch.randn(m, m), torch.randn(m, m)
    times = harness.time({"copy": lambda: dst.copy_(src), "mm": lambda: torch.mm(a, b)}, reps=3 if smoke else 10)
    return {"copy_gb_per_s": 2 * 4 * n / times["copy"]["p50_ms"] / 1e6,
            "matmul_tflop_per_s": 2 * m ** 3 / times["mm"]["p50_ms"] / 1e9,
            "peaks_how": f"dst.copy_(src) of {4 * n >> 20} MiB fp32 (bytes read + written); {m}^3 fp32 torch.mm"}


def run_case(harness, op, shape, variant, names, compile_backend, common) -> list:
    """Rows of one case: each provider in both modes, timed interleaved."""
    case = cases.make_case(op, shape, "float32", "cpu", variant)
    built = {p: providers.build(op, p, case, compile_backend) for p in names}
    out = []
    for mode in MODES:
        fns = {p: (full if mode == "forward+backward" else fwd) for p, (full, fwd) in built.items()}
        fns = {p: fn for p, fn in fns.items() if fn is not None}
        first = {}
        for p, fn in list(fns.items()):
            try:
                first[p] = harness.first_call(fn)[1]
            except Exception as exc:  # recorded; the others run
                first[p] = exc
        timed = harness.time({p: fn for p, fn in fns.items() if not isinstance(first[p], Exception)})
        base = timed.get(names[0], {}).get("p50_ms")
        for p in fns:
            fields = {"error": f"{type(first[p]).__name__}: {first[p]}"[:1000]} if isinstance(first[p], Exception) \
                else dict(timed[p], first_call_s=first[p])
            if "p50_ms" in fields:
                peak, method = harness.peak_memory(fns[p])
                fields.update(timed_fields(fields, cases.work(op, shape, mode, "float32"), peak), peak_method=method,
                              baseline=names[0], vs_baseline=base / fields["p50_ms"] if base else None)
            fields.pop("traceback", None)
            if p.startswith("compile"):
                fields["compile_backend"] = compile_backend
            out.append(row("kernels", op, mode, p, "float32", shape, variant, timing="interleaved", **fields, **common))
            _print(out[-1])
    return out


def _print(r: dict) -> None:
    label = f"{r['op']}{' ' + r['variant'] if r['variant'] else ''}"
    shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
    head = f"{label:38s} {r['mode']:16s} {shape:24s} {r['provider']:16s}"
    if "error" in r:
        print(f"{head} FAILED {r['error'].splitlines()[0][:200]}")
        return
    rates = f"{r.get('gb_per_s', 0):7.2f} GB/s" + (f" {r['tflop_per_s']:.3f} TFLOP/s" if "tflop_per_s" in r else "")
    peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.2f} MiB"
    print(f"{head} p50 {r['p50_ms']:9.3f} ms (p20 {r['p20_ms']:.3f}, p80 {r['p80_ms']:.3f})  "
          f"{r['vs_baseline'] or float('nan'):6.2f}x {r['baseline']}  {rates}  peak {peak}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke: aot_eager)")
    ap.add_argument("--out", default=None, help="folder for kernels_cpu.jsonl (default benchmarks/results)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repeats, nothing appended unless --out")
    args = ap.parse_args(argv)
    import torch

    import cssfe.ops as ops

    torch.set_num_threads(args.threads)
    repeats = 2 if args.smoke else args.repeats
    compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    backends = {name for name, (ok, _) in ops.available_backends(build=True).items() if ok}
    info = meta()
    print(f"torch {info['torch']}, triton {info['triton']}, {torch.get_num_threads()} threads, commit {info['commit']}; "
          f"backends: {sorted(backends)}; compile backend: {compile_backend}")
    harness = Harness("cpu", warmup=3, reps=repeats)
    peaks = device_peaks(harness, args.smoke)
    print(f"measured peaks: copy {peaks['copy_gb_per_s']:.1f} GB/s, fp32 matmul {peaks['matmul_tflop_per_s']:.3f} TFLOP/s")
    common = {"threads": args.threads, **info, **peaks}
    rows = []
    for op, names in CPU_PROVIDERS.items():
        names = [p for p in names if providers.PROVIDERS[op][p].needs in (None, *backends)]
        # the attention and the enhancement take longer per call: a third of the rounds
        harness.reps = repeats if op == "asl" else max(repeats // 3, 2)
        for shape in cases.shapes(op, "cpu_smoke" if args.smoke else "cpu"):
            for variant in cases.OPS[op].variants:
                rows += run_case(harness, op, shape, variant, names, compile_backend, common)
    if not args.smoke or args.out:
        print(f"appended {len(rows)} rows to {append_rows('kernels_cpu.jsonl', rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
