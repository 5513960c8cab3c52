"""The ``cssfe`` command: ``cssfe COMMAND [ARGS ...]`` (or ``python -m cssfe COMMAND ...``).

Every command is a ``main(argv) -> exit code`` in the package, named in ``COMMANDS`` as
``"module:function"`` and imported only when it runs (``cssfe --help`` loads neither torch nor
Ray). The scripts in ``launch/`` call the same functions; launchers that need a script file
(``deepspeed``, ``torchrun``) start ``launch/train.py``.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

PROG = "cssfe"


class Command(NamedTuple):
    target: str  # "module:function", a main(argv) that returns the exit code
    help: str


COMMANDS: Dict[str, Command] = {
    "train": Command("cssfe.engine.cli:main", "train a model (launchers such as deepspeed start launch/train.py)"),
    "evaluate": Command("cssfe.commands.evaluate:main", "metrics of a checkpoint on its test set, per-class AP, pointing game"),
    "predict": Command("cssfe.commands.predict:main", "labels and scores of images, one JSON line each"),
    "visualize": Command("cssfe.commands.visualize:main", "class activation maps and Grad-CAM of a checkpoint"),
    "export": Command("cssfe.commands.export:main", "a torch.export artifact of a checkpoint, checked against it"),
    "prepare-data": Command("cssfe.data.prepare:main", "check a dataset and write or verify its split files"),
    "sweep": Command("cssfe.sweep.cli:main", "an ablation study with Ray Tune, then its table and chart"),
    "reshard": Command("cssfe.engine.reshard:main", "make a DeepSpeed run resumable with another number of ranks"),
    "consolidate": Command("cssfe.engine.consolidate:main", "one standalone checkpoint from a DeepSpeed run"),
    # the benchmark suite (benchmarks/) is not installed with the package: these run from a checkout
    "bench-kernels": Command("benchmarks.kernels:main", "time each op's providers on this machine (CPU suite)"),
    "bench-train-step": Command("benchmarks.train_step:main", "time and measure one training step per kernels setting"),
    "bench-profile-ops": Command("benchmarks.profile_ops:main", "profile one op's kernels with the torch profiler"),
    "bench-distributed": Command("benchmarks.distributed:main", "peak memory and step time per ZeRO stage"),
    "bench-gpu-check": Command("benchmarks.gpu_check.cli:main", "the GPU acceptance run (or its CPU dry run)"),
    "bench-goals": Command("benchmarks.gpu_goals:main", "judge a GPU check's rows against the goals"),
    "bench-compare": Command("benchmarks.compare:main", "compare benchmark result files side by side"),
    "bench-plot": Command("benchmarks.plot:main", "charts of benchmark result files"),
}
CHECKOUT_ONLY = "benchmarks"  # the top-level package of the commands above


def resolve(name: str) -> Callable[[List[str]], int]:
    """The ``main`` of command ``name`` (imports its module)."""
    module, _, function = COMMANDS[name].target.partition(":")
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != CHECKOUT_ONLY:
            raise
        raise SystemExit(f"{PROG} {name}: the benchmark suite runs from a checkout of the repository: in its root, "
                         f"run 'python -m {PROG} {name} ...' (or 'python -m {module} ...')") from None
    return getattr(loaded, function)


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items())
    return (f"usage: {PROG} COMMAND [ARGS ...]\n\ncommands:\n{rows}\n\n"
            f"'{PROG} COMMAND --help' shows the options of a command; '{PROG} --version' the version.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help"):
        print(usage())
        return 0
    if name == "--version":
        from cssfe import __version__

        print(f"{PROG} {__version__}")
        return 0
    if name not in COMMANDS:
        print(f"{PROG}: unknown command {name!r}; choose one of: {', '.join(COMMANDS)} ('{PROG} --help')", file=sys.stderr)
        return 2
    command = resolve(name)
    saved = sys.argv
    sys.argv = [f"{PROG} {name}", *rest]  # argparse names the program after argv[0]: "usage: cssfe train ..."
    try:
        return command(rest)
    finally:
        sys.argv = saved
