"""Finished runs kept elsewhere, brought into a sweep's trials folder so that it reuses them.

``launch/sweep.py --reuse-runs DIR``: DIR is a study's ``runs/`` folder written by ``--output DIR
--with-run-files`` (committed beside its tables), another storage's ``trials/`` folder, or one run
folder. A run is taken for a trial when both agree: the folder its ``config.yaml`` names
(``s<seed>-<reuse key>``, the key covering device kind and precision) and the digest of that config
(what changes the numbers, :func:`cssfe.sweep.studies.config_hash`). Its ``config.yaml``,
``log.jsonl`` and ``metrics.json`` are copied to the trial's folder, which makes the trial report
those numbers as reused instead of training again: a study can be finished on another machine, and a
run shared by several studies (their default row) is trained once.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Dict, List, Sequence

from cssfe.config import ConfigError, TrainConfig, load_config
from cssfe.sweep.studies import Study, config_hash
from cssfe.sweep.summary import RUN_FILES
from cssfe.sweep.trainable import resumable


def finished_runs(folder: str) -> List[str]:
    """``folder`` itself when it is a finished run (``config.yaml`` and ``metrics.json``), else its
    sub-folders that are, sorted."""
    def finished(path: str) -> bool:
        return all(os.path.isfile(os.path.join(path, name)) for name in ("config.yaml", "metrics.json"))

    if finished(folder):
        return [folder]
    return sorted(p for p in (os.path.join(folder, n) for n in os.listdir(folder)) if os.path.isdir(p) and finished(p))


def read_runs(sources: Sequence[str]) -> Dict[str, TrainConfig]:
    """The finished runs of ``sources`` with their configs. Raises ConfigError for a folder that does
    not exist or holds no finished run, and for a config that does not load (naming the file)."""
    runs = []
    for source in sources:
        if not os.path.isdir(source):
            raise ConfigError(f"--reuse-runs {source}: no such folder")
        found = finished_runs(source)
        if not found:
            raise ConfigError(f"--reuse-runs {source}: no finished run in it (a folder with config.yaml and "
                              "metrics.json, or a folder of such folders)")
        runs += found
    return {run: load_config(os.path.join(run, "config.yaml")) for run in runs}


def import_runs(runs: Dict[str, TrainConfig], study: Study, plan: Dict[str, Any]) -> List[str]:
    """Copy each of ``runs`` (:func:`read_runs`) that matches a trial of ``study`` (as ``plan`` places
    it) into the trial's folder, unless that folder holds a finished or resumable run of its own.
    Returns "<variant> seed <seed> <- <run folder>" for each copied run."""
    if not plan.get("trials_dir"):
        raise ConfigError("--reuse-runs copies runs into the storage's trials folder: give a folder --storage, not a URI")
    wanted = {}
    for key, target in plan["trial_dirs"].items():
        variant, seed = key.rsplit("|", 1)
        wanted[(os.path.basename(target), config_hash(study.trial_config(variant, int(seed))))] = (variant, seed, target)
    copied = []
    for run, cfg in runs.items():
        hit = wanted.get((os.path.basename(os.path.normpath(cfg.output_dir)), config_hash(cfg)))
        if hit is None:
            continue
        variant, seed, target = hit
        if os.path.isfile(os.path.join(target, "metrics.json")) or resumable(target):
            continue  # the trial's own run (finished, or to be resumed) comes first
        os.makedirs(target, exist_ok=True)
        for name in RUN_FILES:  # metrics.json last: it marks the run finished
            if os.path.isfile(os.path.join(run, name)):
                shutil.copyfile(os.path.join(run, name), os.path.join(target, name))
        copied.append(f"{variant} seed {seed} <- {run}")
    return copied
