#!/usr/bin/env python
"""Train CSSFE: ``python launch/train.py [--config FILE] [--output-dir DIR] [--resume] [key=value ...]``."""
import sys

from cssfe.engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
