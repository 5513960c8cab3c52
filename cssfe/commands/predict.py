"""Predict: ``cssfe predict --checkpoint CKPT IMAGE_OR_DIR ...`` (or ``python launch/predict.py``) writes one
JSON line per image ({"file", "labels", "scores"}) to stdout (or --output); unreadable files are
reported on stderr and skipped, and the exit code is 1 if any failed.
"""
import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--output", help="JSONL file (default: stdout)")
    p.add_argument("--device", default="cpu")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="anywhere among the options")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cssfe.engine.inference import load_trained
    from cssfe.engine.prediction import predict_files

    try:
        trained = load_trained(args.checkpoint, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        errors = predict_files(trained, args.inputs, out, threshold=args.threshold, device=args.device)
    finally:
        if args.output:
            out.close()
    if errors:
        print(f"{len(errors)} file(s) could not be read", file=sys.stderr)
    return 1 if errors else 0
