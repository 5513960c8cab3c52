"""Training-step throughput: images/s of forward + loss + backward + AdamW step, and the share of
the CSSFE head + loss in it, per backbone x head. Appends one row (``benchmarks.rows``: op
``<backbone>/<head>``, provider = the kernels setting, dtype = the autocast precision, variant
``compile <mode>`` when compiled) per case to ``benchmarks/results/train_step.jsonl``; steps are timed
by ``benchmarks.harness`` (CUDA events on a GPU, no L2 flush: a step is not a cold call).

    python -m benchmarks.train_step                       # smallcnn at 64 px, both heads
    python -m benchmarks.train_step --backbone resnet50 --image-size 224 --batch-size 8
    python -m benchmarks.train_step --smoke               # tiny, for CI
    python -m benchmarks.train_step --backbone resnet50 --image-size 448 --precision bf16 \
        --kernels auto,reference --compile off,default,reduce-overhead --out DIR
                                                          # on a GPU; rows go to DIR/train_step.jsonl

``--compile``: the training config's ``compile`` / ``compile_mode`` settings (``off``: eager); the
model and the loss are compiled in place as training compiles them (cssfe/engine/compiling.py).
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import numpy as np
import torch

from benchmarks.environment import meta
from benchmarks.harness import Harness
from benchmarks.rows import append_rows, row, timed_fields
from cssfe import ops
from cssfe.engine import compiling
from cssfe.losses import build_loss
from cssfe.models.backbones import build_backbone
from cssfe.models.heads import HEADS
from cssfe.models.model import MultiLabelClassifier

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_case(backbone_name: str, head_name: str, image_size: int, batch: int, classes: int, device, warmup: int,
               repeats: int, precision: str = "fp32", kernels: str = "auto", compile_mode: str = "off") -> dict:
    torch.manual_seed(0)
    groups = np.repeat([0, 1, 2], [classes // 3, classes // 3, classes - 2 * (classes // 3)])
    backbone = build_backbone(backbone_name, image_size=image_size)
    embeddings = torch.nn.functional.normalize(torch.randn(classes, 384), dim=1)
    options = {"dim": 128} if head_name == "cssfe" else {}
    head = HEADS.build(head_name, backbone.out_channels, classes, embeddings, groups, **options)
    model = MultiLabelClassifier(backbone, head).to(device).train()
    freq = np.maximum(1, (1000 * np.linspace(1, 0.01, classes)).astype(int))
    loss_fn = build_loss("asl", freq, 2000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if compile_mode != "off":  # after the optimizer took the parameters: compiling in place keeps them
        torch._dynamo.reset()
        compiling.compile_for_training(model, None, loss_fn, compile_mode)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = (torch.rand(batch, classes, device=device) < 0.1).float()

    dtype = PRECISIONS[precision]

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def step():
        with autocast():
            out = model(x)
        loss = loss_fn(out["logits"], y)
        if "logits0" in out and out["logits0"] is not out["logits"]:
            loss = loss + 0.5 * loss_fn(out["logits0"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.no_grad():
        feats = backbone(x)

    def head_step():
        f = feats.detach().requires_grad_(True)
        with autocast():
            out = head(f)
        loss = loss_fn(out["logits"], y)
        if "logits0" in out and out["logits0"] is not out["logits"]:
            loss = loss + 0.5 * loss_fn(out["logits0"], y)
        loss.backward()

    harness = Harness(device, warmup=warmup, reps=repeats)
    with ops.use_backend(kernels):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _, first_step_s = harness.first_call(step)  # the first step alone: with compile, the compilation time
        full = harness.time({"step": step}, flush=False)["step"]
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        part = harness.time({"head": head_step}, flush=False)["head"] if compile_mode == "off" else None
    for timed in (full, part):
        if timed and "error" in timed:
            raise RuntimeError(timed["error"])
    shape = {"image_size": image_size, "batch": batch, "classes": classes}
    return row("train_step", f"{backbone_name}/{head_name}", "train step", kernels, precision, shape,
               "" if compile_mode == "off" else f"compile {compile_mode}",
               **timed_fields(full, None, peak), images_per_s=batch / full["p50_ms"] * 1e3,
               # the head + loss alone, eager only (the compiled model is one graph)
               head_loss_p50_ms=part["p50_ms"] if part else None,
               head_loss_share=part["p50_ms"] / full["p50_ms"] if part else None,
               first_step_s=first_step_s, backbone=backbone_name, head=head_name, compile=compile_mode)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="smallcnn")
    p.add_argument("--heads", default="baseline,cssfe")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="autocast dtype of the step")
    p.add_argument("--kernels", default="auto", help="comma-separated kernel backends to compare (auto, reference, cuda, triton, cpu)")
    p.add_argument("--compile", default="off",
                   help="comma-separated compile settings: off, default, max-autotune, reduce-overhead")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; aot_eager: no codegen)")
    p.add_argument("--out", default=None, help="folder for train_step.jsonl (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few repeats; results are not appended")
    args = p.parse_args(argv)
    if args.smoke:
        args.image_size, args.batch_size, args.warmup, args.repeats = 32, 2, 1, 2
    device = torch.device(args.device)
    info = meta()
    rows = []
    failed = False
    if args.compile_backend:
        compiling.BACKEND = args.compile_backend
    modes = args.compile.split(",")
    for mode in modes:
        if mode != "off" and mode not in compiling.MODES:
            p.error(f"--compile: unknown setting {mode!r}; choose from off, {', '.join(compiling.MODES)}")
    cases = [(c, h, k) for c in modes for h in args.heads.split(",") for k in args.kernels.split(",")]
    for kernels in {k for _, _, k in cases}:
        if kernels not in ops.dispatch.CHOICES:
            p.error(f"--kernels: unknown backend {kernels!r}; choose from {', '.join(ops.dispatch.CHOICES)}")
    first_kernels = args.kernels.split(",")[0]
    # Under a time limit the cheap rows come first: every eager case, then each compile setting with the
    # first kernels named, then the other kernels compiled (a compiled case spends most of its time compiling).
    cases.sort(key=lambda c: 0 if c[0] == "off" else 1 if c[2] == first_kernels else 2)
    for mode, head, kernels in cases:
        if head != "cssfe" and kernels != first_kernels:
            continue  # the baseline head uses no CSSFE op: one row per compile setting is enough
        try:
            result = {**bench_case(args.backbone, head, args.image_size, args.batch_size, args.classes, device, args.warmup,
                                args.repeats, args.precision, kernels, mode), **info}
        except Exception as exc:  # one broken backend must not hide the other rows
            print(f"{args.backbone:>9} {head:>8} {kernels:>9} compile={mode}: FAILED {type(exc).__name__}: {exc}")
            failed = True
            continue
        rows.append(result)
        share = "" if result["head_loss_share"] is None else f", head+loss {100 * result['head_loss_share']:.1f} %"
        print(
            f"{result['backbone']:>9} {result['head']:>8} {kernels:>9} compile={mode} {args.precision} {args.image_size}px "
            f"b{args.batch_size}: {result['images_per_s']:8.1f} img/s (step p50 {result['p50_ms']:.1f} ms, "
            f"p20-p80 {result['p20_ms']:.1f}-{result['p80_ms']:.1f}; first step {result['first_step_s']:.1f} s)"
            f"{share}", flush=True)
        if not args.smoke or args.out:  # row by row: a run stopped by a time limit keeps the rows it has
            append_rows("train_step.jsonl", [result], args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
