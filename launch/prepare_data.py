#!/usr/bin/env python
"""Check a dataset and write or verify its split files:
``python launch/prepare_data.py --dataset lt-voc --root DIR [--config FILE] [data.key=value ...]``."""
import sys

from cssfe.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
