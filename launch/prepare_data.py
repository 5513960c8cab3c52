#!/usr/bin/env python
"""Check a dataset and write or verify its split files:
``python launch/prepare_data.py --dataset lt-voc --root DIR [--config FILE] [data.key=value ...]``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cssfe.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
