"""PNG charts of benchmark results.

    python -m benchmarks.plot benchmarks/results --out docs/results/performance [--filter device=...]

RESULTS are JSONL files of result rows (``benchmarks.rows``), ``gpu_check.json`` files, or folders
searched recursively for both. Written, one file per group, the latest row per key (as in compare.py):

- ``kernels_<op>_<mode>_<device>.png``: median ms per provider, grouped by shape and dtype, with
  p20–p80 error bars (log scale when the bars span more than 20x); failed providers are named below;
- ``train_step_<device>.png``: training-step images/s per backbone / head / kernels (p20–p80 step times);
- ``tracking_<benchmark>_<op>_<device>.png``, when a key was measured at several commits: the median
  per commit (oldest first: git history where the commit is known here, else date), one line per key.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.rows import KEY, chronological, commit_position, latest_per_key, load_rows, select  # noqa: E402

DPI = 90  # small files that still read well on a page


def slug(*parts: str) -> str:
    return "_".join(re.sub(r"[^a-z0-9_]+", "-", part.lower()).strip("-") for part in parts)


def _log_scale_if_wide(ax, values) -> None:
    values = np.asarray([v for v in values if v > 0])
    if len(values) and values.max() / values.min() > 20:
        ax.set_yscale("log")


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _commits_text(group: pd.DataFrame) -> str:
    return "commit " + ", ".join(dict.fromkeys(group["commit"]))


def provider_colours(providers) -> dict:
    """One colour per provider name, the same in every chart of a run."""
    palette = plt.get_cmap("tab20").colors
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(set(providers)))}


def kernel_chart(group: pd.DataFrame, title: str, path: str, colours: dict) -> str:
    """Grouped bars: one group per shape x dtype, one bar per provider."""
    timed = group.dropna(subset=["p50_ms"])
    cases = list(dict.fromkeys(zip(timed["shape"], timed["dtype"])))
    providers = sorted(set(timed["provider"]))
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(cases) * len(providers) + 2), 3.6))
    for i, provider in enumerate(providers):
        rows = timed[timed["provider"] == provider].set_index(["shape", "dtype"]).reindex(cases)
        median = rows["p50_ms"].to_numpy(float)
        low = np.clip(median - rows["p20_ms"].fillna(rows["p50_ms"]).to_numpy(float), 0, None)
        high = np.clip(rows["p80_ms"].fillna(rows["p50_ms"]).to_numpy(float) - median, 0, None)
        ax.bar(np.arange(len(cases)) - 0.4 + (i + 0.5) * width, median, width, yerr=[low, high], capsize=2, label=provider,
               color=colours[provider])
    ax.set_xticks(np.arange(len(cases)), [f"{shape}\n{dtype}" for shape, dtype in cases], fontsize=8)
    ax.set_ylabel("median ms (bars: p20–p80)")
    _log_scale_if_wide(ax, timed["p50_ms"])
    ax.set_title(f"{title}\n{_commits_text(group)}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    failed = group[group["p50_ms"].isna()]
    if len(failed):
        names = "; ".join(f"{r.provider} {r.shape} {r.dtype}" for r in failed.itertuples())
        fig.text(0.01, -0.02, f"failed: {names}", fontsize=7, va="top", wrap=True)
    return _save(fig, path)


def train_step_chart(group: pd.DataFrame, title: str, path: str) -> str:
    """Horizontal bars of images/s; error bars from the p80 and p20 step times."""
    timed = group.dropna(subset=["images_per_s"])
    labels = [f"{r.op} · {r.provider} · {r.dtype} · {r.shape}" for r in timed.itertuples()]
    rate = timed["images_per_s"].to_numpy(float)
    at_p80 = rate * timed["p50_ms"].to_numpy(float) / timed["p80_ms"].to_numpy(float)
    at_p20 = rate * timed["p50_ms"].to_numpy(float) / timed["p20_ms"].to_numpy(float)
    fig, ax = plt.subplots(figsize=(7.0, 0.4 * len(labels) + 1.2))
    ax.barh(np.arange(len(labels)), rate, xerr=[np.nan_to_num(rate - at_p80), np.nan_to_num(at_p20 - rate)], capsize=2,
            color="tab:blue")
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images/s (bars: p20–p80 step time)")
    ax.set_title(f"{title}\n{_commits_text(group)}", fontsize=10)
    return _save(fig, path)


def commit_order(table: pd.DataFrame) -> list:
    """Commits oldest first: their place in git history where known here, else their first date."""
    first_date = table.groupby("commit")["date"].min()
    known = {c: commit_position(c) for c in first_date.index}
    return sorted(first_date.index, key=lambda c: (known[c] < 0, known[c], first_date[c]))


def tracking_chart(group: pd.DataFrame, title: str, path: str) -> str:
    """Median per commit, one line per key measured at two commits or more."""
    order = commit_order(group)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(order) + 3), 3.8))
    for key, rows in group.groupby(KEY, sort=False):
        benchmark, op, variant, shape, dtype, provider, mode, device = key
        x = [order.index(c) for c in rows["commit"]]
        ax.plot(x, rows["p50_ms"], marker="o", label=f"{provider} {shape} {dtype} {mode}")
    ax.set_xticks(range(len(order)), order, fontsize=8)
    ax.set_xlabel("commit (oldest first)")
    ax.set_ylabel("median ms")
    _log_scale_if_wide(ax, group["p50_ms"])
    if ax.get_yscale() == "linear":
        ax.set_ylim(bottom=0)  # from zero, so that a 2 % change does not look like a fall off a cliff
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def tracked_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The latest timed row per key and commit, for the keys timed at two commits or more."""
    timed = chronological(table.dropna(subset=["p50_ms"])).drop_duplicates(KEY + ["commit"], keep="last")
    commits = timed.groupby(KEY)["commit"].transform("nunique")
    return timed[commits >= 2]


def plot_all(table: pd.DataFrame, out: str) -> list:
    os.makedirs(out, exist_ok=True)
    written = []
    # a chart per op and variant: "progressive_enhance (masked affinity)"
    table = table.assign(op=[f"{op} ({variant})" if variant else op for op, variant in zip(table["op"], table["variant"])])
    latest = latest_per_key(table)
    kernels = latest[latest["benchmark"] != "train_step"]
    colours = provider_colours(kernels["provider"])
    for (benchmark, op, mode, device), group in kernels.groupby(["benchmark", "op", "mode", "device"], sort=False):
        path = os.path.join(out, slug(benchmark, op, mode, device) + ".png")
        written.append(kernel_chart(group, f"{op}, {mode}, on {device}", path, colours))
    steps = latest[latest["benchmark"] == "train_step"]
    for device, group in steps.groupby("device", sort=False):
        path = os.path.join(out, slug("train_step", device) + ".png")
        written.append(train_step_chart(group, f"training step on {device}", path))
    for (benchmark, op, device), group in tracked_rows(table).groupby(["benchmark", "op", "device"], sort=False):
        path = os.path.join(out, slug("tracking", benchmark, op, device) + ".png")
        written.append(tracking_chart(group, f"{benchmark} {op} on {device}, across commits", path))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSONL files, gpu_check.json files, or folders of them")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE", help="keep matching rows only")
    args = p.parse_args(argv)
    try:
        table = select(load_rows(args.results), args.filter)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    if table.empty:
        print("no rows to plot", file=sys.stderr)
        return 1
    for path in plot_all(table, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
