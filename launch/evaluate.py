#!/usr/bin/env python
"""Evaluate a checkpoint: ``python launch/evaluate.py --checkpoint RUN/checkpoints/best.pt [--output-dir DIR] [key=value ...]``.

Prints total / head / medium / tail mAP and F1 (and the pointing game where boxes exist); writes
metrics.json, per_class_ap.csv and per_class_ap.png (default: RUN/eval/).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output-dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=/path/to/data")
    args = p.parse_args()
    from cssfe.engine.evaluation import evaluate_checkpoint

    try:
        evaluate_checkpoint(args.checkpoint, args.output_dir, args.overrides, device=args.device)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
