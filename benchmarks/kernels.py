"""Kernel micro-benchmarks on CPU: forward+backward time per provider, medians with p20/p80.

    python benchmarks/kernels.py [--threads 2] [--repeats 30] [--smoke]

ASL at B x C = 4096 x 80 and 256 x 1000: eager ``cssfe.losses.AsymmetricLoss`` with autograd against
the ``reference`` and fused ``cpu`` ops. Class attention at head-sized shapes: the eager plain
PyTorch definition (``cssfe.ops.reference.class_attention``) against the ops. Appends one JSON row
per measurement to ``benchmarks/results/kernels_cpu.jsonl`` (not in smoke mode). Nothing is asserted.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cssfe.ops as ops  # noqa: E402
from _common import append_rows, meta, percentiles_ms  # noqa: E402
from cssfe.losses import AsymmetricLoss  # noqa: E402
from cssfe.ops import reference  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repeats, nothing appended")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 2 if args.smoke else args.repeats
    avail = ops.available_backends(build=True)
    backends = [b for b in ("reference", "cpu") if avail[b][0]]
    info = meta()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, commit {info['commit']}; backends: {backends}")
    rows = []

    def record(kernel, shape, provider, timing, base):
        rows.append({"kernel": kernel, "mode": "forward+backward", "shape": shape, "provider": provider, **timing,
                     "speedup_vs_eager": base / timing["p50_ms"], "threads": args.threads, **info})
        print(f"{kernel:16s} {str(shape):22s} {provider:22s} p50 {timing['p50_ms']:9.3f} ms "
              f"(p20 {timing['p20_ms']:.3f}, p80 {timing['p80_ms']:.3f})  {base / timing['p50_ms']:6.2f}x vs eager")

    eager_asl = AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05)
    for b, c in ([(64, 20)] if args.smoke else [(4096, 80), (256, 1000)]):
        x = torch.randn(b, c, requires_grad=True)
        y = torch.rand(b, c) > 0.9
        base = percentiles_ms(lambda: torch.autograd.grad(eager_asl(x, y), x), repeats)
        record("asl", [b, c], "eager AsymmetricLoss", base, base["p50_ms"])
        for name in backends:
            t = percentiles_ms(lambda name=name: torch.autograd.grad(ops.asymmetric_loss(x, y, backend=name), x), repeats)
            record("asl", [b, c], f"ops {name}", t, base["p50_ms"])

    shapes = [(2, 20, 32, 49)] if args.smoke else [(32, 20, 128, 64), (8, 80, 256, 196), (4, 20, 768, 196)]
    for b, c, d, n in shapes:
        q = torch.randn(c, d, requires_grad=True)
        k = torch.randn(b, d, n, requires_grad=True)
        v = torch.randn(b, d, n, requires_grad=True)
        reps = max(repeats // 3, 2)
        base = percentiles_ms(lambda: torch.autograd.grad(reference.class_attention(q, k, v).sum(), (q, k, v)), reps)
        record("class_attention", [b, c, d, n], "eager reference", base, base["p50_ms"])
        for name in backends:
            t = percentiles_ms(lambda name=name: torch.autograd.grad(ops.class_attention(q, k, v, backend=name).sum(), (q, k, v)), reps)
            record("class_attention", [b, c, d, n], f"ops {name}", t, base["p50_ms"])
    if not args.smoke:
        print(f"appended {len(rows)} rows to {append_rows('kernels_cpu.jsonl', rows)}")


if __name__ == "__main__":
    main()
