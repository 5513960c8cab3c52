"""A finished sweep as the supplement shows its ablations: a table (rows = variants, columns =
Total / Head / Medium / Tail mAP, mean ± std over seeds) in Markdown and CSV, the per-trial numbers
in CSV, and a grouped bar chart (PNG). The table and the chart are those of :mod:`cssfe.report`."""
from __future__ import annotations

import csv
import os
from typing import Any, Dict, List

import numpy as np

from cssfe.report import COLUMNS, bar_chart, markdown_table
from cssfe.sweep.studies import Study

TRIAL_FIELDS = ("variant", "seed", "status", "epochs", *COLUMNS, "lambda", "attempts", "reused", "error", "run_dir")


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


def summary_markdown(study: Study, records: List[Dict[str, Any]]) -> str:
    variants = finished_by_variant(study, records)
    lines = [f"### {study.title}", "", "mAP (%) of the final EMA model, mean ± sample std over seeds (n: finished trials).", ""]
    lines.append(markdown_table(variants) if variants else "(no finished trial)")
    notes = [f"- skipped **{label}**: {reason}" for label, reason in study.skipped.items()]
    notes += [f"- {line}" for line in stopped_notes(study, records).values()]
    notes += [f"- {r['status']} **{r['variant']}** seed {r['seed']} at epoch {r['epochs']}, after {r['attempts']} start(s)"
              + (f": {r['error']}" if r["error"] else "") for r in records if r["status"] not in ("finished", "stopped early")]
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


def write_summary(study: Study, records: List[Dict[str, Any]], out_dir: str) -> Dict[str, str]:
    """Write ``<study>.md``, ``<study>.csv`` (one row per variant), ``trials.csv`` and ``<study>.png``
    (when a trial finished); returns their paths by kind."""
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
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1) if len(values) > 1 else np.zeros(len(COLUMNS))
        note = stopped.get(label, "").replace("**", "")
        rows.append([label, len(values), *[f"{x:.4f}" for pair in zip(mean, std) for x in pair], note])
    _write_csv(paths["csv"], ["variant", "n", *[f"{c}_{s}" for c in COLUMNS for s in ("mean", "std")], "note"], rows)
    _write_csv(paths["trials"], TRIAL_FIELDS, [[r.get(k) for k in TRIAL_FIELDS] for r in records])
    if variants:
        bar_chart(variants, paths["png"], title=f"{study.title}: mAP (%), mean ± std over seeds")
    else:
        del paths["png"]
    return paths
