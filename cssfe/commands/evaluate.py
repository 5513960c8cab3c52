"""Evaluate a checkpoint: ``cssfe evaluate --checkpoint RUN/checkpoints/best.pt [--output-dir DIR] [key=value ...]``
(or ``python launch/evaluate.py``).

Prints total / head / medium / tail mAP and F1 (and the pointing game where boxes exist); writes
metrics.json, per_class_ap.csv and per_class_ap.png (default: RUN/eval/).
"""
import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from cssfe.logs import add_verbosity_options

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output-dir")
    p.add_argument("--device", default="cpu")
    add_verbosity_options(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=/path/to/data (anywhere among the options)")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cssfe.logs import chosen_level, setup_logging

    setup_logging(chosen_level(args))
    from cssfe.engine.evaluation import evaluate_checkpoint

    try:
        evaluate_checkpoint(args.checkpoint, args.output_dir, args.overrides, device=args.device, progress=not args.quiet)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
