"""Kernel micro-benchmarks on CPU: median wall time of forward+backward per backend.

    python benchmarks/kernels.py [--threads 2] [--repeats 30] [--smoke]

ASL at B x C = 4096 x 80 and 256 x 1000 (eager = cssfe.losses.AsymmetricLoss with autograd,
against the fused ``cpu`` extension and the ``reference`` op); class attention at a head-sized
shape. Prints medians; nothing is asserted (the machine may be shared).
"""
import argparse
import statistics
import time

import torch

import cssfe.ops as ops
from cssfe.losses import AsymmetricLoss


def median_ms(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repeats (for tests)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.smoke else args.repeats
    avail = ops.available_backends(build=True)
    backends = [b for b in ("reference", "cpu") if avail[b][0]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; backends: {backends}")

    eager = AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05)
    for b, c in ([(64, 20)] if args.smoke else [(4096, 80), (256, 1000)]):
        x = torch.randn(b, c, requires_grad=True)
        y = torch.rand(b, c) > 0.9

        def run_eager():
            (g,) = torch.autograd.grad(eager(x, y), x)

        res = {"eager AsymmetricLoss": median_ms(run_eager, repeats)}
        for name in backends:
            def run(name=name):
                (g,) = torch.autograd.grad(ops.asymmetric_loss(x, y, backend=name), x)
            res[f"ops {name}"] = median_ms(run, repeats)
        base = res["eager AsymmetricLoss"]
        for k, v in res.items():
            print(f"ASL fwd+bwd {b}x{c} {k:24s} {v:8.3f} ms  ({base / v:5.2f}x vs eager)")

    shapes = [(2, 20, 32, 49)] if args.smoke else [(8, 80, 256, 196), (4, 20, 768, 196)]
    for b, c, d, n in shapes:
        q = torch.randn(c, d, requires_grad=True)
        k = torch.randn(b, d, n, requires_grad=True)
        v = torch.randn(b, d, n, requires_grad=True)
        res = {}
        for name in backends:
            def run(name=name):
                z = ops.class_attention(q, k, v, backend=name)
                torch.autograd.grad(z.sum(), (q, k, v))
            res[name] = median_ms(run, max(repeats // 3, 2))
        for k_, v_ in res.items():
            print(f"class_attention fwd+bwd B={b} C={c} d={d} N={n} {k_:10s} {v_:8.3f} ms")


if __name__ == "__main__":
    main()
