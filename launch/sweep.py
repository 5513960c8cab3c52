#!/usr/bin/env python
"""Ablation sweeps with Ray Tune: ``python launch/sweep.py --study NAME [options] [key=value ...]``
(see ``--help`` and the README section "Ablation sweeps")."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cssfe.sweep.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
