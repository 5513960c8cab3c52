"""Tables of runs: mean ± std over seeds of total / head / medium / tail mAP, as Markdown.

    python -m cssfe.report NAME=RUN_DIR[,RUN_DIR...] ...
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Sequence

import numpy as np

COLUMNS = ("total", "head", "medium", "tail")


def load_runs(dirs: Sequence[str], which: str = "final", key: str = "mAP") -> np.ndarray:
    """[runs, 4] array of one mAP block (``key``: mAP or first_pass_mAP) of each run's metrics.json."""
    rows = []
    for d in dirs:
        path = os.path.join(d, "metrics.json")
        with open(path) as f:
            block = json.load(f)[which][key]
        rows.append([np.nan if block[c] is None else block[c] for c in COLUMNS])
    return np.asarray(rows, dtype=np.float64)


def markdown_table(variants: Dict[str, np.ndarray]) -> str:
    """One row per variant: mean ± sample std over its runs (n in the last column)."""
    lines = ["| variant | " + " | ".join(c.capitalize() for c in COLUMNS) + " | n |", "|---|" + "---|" * (len(COLUMNS) + 1)]
    for name, values in variants.items():
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1) if len(values) > 1 else np.zeros(len(COLUMNS))
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in zip(mean, std)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(values)} |")
    return "\n".join(lines)


def main(argv: List[str] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    variants = {}
    for item in argv:
        name, _, dirs = item.partition("=")
        variants[name] = load_runs(dirs.split(","))
    print(markdown_table(variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
