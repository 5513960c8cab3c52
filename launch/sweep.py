#!/usr/bin/env python
"""Ablation sweeps with Ray Tune: ``python launch/sweep.py --study NAME [options] [key=value ...]``
(see ``--help`` and the README section "Ablation sweeps")."""
import sys

from cssfe.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
