#!/usr/bin/env python
"""Train CSSFE: ``python launch/train.py [--config FILE] [--output-dir DIR] [--resume] [key=value ...]``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cssfe.engine.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
