"""Kernel micro-benchmarks on CPU: forward+backward time per provider, medians with p20/p80, peak memory.

    python benchmarks/kernels.py [--threads 2] [--repeats 30] [--compile-backend inductor] [--out DIR]
    python benchmarks/kernels.py --smoke          # tiny sizes, 2 repeats, nothing appended

ASL at B x C = 4096 x 80 and 256 x 1000: eager ``cssfe.losses.AsymmetricLoss`` with autograd against
the ``reference`` and fused ``cpu`` ops. Class attention at head-sized shapes: the eager plain
PyTorch definition (``cssfe.ops.reference.class_attention``) against the ops. For both, ``compile``
is ``torch.compile`` of the eager reference (``dynamic=False``); when it cannot compile here the row
records the error instead of a time and the run goes on.

Each op runs in two modes: ``forward`` (under no_grad) and ``forward+backward`` (the gradients of
every differentiable input); the progressive enhancement is timed too, with a dense random
affinity and with the model's masked one (row field ``affinity``), with the ``cpu`` backend's own
kernel (``ops cpu``) and with the staged strategy (``ops cpu staged``, csrc/enhance_staged.cpp, what the
``cuda`` backend runs for many classes) forced. The run first measures the
CPU's copy bandwidth and fp32 matmul throughput; each row carries them with its own GB/s (bytes the
op must move) and TFLOP/s (attention and enhancement), so every time sits beside its roof.

Every row: p20/p50/p80 ms over the repeats after 3 warm-up calls, the providers of one op and mode
timed interleaved (``timing: interleaved``: each round calls every provider once, in a rotating
order; rows written before this have no ``timing`` field and were timed one provider after the
other), ``first_call_s`` (includes the
compilation for ``compile``), ``peak_bytes`` measured in one more, untimed call, and how
(``peak_method``: on CPU, torch's CPU allocations recorded by the profiler, above what was held
before the call, inputs excluded and returned gradients included; the RSS high-water mark delta
where the profiler cannot tell), plus machine, torch and triton versions, commit and UTC date.
Rows are appended to ``DIR/kernels_cpu.jsonl`` (default ``benchmarks/results``); in smoke mode only
when ``--out`` is given. Smoke mode compiles with ``aot_eager`` (the graph capture and autograd
without inductor's C++ build, which takes tens of seconds on two cores). Nothing is asserted.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cssfe.ops as ops  # noqa: E402
from cssfe.ops import library  # noqa: E402
from _common import append_rows, meta, peak_memory, percentiles_ms  # noqa: E402
from cssfe.losses import AsymmetricLoss  # noqa: E402
from cssfe.ops import reference  # noqa: E402


def measure_side_by_side(fns: dict, repeats: int, warmup: int = 3) -> dict:
    """Per provider: timing and peak memory, or the error it raised (one broken provider must not
    stop the run). The providers are timed interleaved: each round calls every one of them once, in
    an order that rotates from round to round, so a slow spell of the machine (the times of a small
    shared machine drift by tens of percent within a minute) slows all of them alike and the ratios
    between them hold."""
    results, live = {}, {}
    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            fn()
            results[name] = {"first_call_s": time.perf_counter() - t0}
            for _ in range(warmup):
                fn()
            live[name] = fn
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
    names = list(live)
    times = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            t0 = time.perf_counter()
            live[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    for name in names:
        p20, p50, p80 = np.percentile(times[name], [20, 50, 80])
        peak, method = peak_memory(live[name])
        results[name].update({"p20_ms": float(p20), "p50_ms": float(p50), "p80_ms": float(p80),
                              "peak_bytes": peak, "peak_method": method})
    return results


def asl_providers(backends, compile_backend):
    eager = AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05)
    compiled = torch.compile(eager, backend=compile_backend, dynamic=False)
    providers = {"eager AsymmetricLoss": eager, "compile": compiled}
    for name in backends:
        providers[f"ops {name}"] = lambda x, y, name=name: ops.asymmetric_loss(x, y, backend=name)
    return providers


def attention_providers(backends, compile_backend):
    providers = {"eager reference": reference.class_attention,
                 "compile": torch.compile(reference.class_attention, backend=compile_backend, dynamic=False)}
    for name in backends:
        providers[f"ops {name}"] = lambda q, k, v, name=name: ops.class_attention(q, k, v, backend=name)
    return providers


def device_peaks(smoke: bool) -> dict:
    """What this CPU reaches, measured in the same run: copy bandwidth (read + write of a buffer
    larger than the caches) and fp32 matmul throughput, the roofs for GB/s and TFLOP/s."""
    n = (1 << 20) if smoke else (1 << 26)  # 256 MiB of fp32 outside smoke mode
    src, dst = torch.randn(n), torch.empty(n)
    copy = percentiles_ms(lambda: dst.copy_(src), 3 if smoke else 10)
    m = 256 if smoke else 2048
    a, b = torch.randn(m, m), torch.randn(m, m)
    mm = percentiles_ms(lambda: torch.mm(a, b), 3 if smoke else 10)
    return {"copy_gb_per_s": 2 * 4 * n / copy["p50_ms"] / 1e6, "matmul_tflop_per_s": 2 * m ** 3 / mm["p50_ms"] / 1e9,
            "peaks_how": f"dst.copy_(src) of {4 * n >> 20} MiB fp32 (bytes read + written); {m}^3 fp32 torch.mm"}


# Bytes a kernel must move and FLOPs it must do (forward; "full" = forward + backward, where the
# backward of attention recomputes the scores: 3.5x the forward FLOPs, FlashAttention's convention).
def asl_cost(shape, mode):
    b, c = shape
    elems = b * c
    return {"bytes": elems * (4 + 1) + (elems * 4 if mode == "full" else 0), "flop": None}


def attention_cost(shape, mode):
    b, c, d, n = shape
    io = 4 * (c * d + 2 * b * d * n + b * c * d)
    flop = 4 * b * c * n * d
    return {"bytes": io * (2 if mode == "full" else 1), "flop": flop * (3.5 if mode == "full" else 1)}


def enhance_cost(shape, mode):
    b, c, l = shape
    io = 4 * (2 * b * c * l + c * c + b * c)
    flop = 2 * b * c * c * l
    return {"bytes": io * (2 if mode == "full" else 1), "flop": flop * (3 if mode == "full" else 1)}


def enhance_providers(backends, compile_backend):
    def eager(z, affinity, groups, gate, lam):
        return reference.progressive_enhance(z, affinity, groups, gate, lam)

    providers = {"eager reference": eager, "compile": torch.compile(eager, backend=compile_backend, dynamic=False)}
    for name in backends:
        providers[f"ops {name}"] = lambda z, r, g, w, lam, name=name: ops.progressive_enhance(z, r, g, w, lam, backend=name)
    if "cpu" in backends:  # the staged strategy the cuda backend takes for many classes, on CPU for comparison
        def staged(z, r, g, w, lam):
            with library.native_enhance_strategy("staged"):
                return ops.progressive_enhance(z, r, g, w, lam, backend="cpu")
        providers["ops cpu staged"] = staged
    return providers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke: aot_eager)")
    ap.add_argument("--out", default=None, help="folder for kernels_cpu.jsonl (default benchmarks/results)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repeats, nothing appended unless --out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 2 if args.smoke else args.repeats
    compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    avail = ops.available_backends(build=True)
    backends = [b for b in ("reference", "cpu") if avail[b][0]]
    info = meta()
    print(f"torch {info['torch']}, triton {info['triton']}, {torch.get_num_threads()} threads, commit {info['commit']}; "
          f"backends: {backends}; compile backend: {compile_backend}")
    rows = []
    peaks = device_peaks(args.smoke)
    print(f"measured peaks: copy {peaks['copy_gb_per_s']:.1f} GB/s, fp32 matmul {peaks['matmul_tflop_per_s']:.3f} TFLOP/s")

    def run(kernel, shape, providers, call, reps, cost, variant=None):
        label = kernel + "".join(f" {v}" for v in (variant or {}).values())
        for mode in ("forward", "full"):
            results = measure_side_by_side({p: (lambda fn=fn: call(fn, mode)) for p, fn in providers.items()}, reps)
            base_ms = next(iter(results.values())).get("p50_ms")  # the first provider is the eager baseline
            for provider, result in results.items():
                # "full" keeps the name the result files have always used for forward + backward
                row = {"benchmark": "kernels", "kernel": kernel, "mode": "forward+backward" if mode == "full" else mode,
                       "shape": list(shape), "dtype": "float32", "provider": provider, **result, "timing": "interleaved",
                       "threads": args.threads, **info, **peaks, **(variant or {})}
                if provider == "compile":
                    row["compile_backend"] = compile_backend
                if "p50_ms" in result:
                    work = cost(shape, mode)
                    row["gb_per_s"] = work["bytes"] / result["p50_ms"] / 1e6
                    row["bandwidth_fraction"] = row["gb_per_s"] / peaks["copy_gb_per_s"]
                    if work["flop"]:
                        row["tflop_per_s"] = work["flop"] / result["p50_ms"] / 1e9
                        row["matmul_fraction"] = row["tflop_per_s"] / peaks["matmul_tflop_per_s"]
                    row["speedup_vs_eager"] = base_ms / result["p50_ms"] if base_ms else None
                    peak = "-" if result["peak_bytes"] is None else f"{result['peak_bytes'] / 2**20:.2f} MiB"
                    roof = f"{row['gb_per_s']:7.2f} GB/s" + (f" {row['tflop_per_s']:.3f} TFLOP/s" if work["flop"] else "")
                    print(f"{label:26s} {mode:8s} {str(shape):20s} {provider:20s} p50 {result['p50_ms']:9.3f} ms "
                          f"(p20 {result['p20_ms']:.3f}, p80 {result['p80_ms']:.3f})  "
                          f"{row['speedup_vs_eager'] or float('nan'):6.2f}x vs eager  {roof}  peak {peak}")
                else:
                    print(f"{label:26s} {mode:8s} {str(shape):20s} {provider:20s} FAILED {result['error'].splitlines()[0][:200]}")
                rows.append(row)

    def forward_or_full(out_fn, inputs):
        def call(fn, mode):
            if mode == "forward":
                with torch.no_grad():
                    return out_fn(fn)
            return torch.autograd.grad(out_fn(fn).sum(), inputs)
        return call

    asl = asl_providers(backends, compile_backend)
    for b, c in ([(64, 20)] if args.smoke else [(4096, 80), (256, 1000)]):
        x = torch.randn(b, c, requires_grad=True)
        y = torch.rand(b, c) > 0.9
        run("asl", (b, c), asl, forward_or_full(lambda fn: fn(x, y), x), repeats, asl_cost)

    attention = attention_providers(backends, compile_backend)
    shapes = [(2, 20, 32, 49)] if args.smoke else [(32, 20, 128, 64), (8, 80, 256, 196), (4, 20, 768, 196)]
    for b, c, d, n in shapes:
        q = torch.randn(c, d, requires_grad=True)
        k = torch.randn(b, d, n, requires_grad=True)
        v = torch.randn(b, d, n, requires_grad=True)
        run("class_attention", (b, c, d, n), attention, forward_or_full(lambda fn: fn(q, k, v), (q, k, v)),
            max(repeats // 3, 2), attention_cost)

    enhance = enhance_providers(backends, compile_backend)
    for b, c, l in ([(2, 20, 16)] if args.smoke else [(32, 20, 128), (8, 80, 256), (32, 1000, 128)]):
        torch.manual_seed(0)
        groups = torch.arange(c) * 3 // c  # head, medium, tail thirds
        z = torch.randn(b, c, l, requires_grad=True)
        gate = torch.rand(b, c, requires_grad=True)
        lam = torch.tensor(0.7, requires_grad=True)
        # "dense": every class feeds every other (rows written before this field have this one);
        # "masked": the model's affinity under the distribution-aware mask (only earlier groups feed).
        affinities = {"dense": torch.rand(c, c) / c,
                      "masked": reference.semantic_affinity(torch.randn(c, 32), groups, mask=True, tau=0.1)}
        for kind, affinity in affinities.items():
            run("progressive_enhance", (b, c, l), enhance,
                forward_or_full(lambda fn: fn(z, affinity, groups, gate, lam), (z, gate, lam)), max(repeats // 3, 2),
                enhance_cost, {"affinity": kind})
    if not args.smoke or args.out:
        print(f"appended {len(rows)} rows to {append_rows('kernels_cpu.jsonl', rows, args.out)}")


if __name__ == "__main__":
    main()
