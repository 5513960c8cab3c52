"""A finished sweep as the supplement shows its ablations: a table (rows = variants, columns =
Total / Head / Medium / Tail mAP, mean ± std over seeds) in Markdown and CSV, the class-weighted,
micro and macro F1 table (Markdown and ``<study>_f1.csv``) where the trials have F1, the per-trial
numbers in CSV, and a grouped bar chart (PNG). The table and the chart are those of :mod:`cssfe.report`.
A study with ``paired_against: LABEL`` also gets each variant's per-seed differences to that variant
(Markdown and ``<study>_paired.csv``): the seeds both finished, their mean ± std, how many are
positive, and a 95 % Student-t interval of the mean difference."""
from __future__ import annotations

import csv
import os
import shutil
from typing import Any, Dict, List, Optional

import numpy as np

from cssfe.report import COLUMNS, bar_chart, markdown_table, mean_std
from cssfe.sweep.studies import Study, trial_key

# F1 of the final EMA model at the fixed threshold 0.5 on the sigmoid score (cssfe.metrics; supplement Table 3).
F1_FIELDS = ("f1_weighted", "f1_micro", "f1_macro")
TRIAL_FIELDS = ("variant", "seed", "status", "epochs", *COLUMNS, *F1_FIELDS, "lambda", "attempts", "reused", "error",
                "run_dir")


def finished_by_variant(study: Study, records: List[Dict[str, Any]]) -> Dict[str, np.ndarray]:
    """{variant: [finished trials, 4]} in the study's order; variants without a finished trial left out."""
    out = {}
    for label in study.variants:
        rows = [[r[c] for c in COLUMNS] for r in records if r["variant"] == label and r["status"] == "finished"]
        if rows:
            out[label] = np.asarray(rows, dtype=np.float64)
    return out


def stopped_notes(study: Study, records: List[Dict[str, Any]]) -> Dict[str, str]:
    """{variant: note} for the variants of which the scheduler (ASHA) stopped some seeds early: the
    table's mean is then over the seeds it kept, which are the better ones."""
    out = {}
    for label in study.variants:
        mine = [r for r in records if r["variant"] == label]
        stopped = [str(r["seed"]) for r in mine if r["status"] == "stopped early"]
        if stopped:
            kept = sum(r["status"] == "finished" for r in mine)
            out[label] = (f"ASHA kept {kept} of {len(mine)} seeds of **{label}** (stopped early: seed "
                          f"{', '.join(stopped)}); its mean is over the kept ones")
    return out


def f1_by_variant(study: Study, records: List[Dict[str, Any]]) -> Dict[str, np.ndarray]:
    """{variant: [finished trials with F1, 3]} (class-weighted, micro, macro), in the study's order."""
    out = {}
    for label in study.variants:
        rows = [[r[c] for c in F1_FIELDS] for r in records
                if r["variant"] == label and r["status"] == "finished" and r.get(F1_FIELDS[0]) is not None]
        if rows:
            out[label] = np.asarray(rows, dtype=np.float64)
    return out


PAIRED_CONFIDENCE = 0.95


def paired_differences(study: Study, records: List[Dict[str, Any]], baseline: str) -> Dict[str, Dict[str, Any]]:
    """{variant: {"seeds": [...], "diffs": [seeds, 4] (variant - baseline, per seed), "lambda": [seeds]}}
    over the seeds that both the variant and ``baseline`` finished, in the study's order."""
    def by_seed(label):
        return {r["seed"]: r for r in records if r["variant"] == label and r["status"] == "finished"}

    base = by_seed(baseline)
    out = {}
    for label in study.variants:
        if label == baseline:
            continue
        mine = by_seed(label)
        seeds = sorted(set(mine) & set(base))
        if seeds:
            out[label] = {"seeds": seeds,
                          "diffs": np.asarray([[mine[s][c] - base[s][c] for c in COLUMNS] for s in seeds], dtype=np.float64),
                          "lambda": np.asarray([np.nan if mine[s].get("lambda") is None else mine[s]["lambda"] for s in seeds])}
    return out


def paired_stats(diffs: np.ndarray, confidence: float = PAIRED_CONFIDENCE) -> Dict[str, np.ndarray]:
    """Per column of ``diffs`` [seeds, k]: mean, sample std, positives (> 0), n, and the Student-t
    interval mean ± t_{(1+confidence)/2, n-1} std / sqrt(n) (NaN with one seed: no spread to size it)."""
    from scipy import stats

    n = len(diffs)
    mean, std = mean_std(diffs)
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * std / np.sqrt(n) if n > 1 else np.full(diffs.shape[1], np.nan)
    return {"mean": mean, "std": std, "positive": (diffs > 0).sum(0), "n": n, "low": mean - half, "high": mean + half}


def paired_markdown(paired: Dict[str, Dict[str, Any]], baseline: str) -> str:
    lines = [f"Per-seed paired differences to **{baseline}** (variant minus {baseline}, mAP points, same seed: same data "
             f"order and initialisation): mean ± sample std, seeds positive of n, {PAIRED_CONFIDENCE:.0%} t-interval "
             "of the mean; λ: the variant's own λ at the end, mean ± std.", "",
             "| variant | " + " | ".join(f"Δ {c.capitalize()}" for c in COLUMNS) + " | λ at the end | n |",
             "|---|" + "---|" * (len(COLUMNS) + 2)]
    for label, pair in paired.items():
        st = paired_stats(pair["diffs"])
        cells = [f"{m:+.2f} ± {s:.2f} ({p}/{st['n']} > 0) [{lo:+.2f}, {hi:+.2f}]"
                 for m, s, p, lo, hi in zip(st["mean"], st["std"], st["positive"], st["low"], st["high"])]
        lam = pair["lambda"]
        lam_cell = "n/a" if np.isnan(lam).all() else "{:.3f} ± {:.3f}".format(*[float(x[0]) for x in mean_std(lam[:, None])])
        lines.append(f"| {label} | " + " | ".join(cells).replace("[nan, nan]", "[n/a]") + f" | {lam_cell} | {st['n']} |")
    return "\n".join(lines)


def paired_rows(paired: Dict[str, Dict[str, Any]]) -> List[List[Any]]:
    rows = []
    for label, pair in paired.items():
        st = paired_stats(pair["diffs"])
        for i, column in enumerate(COLUMNS):
            rows.append([label, column, st["n"], int(st["positive"][i]),
                         *[f"{st[k][i]:.4f}" for k in ("mean", "std", "low", "high")]])
        lam = pair["lambda"]
        if not np.isnan(lam).all():
            mean, std = mean_std(lam[:, None])
            rows.append([label, "lambda", len(lam), "", f"{mean[0]:.4f}", f"{std[0]:.4f}", "", ""])
    return rows


PAIRED_HEADER = ["variant", "column", "n", "positive", "mean", "std", "ci95_low", "ci95_high"]


def paired_chart(paired: Dict[str, Dict[str, Any]], baseline: str, path: str, title: str) -> None:
    """One panel per column (total, head, medium, tail): each variant's per-seed differences to
    ``baseline`` as dots, their mean with the t-interval as a bar, and the zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(paired)
    stats = {label: paired_stats(pair["diffs"]) for label, pair in paired.items()}
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(3 * len(COLUMNS), 3.6), dpi=100, sharey=True)
    for i, (ax, column) in enumerate(zip(axes, COLUMNS)):
        ax.axhline(0, color="0.4", linewidth=0.8)
        for x, label in enumerate(labels):
            diffs, mean = paired[label]["diffs"][:, i], stats[label]["mean"][i]
            low, high = stats[label]["low"][i], stats[label]["high"][i]
            if not np.isfinite(low):  # one seed: no interval
                low = high = mean
            jitter = np.linspace(-0.12, 0.12, len(diffs)) if len(diffs) > 1 else np.zeros(1)
            ax.plot(x + jitter, diffs, "o", color="0.55", markersize=3.5, zorder=2)
            ax.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt="s", color=f"C{x}", capsize=4, markersize=6,
                        zorder=3)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(column.capitalize())
    axes[0].set_ylabel(f"mAP points, minus {baseline}")
    fig.suptitle(f"{title}: per-seed differences (dots), mean and {PAIRED_CONFIDENCE:.0%} t-interval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


RUN_FILES = ("config.yaml", "log.jsonl", "metrics.json")


def from_storage(run_dir: str, storage_root: Optional[str]) -> str:
    """A run folder relative to the sweep's storage (``trials/s0-...``) when it lies below it, so
    it reads the same wherever the storage is mounted; else as it is."""
    if storage_root and run_dir.startswith(storage_root.rstrip("/") + "/"):
        return os.path.relpath(run_dir, storage_root)
    return run_dir


def copy_run_files(records: List[Dict[str, Any]], out_dir: str, storage_root: Optional[str]) -> List[str]:
    """Each finished trial's ``config.yaml``, ``log.jsonl`` and ``metrics.json`` into
    ``<out_dir>/runs/<variant>_s<seed>/``, to keep with a study's tables. The config names the run
    folder relative to the storage (as ``trials.csv`` does) and the sweep's default cache folder as
    the default (null): what stays are the settings, not this machine's paths."""
    import yaml

    from cssfe.cache import default_cache_dir

    written = []
    for record in records:
        run_dir = record.get("run_dir")
        if record["status"] != "finished" or not run_dir or not os.path.isfile(os.path.join(run_dir, "metrics.json")):
            continue
        dest = os.path.join(out_dir, "runs", trial_key(record["variant"], record["seed"]))
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        cfg["output_dir"] = from_storage(run_dir, storage_root)
        if cfg.get("cache_dir") and os.path.abspath(cfg["cache_dir"]) == os.path.abspath(default_cache_dir()):
            cfg["cache_dir"] = None
        with open(os.path.join(dest, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        for name in RUN_FILES[1:]:
            shutil.copyfile(os.path.join(run_dir, name), os.path.join(dest, name))
        written.append(dest)
    return written


def f1_markdown(variants: Dict[str, np.ndarray]) -> str:
    lines = ["| variant | class-weighted F1 | micro F1 | macro F1 | n |", "|---|---|---|---|---|"]
    for name, values in variants.items():
        mean, std = mean_std(values)
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, std)) + f" | {len(values)} |")
    return "\n".join(lines)


def summary_markdown(study: Study, records: List[Dict[str, Any]]) -> str:
    variants = finished_by_variant(study, records)
    lines = [f"### {study.title}", "", "mAP (%) of the final EMA model, mean ± sample std over seeds (n: finished trials).", ""]
    lines.append(markdown_table(variants) if variants else "(no finished trial)")
    f1 = f1_by_variant(study, records)
    if f1:
        lines += ["", "F1 (fractions) of the same models at the fixed threshold 0.5 on the sigmoid score "
                  "(not tuned on the test set), mean ± sample std over seeds.", "", f1_markdown(f1)]
    if study.paired_against:
        paired = paired_differences(study, records, study.paired_against)
        lines += ["", paired_markdown(paired, study.paired_against) if paired
                  else f"(no seed that **{study.paired_against}** and another variant both finished: no paired differences)"]
    notes = [f"- skipped **{label}**: {reason}" for label, reason in study.skipped.items()]
    notes += [f"- {line}" for line in stopped_notes(study, records).values()]
    notes += [f"- {r['status']} **{r['variant']}** seed {r['seed']} at epoch {r['epochs']}, after {r['attempts']} start(s)"
              + (f": {r['error']}" if r["error"] else "") for r in records
              if r["status"] not in ("finished", "stopped early", "not started")]
    for label in study.variants:
        waiting = [str(r["seed"]) for r in records if r["variant"] == label and r["status"] == "not started"]
        if waiting:
            notes.append(f"- not started **{label}**: seed {', '.join(waiting)}")
    retried = [r for r in records if r["status"] == "finished" and r["attempts"] > 1]
    notes += [f"- restarted **{r['variant']}** seed {r['seed']}: finished after {r['attempts']} starts, each continuing "
              "from the last epoch checkpoint (after a failure or an interrupted sweep)" for r in retried]
    reused = [f"{r['variant']} seed {r['seed']}" for r in records if r.get("reused")]
    if reused:
        notes.append(f"- reused, trained by another sweep with the same trial config: {', '.join(reused)}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _write_csv(path: str, header, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_summary(study: Study, records: List[Dict[str, Any]], out_dir: str,
                  storage_root: Optional[str] = None, run_files: bool = False) -> Dict[str, str]:
    """Write ``<study>.md``, ``<study>.csv`` (one row per variant), ``trials.csv`` and ``<study>.png``
    (when a trial finished), for a paired study ``<study>_paired.csv`` and ``<study>_paired.png``,
    with ``run_files`` each finished trial's files (:func:`copy_run_files`); returns their paths
    by kind. ``trials.csv`` names each trial's run folder relative to ``storage_root``
    (``trials/s0-...``) when it lies below it, so the file reads the same wherever the storage is
    mounted."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"markdown": os.path.join(out_dir, f"{study.name}.md"), "csv": os.path.join(out_dir, f"{study.name}.csv"),
             "trials": os.path.join(out_dir, "trials.csv"), "png": os.path.join(out_dir, f"{study.name}.png")}
    with open(paths["markdown"], "w") as f:
        f.write(summary_markdown(study, records))
    variants = finished_by_variant(study, records)
    stopped = stopped_notes(study, records)
    rows = []
    for label in study.variants:
        if label in study.skipped:
            rows.append([label, 0, *[""] * (2 * len(COLUMNS)), "skipped: " + study.skipped[label]])
            continue
        values = variants.get(label)
        if values is None:
            rows.append([label, 0, *[""] * (2 * len(COLUMNS)), "no finished trial"])
            continue
        mean, std = mean_std(values)
        note = stopped.get(label, "").replace("**", "")
        rows.append([label, len(values), *[f"{x:.4f}" for pair in zip(mean, std) for x in pair], note])
    _write_csv(paths["csv"], ["variant", "n", *[f"{c}_{s}" for c in COLUMNS for s in ("mean", "std")], "note"], rows)
    def field(record: Dict[str, Any], key: str):
        value = record.get(key)
        return from_storage(value, storage_root) if key == "run_dir" and value else value

    _write_csv(paths["trials"], TRIAL_FIELDS, [[field(r, k) for k in TRIAL_FIELDS] for r in records])
    f1 = f1_by_variant(study, records)
    if f1:  # one row per variant with an F1: class-weighted, micro, macro (mean, std)
        paths["f1_csv"] = os.path.join(out_dir, f"{study.name}_f1.csv")
        _write_csv(paths["f1_csv"], ["variant", "n", *[f"{c}_{s}" for c in F1_FIELDS for s in ("mean", "std")]],
                   [[label, len(v), *[f"{x:.4f}" for pair in zip(*mean_std(v)) for x in pair]] for label, v in f1.items()])
    if study.paired_against:  # per variant and column (total ... tail, lambda): the paired statistics
        paired = paired_differences(study, records, study.paired_against)
        paths["paired_csv"] = os.path.join(out_dir, f"{study.name}_paired.csv")
        _write_csv(paths["paired_csv"], PAIRED_HEADER, paired_rows(paired))
        if paired:
            paths["paired_png"] = os.path.join(out_dir, f"{study.name}_paired.png")
            paired_chart(paired, study.paired_against, paths["paired_png"], study.title)
    if run_files and copy_run_files(records, out_dir, storage_root):
        paths["runs"] = os.path.join(out_dir, "runs")
    if variants:
        bar_chart(variants, paths["png"], title=f"{study.title}: mAP (%), mean ± std over seeds")
    else:
        del paths["png"]
    return paths
