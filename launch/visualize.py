#!/usr/bin/env python
"""Class activation maps and Grad-CAM: ``python launch/visualize.py --checkpoint CKPT [--images IMG ...] [--output-dir DIR]``.

The command line is ``cssfe.commands.visualize`` (also ``cssfe visualize``)."""
import sys

from cssfe.commands.visualize import main

if __name__ == "__main__":
    sys.exit(main())
