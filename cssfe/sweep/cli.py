"""``python launch/sweep.py --study NAME [options] [key=value ...]``: run an ablation study with
Ray Tune, then print and write its table (Markdown, CSV) and chart (PNG).

Studies: the files in configs/sweeps/ (losses, backbones, embeddings, mask, ...), or
``--study custom --space FILE.yaml`` (or ``--study FILE.yaml``) for an own search space in the
same format. ``key=value`` arguments override the config of every trial.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Dict, List, Optional

from cssfe.config import ConfigError
from cssfe.sweep import storage
from cssfe.sweep.resources import PLACEMENT_STRATEGIES
from cssfe.sweep.runner import SweepOptions, current_records, experiment_dir, run_sweep
from cssfe.sweep.studies import available_studies, load_study
from cssfe.sweep.summary import summary_markdown, write_summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help=f"one of {', '.join(available_studies())}, 'custom', or a study YAML file")
    p.add_argument("--space", help="the study YAML file of --study custom")
    p.add_argument("--seeds", help="comma-separated training seeds (default: the study's)")
    p.add_argument("--variants", help="comma-separated variant labels to run (default: all)")
    p.add_argument("--paired-against", metavar="LABEL",
                   help="report each variant's per-seed differences to this variant (default: the study's paired_against)")
    p.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (default: start a local one)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="one per process: equal to --workers-per-trial (required when the cluster has GPUs, unless device=cpu)")
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="processes per trial; > 1 is a distributed trial: Ray Train workers running DeepSpeed, sharing the trial's CPUs and GPUs")
    p.add_argument("--placement", default="PACK", choices=PLACEMENT_STRATEGIES,
                   help="where a distributed trial's workers go: PACK (few nodes), STRICT_PACK (one node), SPREAD")
    p.add_argument("--trial-resource", action="append", default=[], metavar="NAME=AMOUNT",
                   help="a custom Ray resource each trial's own process needs, e.g. non_preemptible=0.01 (repeatable)")
    p.add_argument("--ship-code", action="store_true",
                   help="send this package to the cluster's nodes with the job (for nodes where it is not installed)")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at a time (default: as resources allow)")
    p.add_argument("--max-failures", type=int, default=1, help="retries of a trial that raises")
    p.add_argument("--asha", action="store_true", help="stop weak trials early (ASHA on total mAP)")
    p.add_argument("--asha-grace-epochs", type=int, default=5)
    p.add_argument("--storage", default="runs/sweeps",
                   help="experiment folders go under this path or URI (s3://, gs://); with --address an absolute "
                        "folder every node sees, or a URI (default: runs/sweeps)")
    p.add_argument("--name", help="experiment folder name (default: the study's name)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: delete the experiment of the same name and its trials' runs, and train every trial again")
    p.add_argument("--report-only", action="store_true",
                   help="no training: the table of the trials finished so far (e.g. while the sweep runs elsewhere)")
    p.add_argument("--output", help="also write the table, CSVs and chart here (they always go to <experiment>/report)")
    p.add_argument("--with-run-files", action="store_true",
                   help="with --output: also copy each finished trial's config.yaml, log.jsonl and metrics.json to "
                        "OUTPUT/runs/<variant>_s<seed>/ (to keep a study's numbers with its tables)")
    p.add_argument("--reuse-runs", action="append", default=[], metavar="DIR",
                   help="take finished runs from DIR (a study's OUTPUT/runs of --with-run-files, another storage's "
                        "trials/ folder) for the trials whose config they match, instead of training them (repeatable)")
    p.add_argument("overrides", nargs="*", help="key=value for every trial's config")
    return p


def _trial_resources(items: List[str]) -> Dict[str, float]:
    out = {}
    for item in items:
        name, _, amount = item.partition("=")
        try:
            out[name.strip()] = float(amount)
        except ValueError:
            raise ValueError(f"--trial-resource {item!r}: expected NAME=AMOUNT, e.g. non_preemptible=0.01") from None
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # overrides anywhere among the options
    source = args.study
    if source == "custom":
        if not args.space:
            print("--study custom needs --space FILE.yaml", file=sys.stderr)
            return 2
        source = args.space
    if args.with_run_files and not args.output:
        print("--with-run-files copies the trials' files to --output: give --output DIR", file=sys.stderr)
        return 2
    try:
        study = load_study(source, seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
                           overrides=args.overrides, variants=args.variants.split(",") if args.variants else None,
                           paired_against=args.paired_against)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        trial_resources = _trial_resources(args.trial_resource)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = SweepOptions(
        storage_path=args.storage, name=args.name, address=args.address, num_cpus=args.num_cpus,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, workers_per_trial=args.workers_per_trial,
        max_concurrent_trials=args.max_concurrent, max_failures=args.max_failures, asha=args.asha,
        asha_grace_epochs=args.asha_grace_epochs, restore=not args.fresh, placement=args.placement,
        trial_resources=trial_resources, ship_code=args.ship_code, reuse_runs=args.reuse_runs,
    )
    try:
        outcome = current_records(options, study) if args.report_only else run_sweep(study, options)
    except ConfigError as exc:  # found before any trial was scheduled
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # the pairing is the report's, not the training's: the one asked for now, over a stored sweep's too
    outcome["study"].paired_against = study.paired_against
    study, records = outcome["study"], outcome["records"]
    print(summary_markdown(study, records))
    exp_dir = experiment_dir(options, study)
    report_dir = storage.join(exp_dir, "report")
    storage_root = None if storage.is_uri(exp_dir) else os.path.dirname(exp_dir)  # trials.csv names run folders from here
    for out_dir in filter(None, (report_dir, args.output)):
        run_files = args.with_run_files and out_dir == args.output  # the experiment's report has the trials beside it
        if storage.is_uri(out_dir):  # written here, then copied beside the experiment
            with tempfile.TemporaryDirectory() as local:
                write_summary(study, records, local, storage_root, run_files)
                storage.upload_dir(local, out_dir)
            print(f"wrote the report: {out_dir}")
            continue
        for kind, path in write_summary(study, records, out_dir, storage_root, run_files).items():
            print(f"wrote {kind}: {path}")
    return 0 if all(r["status"] == "finished" for r in records) else 1  # also while unfinished (--report-only)
