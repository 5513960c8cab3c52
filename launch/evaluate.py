#!/usr/bin/env python
"""Evaluate a checkpoint: ``python launch/evaluate.py --checkpoint RUN/checkpoints/best.pt [--output-dir DIR] [key=value ...]``.

The command line is ``cssfe.commands.evaluate`` (also ``cssfe evaluate``)."""
import sys

from cssfe.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
