#!/usr/bin/env python
"""Predict: ``python launch/predict.py --checkpoint CKPT IMAGE_OR_DIR ...`` writes one JSON line per
image ({"file", "labels", "scores"}) to stdout (or --output); unreadable files are reported on stderr
and skipped, and the exit code is 1 if any failed.

The command line is ``cssfe.commands.predict`` (also ``cssfe predict``)."""
import sys

from cssfe.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
