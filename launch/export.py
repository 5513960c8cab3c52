#!/usr/bin/env python
"""Export a checkpoint for inference: ``python launch/export.py --checkpoint CKPT --output model.pt2``.

The command line is ``cssfe.commands.export`` (also ``cssfe export``)."""
import sys

from cssfe.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
