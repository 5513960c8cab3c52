"""Tables of runs: mean ± std over seeds of total / head / medium / tail mAP, as Markdown, and a
grouped bar chart.

    python -m cssfe.report [--png CHART.png] NAME=RUN_DIR[,RUN_DIR...] ...
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Dict, List, Optional, Sequence

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


def load_left_out(dirs: Sequence[str], which: str = "final") -> Dict[str, List[str]]:
    """Per mean (total, head, ...), the classes some run's metrics.json left out of it (AP
    undefined: no positive in its test set), with the run folders in brackets when not all runs."""
    found: Dict[str, Dict[str, List[str]]] = {}
    for d in dirs:
        with open(os.path.join(d, "metrics.json")) as f:
            left_out = json.load(f)[which].get("left_out") or {}
        for mean, classes in left_out.items():
            for c in classes:
                found.setdefault(mean, {}).setdefault(str(c), []).append(d)
    return {mean: [c if len(runs) == len(dirs) else f"{c} [{', '.join(runs)}]" for c, runs in classes.items()]
            for mean, classes in found.items()}


def left_out_notes(left_out: Dict[str, Dict[str, List[str]]]) -> str:
    """Footnote lines under the table: which classes each variant's means leave out."""
    lines = []
    for name, means in left_out.items():
        parts = [f"{mean}: {', '.join(classes)}" for mean, classes in means.items() if classes]
        if parts:
            lines.append(f"- {name}: left out of the means (no positive in the test set, AP undefined) -- " + "; ".join(parts))
    return "\n".join(lines)


def mean_std(values: np.ndarray):
    """Per column: mean and sample std over the runs (rows), NaNs left out; std 0 for a single run.
    A column with no defined value gives NaN without a warning (shown as n/a)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])
    return mean, std


def markdown_table(variants: Dict[str, np.ndarray]) -> str:
    """One row per variant: mean ± sample std over its runs (n in the last column)."""
    lines = ["| variant | " + " | ".join(c.capitalize() for c in COLUMNS) + " | n |", "|---|" + "---|" * (len(COLUMNS) + 1)]
    for name, values in variants.items():
        mean, std = mean_std(values)  # a column with no defined value (a group without an evaluable class): n/a
        cells = ["n/a" if np.isnan(m) else f"{m:.2f} ± {0.0 if np.isnan(s) else s:.2f}" for m, s in zip(mean, std)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(values)} |")
    return "\n".join(lines)


def bar_chart(variants: Dict[str, np.ndarray], path: str, title: str = "mAP (%), mean ± std over seeds") -> None:
    """Grouped bars: one group per column (total, head, medium, tail), one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    width = 0.8 / len(variants)
    for i, (name, values) in enumerate(variants.items()):
        mean, std = mean_std(values)
        x = np.arange(len(COLUMNS)) + (i - (len(variants) - 1) / 2) * width
        ax.bar(x, mean, width, yerr=std, capsize=3, label=name)
    ax.set_xticks(np.arange(len(COLUMNS)))
    ax.set_xticklabels([c.capitalize() for c in COLUMNS])
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(len(variants), 3))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    png = None
    if "--png" in argv:
        i = argv.index("--png")
        png = argv[i + 1]
        del argv[i: i + 2]
    if not argv:
        print(__doc__)
        return 2
    variants, left_out = {}, {}
    for item in argv:
        name, _, dirs = item.partition("=")
        variants[name] = load_runs(dirs.split(","))
        left_out[name] = load_left_out(dirs.split(","))
    print(markdown_table(variants))
    notes = left_out_notes(left_out)
    if notes:
        print("\n" + notes)
    if png:
        bar_chart(variants, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
