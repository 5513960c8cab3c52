"""Triton backend cases, run by test_triton.py in a subprocess: with TRITON_INTERPRET=1 on CPU
tensors, or with ``--device cuda`` on a GPU; fp32, fp16 and bf16 inputs and outputs in both (the
interpreter multiplies half precision in fp32, its bf16 ``tl.dot`` being wrong: the GPU run covers
the half-precision products). Prints ALL OK when every case passes."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_cases as kc  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 for CPU tensors")
    kc.DEVICE = args.device
    kc.RECORD = []
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # poison: unwritten outputs are NaN
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    t0 = time.time()
    n = 0
    from cssfe.ops.backends.triton import attention, attention_gemm

    for dtype in dtypes:
        # the default strategy per width (triton/attention.py strategy_for): flash up to d = 128, GEMM above
        wide = [(2, 20, 256, 197), (2, 7, 512, 49), (1, 5, 768, 196)] if args.device == "cuda" else [(2, 7, 160, 49)]
        for i, shape in enumerate(kc.ATTENTION_SHAPES + wide):
            kc.check_attention("triton", shape, dtype, batched_q=i % 2 == 1, seed=i)
            n += 1
        # each strategy at every width: GEMM on the narrow shapes, flash on the wide ones it fits
        # (fp32 at d > 512 does not: attention.py MAX_FP32_D)
        with attention.strategy("gemm"):
            for i, shape in enumerate(kc.ATTENTION_SHAPES):
                kc.check_attention("triton", shape, dtype, batched_q=i % 2 == 0, seed=10 + i)
                n += 1
            # several chunks of images, uneven, over 5 images: per image C*N*(4+4) bytes forward and
            # C*N*2*(4+4) backward at fp32, plus C*d*4 with shared q (attention_gemm.py), so this
            # bound gives 4 images per chunk forward and 2 backward
            c, d, n_pos = 7, 24, 49
            with attention_gemm.scratch_bytes(2 * (16 * c * n_pos + 4 * c * d)):
                for j, batched in enumerate((False, True)):
                    kc.check_attention("triton", (5, c, d, n_pos), dtype, batched_q=batched, seed=20 + j)
                    n += 1
            if dtype == torch.float32:  # the products keep the inputs' dtype under the caller's autocast
                with torch.autocast(args.device, dtype=torch.bfloat16):
                    kc.check_attention("triton", (2, 7, 64, 49), dtype, seed=25)
                    n += 1
        with attention.strategy("flash"):
            for i, shape in enumerate(wide):
                if dtype == torch.float32 and shape[2] > attention.MAX_FP32_D:
                    continue
                kc.check_attention("triton", shape, dtype, batched_q=i % 2 == 0, seed=30 + i)
                n += 1
        # 300: several blocks of classes; L = 520: several programs per image (in the interpreter too),
        # whose shares of the gate gradient are summed afterwards
        for i, shape in enumerate(kc.ENHANCE_SHAPES + [(2, 300, 17), (2, 7, 520)]):
            for mask in (True, False):  # masked: each stage's sources end where its group starts
                kc.check_enhance("triton", shape, dtype, mask=mask, seed=i)
                n += 1
        for i, shape in enumerate(kc.ASL_SHAPES):
            kc.check_asl("triton", shape, dtype, **kc.ASL_VARIANTS[i % len(kc.ASL_VARIANTS)], seed=i)
            n += 1
        for variant in kc.ASL_VARIANTS:
            kc.check_asl("triton", (37, 20), dtype, **variant)
            n += 1
        for soft in (False, True):
            kc.check_asl_nan("triton", dtype, soft)
            n += 1
        # blocks of 0/1 targets (binary form only) before blocks that also hold soft ones
        kc.check_asl("triton", (61, 100), dtype, target_dtype=torch.float32, soft_from=5000, gammas=(1.0, 4.0), seed=5)
        n += 1
        for size in kc.ASL_SCALE_SIZES:  # the backward's in-place scaling
            for i, scale in enumerate(kc.ASL_SCALES):
                kc.check_asl_scale("triton", *size, dtype, scale, seed=i)
                n += 1
    # the half-precision checks reject wrong outputs and gradients here too (test_kernels.py has the why)
    for dtype in (torch.float16, torch.bfloat16):
        for op, check, names, kwargs in kc.MUTATION_CASES:
            for name in names:
                for mutation in kc.MUTATIONS:
                    try:
                        check("triton", dtype=dtype, mutate=kc.mutated(name, mutation), **kwargs)
                    except AssertionError as e:
                        assert f" {name}" in str(e), f"{op} {name} {mutation}: failed on another value: {e}"
                    else:
                        raise AssertionError(f"triton {op} {dtype}: {mutation} {name} passed its check")
                    n += 1
    worst = max(kc.RECORD, key=lambda r: max(r[1:]))
    print(f"largest half-precision error over the eager op's (or one rounding): {max(worst[1:]):.2f} ({worst[0]})")
    for i, variant in enumerate(kc.ASL_VARIANTS):  # fp64 logits (fp32 arithmetic, fp64 loss and gradient)
        kc.check_asl("triton", (37, 20), torch.float64, **variant, seed=i)
        n += 1
    if args.device == "cuda":  # what the interpreter cannot show: atomics' order, graph capture
        torch.use_deterministic_algorithms(False)  # as in training
        kc.check_enhance_reproducible("triton")
        for strategy in ("flash", "gemm"):
            with attention.strategy(strategy):
                kc.check_cuda_graph("triton")
        n += 3
    # opcheck on the triton backend too: every operator, forward and backward (both attention strategies)
    for strategy in ("flash", "gemm"):
        with attention.strategy(strategy):
            for op, op_args in kc.opcheck_samples("triton", args.device):
                torch.library.opcheck(op, op_args)
    print(f"{n} cases + opcheck in {time.time() - t0:.1f}s")
    print("ALL OK")


if __name__ == "__main__":
    main()
