"""Command line of ``launch/train.py``: parse arguments, build the config, call ``train``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import List, Optional

from cssfe.config import ConfigError, load_config
from cssfe.logs import PACKAGE_LOGGER, add_verbosity_options, chosen_level, setup_logging

RESUME_MODES = ("last", "auto")  # --resume: the run must have a checkpoint; --resume auto: if it has one


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a CSSFE (or baseline) multi-label classifier. Without arguments: the default "
        "configuration on the bundled long-tailed digits dataset.",
        epilog="Overrides are key=value with dotted keys, e.g. model.head=baseline optim.epochs=5 loss.name=db, "
        "anywhere among the options.",
    )
    p.add_argument("--config", help="YAML config file (default: built-in defaults, configs/default.yaml)")
    p.add_argument("--output-dir", help="where the run is written (default: runs/<time>-<head>-<backbone>)")
    p.add_argument("--resume", nargs="?", const="last", choices=RESUME_MODES, metavar="auto",
                   help="continue the run in --output-dir from its newest complete checkpoint; --resume auto: "
                        "continue it if it has one, else start it (for a job that the scheduler requeues)")
    # set by the deepspeed launcher; LOCAL_RANK is used
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_verbosity_options(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    argv = list(sys.argv[1:] if argv is None else argv)
    # a bare --resume takes no value: the key=value override after it stays an override
    argv = [f"--resume={RESUME_MODES[0]}" if a == "--resume" and (argv[i + 1:] or [None])[0] not in RESUME_MODES else a
            for i, a in enumerate(argv)]
    args = p.parse_intermixed_args(argv)  # key=value overrides on both sides of an option
    args.resume = {None: False, "last": True}.get(args.resume, args.resume)  # False, True or "auto": train()'s resume
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    config_path = args.config
    if args.resume and config_path is None:
        if not args.output_dir:
            print("error: --resume needs --output-dir (the run to continue)", file=sys.stderr)
            return 2
        saved = os.path.join(args.output_dir, "config.yaml")
        if args.resume is True or os.path.isfile(saved):  # auto without a run yet: the defaults
            config_path = saved
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.quiet:
        overrides.append("progress=false")
    try:
        cfg = load_config(config_path, overrides)
    except (ConfigError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.output_dir and not any(o.startswith("output_dir=") for o in args.overrides):
        cfg.output_dir = os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.head}-{cfg.model.backbone}")
    setup_logging(chosen_level(args, cfg.logging.log_level))
    # torch and the models load only after the config is good
    from tqdm.contrib.logging import logging_redirect_tqdm

    from cssfe.engine.distributed import leaving_process_group
    from cssfe.engine.signals import TrainingInterrupted
    from cssfe.engine.train import TrainingDiverged, train

    try:
        # reports between progress bars; the process group is left before the interpreter exits
        with logging_redirect_tqdm([logging.getLogger(PACKAGE_LOGGER)]), leaving_process_group():
            train(cfg, resume=args.resume)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return 128 + exc.signum
    return 0
