"""Options of the GPU check and its entry point.

    bash benchmarks/run_gpu_check.sh OUT_DIR            # on the GPU machine (sets MAX_JOBS, caches, timeout)
    python -m benchmarks.gpu_check --out DIR [--quick] [--budget-s 455]
    python -m benchmarks.gpu_check --out DIR --cpu-dry-run   # same code path on CPU, tiny sizes

Writes ``DIR/gpu_check.json`` (one object, rewritten after every step, so a kill leaves the latest
state; its benchmark measurements are ``rows`` of the suite's schema, ``benchmarks/rows.py``),
``DIR/summary.md`` and ``DIR/logs/*.log``, and prints the summary. Everything is recorded, nothing
is allowed to stop the rest: each step runs in a worker subprocess or a pytest subprocess with a
per-task watchdog and the global ``--budget-s``; a worker that dies (segfault, sticky CUDA error,
hang) is restarted on the tasks it had not finished, and a provider that kills two workers is skipped.
"""
from __future__ import annotations

import argparse
import sys

from benchmarks.gpu_check.orchestrate import Orchestrator


def _parity_backends(text):
    """--parity-backends: a comma-separated subset of triton, cuda."""
    names = tuple(n for n in text.split(",") if n)
    if not names or not set(names) <= {"triton", "cuda"}:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of triton,cuda, got {text!r}")
    return names


def _class_counts(text):
    """--enhance-classes: comma-separated positive integers."""
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return counts


def parser() -> argparse.ArgumentParser:
    # run as a package (python -m), argv[0] is its __main__.py: name the command instead
    prog = "python -m benchmarks.gpu_check" if sys.argv[0].endswith("__main__.py") else None
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (gpu_check.json, summary.md, logs/)")
    p.add_argument("--quick", action="store_true", help="fewer repeats, main grid shapes only, no compile_autograd")
    p.add_argument("--parity-backends", type=_parity_backends, default=("triton", "cuda"),
                   help="comma-separated backends whose parity tests run: triton, cuda (default both; cuda "
                        "means the extension's kernels, C++ ones in the dry run)")
    p.add_argument("--enhance-classes", type=_class_counts, default=None,
                   help="comma-separated class counts for the enhance family (default: the main case's)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="same code path on CPU: tiny shapes, backends reference + cpu (+ triton with TRITON_INTERPRET=1)")
    p.add_argument("--budget-s", type=float, default=None, help="total time budget (default 455 on GPU, 700 dry run)")
    p.add_argument("--build-timeout-s", type=float, default=None,
                   help="cap on the extension build (default: the budget less 30 s, at most 300)")
    p.add_argument("--families", default="asl,attention,enhance,blocks,grid",
                   help="benchmark families to run (blocks: Triton attention block-size sweep; enhance: the "
                        "progressive enhancement alone)")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers to benchmark (default all); without cuda/cpu the extension is not built")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; aot_eager dry run)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity checks")
    p.add_argument("--no-pytest", action="store_true", help="direct kernel_cases checks instead of pytest")
    p.add_argument("--no-prewarm", action="store_true", help="no cache warm-up beside the build")
    p.add_argument("--task-timeout-s", type=float, default=None,
                   help="watchdog per benchmark task (default 300 s for torch.compile, 150 s otherwise)")
    p.add_argument("--train-step-s", type=float, default=None,
                   help="cap on the ResNet50 training-step benchmark (default 170 s on a GPU, 120 dry run)")
    p.add_argument("--deepspeed-s", type=float, default=None,
                   help="cap on the DeepSpeed run, killed and resumed (default 110 s on a GPU, 330 dry run: three "
                        "launches of CPU ranks)")
    p.add_argument("--no-train-step", action="store_true", help="skip the training-step benchmark")
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed run")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    dry = args.cpu_dry_run
    if args.budget_s is None:
        args.budget_s = 700.0 if dry else 455.0
    if args.train_step_s is None:
        args.train_step_s = 120.0 if dry else 170.0
    if args.deepspeed_s is None:
        args.deepspeed_s = 330.0 if dry else 110.0
    if args.build_timeout_s is None:
        # nothing else of the CUDA backend runs without the build: it may take all but 30 s
        args.build_timeout_s = min(300.0, max(60.0, args.budget_s - 30))
    orch = Orchestrator(args)
    try:
        return orch.run()
    except Exception as exc:  # last resort: the JSON must exist
        orch.error("main", exc)
        orch.finish(status="crashed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
