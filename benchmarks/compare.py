"""Ratios between two benchmark result sets, with regressions flagged.

    python -m benchmarks.compare BASE NEW [--threshold 0.10] [--filter op=asl] [--no-fail]
    python -m benchmarks.compare benchmarks/results/kernels_cpu.jsonl benchmarks/results/kernels_cpu.jsonl \
        --base-select commit=abfaf93 --new-select commit=1234abc

BASE and NEW are each a JSONL file of result rows (``benchmarks.rows``), a ``gpu_check.json``, or a
folder searched recursively for both. Rows are matched on benchmark / op / variant / shape / dtype /
provider / mode / device; where a side holds several rows for one key (repeated runs), the latest counts (by date,
then commit order, then file order) unless ``--select`` / ``--base-select`` / ``--new-select`` pick
rows first. Times compared: medians (kernels: ms per call; train step: ms per step).

Exit status: 1 when a row is REGRESSION (new median more than ``--threshold`` slower) or BROKEN (timed
in BASE, failed in NEW), 2 when the two sides share no row, else 0; ``--no-fail`` always exits 0.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

from benchmarks.rows import KEY, latest_per_key, load_rows, select

REGRESSION, BROKEN = "REGRESSION", "BROKEN"


def _flag(base_ms: float, new_ms: float, threshold: float) -> str:
    if np.isnan(base_ms) and np.isnan(new_ms):
        return "both failed"
    if np.isnan(new_ms):
        return BROKEN
    if np.isnan(base_ms):
        return "fixed"
    ratio = new_ms / base_ms
    if ratio > 1 + threshold:
        return REGRESSION
    if ratio < 1 / (1 + threshold):
        return "faster"
    return ""


def compare(base: pd.DataFrame, new: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Outer join of the latest rows per key: ``base_ms``, ``new_ms``, ``ratio`` (new / base), ``flag``, ``side``."""
    keep = KEY + ["p50_ms", "commit", "error"]
    merged = latest_per_key(base)[keep].merge(latest_per_key(new)[keep], on=KEY, how="outer", suffixes=("_base", "_new"),
                                              indicator="side")
    merged = merged.rename(columns={"p50_ms_base": "base_ms", "p50_ms_new": "new_ms"})
    merged["error"] = merged["error_new"].fillna(merged["error_base"]).fillna("").astype(str).str.slice(0, 60)
    merged["side"] = merged["side"].map({"both": "both", "left_only": "base only", "right_only": "new only"})
    both = merged["side"] == "both"
    merged["ratio"] = merged["new_ms"] / merged["base_ms"]
    merged["flag"] = ""
    merged.loc[both, "flag"] = [_flag(b, n, threshold) for b, n in zip(merged.loc[both, "base_ms"], merged.loc[both, "new_ms"])]
    return merged.sort_values(KEY, kind="stable").reset_index(drop=True)


def _describe(name: str, table: pd.DataFrame, paths) -> str:
    commits = ", ".join(dict.fromkeys(table["commit"])) or "-"
    devices = ", ".join(dict.fromkeys(table["device"])) or "-"
    return f"{name}: {' '.join(paths)} — {len(table)} rows; commits {commits}; devices {devices}"


def _print_table(rows: pd.DataFrame, columns) -> None:
    for (benchmark, device), group in rows.groupby(["benchmark", "device"], sort=False):
        print(f"\n[{benchmark} on {device}]")
        print(group[columns].to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="JSONL file, gpu_check.json, or folder of them")
    p.add_argument("new", help="JSONL file, gpu_check.json, or folder of them")
    p.add_argument("--threshold", type=float, default=0.10, help="flag rows whose new median is this fraction slower (0.10)")
    p.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE", help="keep matching rows on both sides")
    p.add_argument("--select", action="append", default=[], metavar="COLUMN=VALUE",
                   help="pick rows on both sides before taking the latest per key, e.g. commit=abc1234")
    p.add_argument("--base-select", action="append", default=[], metavar="COLUMN=VALUE", help="the same, BASE only")
    p.add_argument("--new-select", action="append", default=[], metavar="COLUMN=VALUE", help="the same, NEW only")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even when regressions are flagged")
    args = p.parse_args(argv)

    try:
        base = select(load_rows([args.base]), args.filter + args.select + args.base_select)
        new = select(load_rows([args.new]), args.filter + args.select + args.new_select)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    print(_describe("base", base, [args.base]))
    print(_describe("new ", new, [args.new]))

    table = compare(base, new, args.threshold)
    matched = table[table["side"] == "both"]
    _print_table(matched, ["op", "variant", "shape", "dtype", "provider", "mode", "base_ms", "new_ms", "ratio", "flag"])
    for side in ("base only", "new only"):
        alone = table[table["side"] == side]
        if len(alone):
            print(f"\n{len(alone)} rows only in {side.split()[0]} (not compared):")
            column = "base_ms" if side == "base only" else "new_ms"
            _print_table(alone.rename(columns={column: "p50_ms"}),
                         ["op", "variant", "shape", "dtype", "provider", "mode", "p50_ms", "error"])

    failing = matched[matched["flag"].isin([REGRESSION, BROKEN])]
    faster = (matched["flag"] == "faster").sum()
    print(f"\n{len(matched)} rows compared: {len(failing)} regressions (> {100 * args.threshold:g} % slower or broken), "
          f"{faster} faster; {len(table) - len(matched)} rows on one side only")
    if args.no_fail:
        return 0
    if matched.empty:
        print("no row in common: nothing was compared", file=sys.stderr)
        return 2
    return 1 if len(failing) else 0


if __name__ == "__main__":
    sys.exit(main())
