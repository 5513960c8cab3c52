"""Class activation maps and Grad-CAM: ``cssfe visualize --checkpoint CKPT [--images IMG ...] [--output-dir DIR]``
(or ``python launch/visualize.py``).

Without --images, draws a head, a medium and a tail example of the checkpoint's test set. One PNG per
image: the first-pass map A, the refined map A' with and without the distribution-aware mask, Grad-CAM
(a CPRFL head: each prompt's attention over the image and Grad-CAM; the baseline head: Grad-CAM).
"""
import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", nargs="*")
    p.add_argument("--output-dir", help="default: RUN/visualize/")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cssfe.cache import default_cache_dir
    from cssfe.data import build_data
    from cssfe.engine.inference import load_trained
    from cssfe.explain.visualize import visualize

    try:
        trained = load_trained(args.checkpoint)
        missing = [p for p in args.images or [] if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"image(s) not found: {', '.join(missing)}")
        dataset = None
        if not args.images:
            dataset = build_data(trained.cfg.data, trained.cfg.cache_dir or default_cache_dir()).test
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.output_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint))), "visualize")
    for path in visualize(trained, out, args.images, dataset):
        print(f"wrote {path}")
    return 0
