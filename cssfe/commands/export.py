"""Export a checkpoint for inference: ``cssfe export --checkpoint CKPT --output model.pt2`` (or ``python launch/export.py``).

The artifact maps images [B, 3, H, W] (normalised as in training) to class probabilities; it is
checked to match the original model. Load it with ``torch.export.load(path).module()``.
"""
import argparse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cssfe.engine.export import export_model
    from cssfe.engine.inference import load_trained

    diff = export_model(load_trained(args.checkpoint), args.output)
    print(f"wrote {args.output} (max score difference to the original: {diff:.2e})")
    return 0
