"""Before any trial is scheduled: build each variant's dataset and model once, in the driver.

A variant whose parts cannot be had here (a text encoder's or a backbone's weights that are not
on this machine) is *skipped with its reason* instead of failing trial after trial. Building in
the driver also fills the dataset and label-embedding caches once, so trials that start side by
side do not generate the same files at the same time.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from cssfe.sweep.studies import Study


def check_distributed(study: Study, workers: int) -> None:
    """A distributed trial's batch arithmetic (global batch = micro-batch x accumulation x workers)
    and DeepSpeed config file, checked for every variant before anything is scheduled."""
    from cssfe.engine.distributed import deepspeed_config

    for label in study.variants:
        cfg = study.trial_config(label, study.seeds[0])
        try:
            deepspeed_config(cfg, workers)
        except Exception as exc:  # noqa: BLE001 - re-raised with the variant named
            raise type(exc)(f"variant {label!r} with {workers} workers per trial: {exc}") from exc


def check_variants(study: Study, cache_dir: Optional[str] = None) -> Dict[str, str]:
    """``{label: reason}`` of the variants that cannot be built; also stored in ``study.skipped``."""
    from cssfe.cache import default_cache_dir
    from cssfe.data import build_data
    from cssfe.models.model import build_model

    skipped: Dict[str, str] = {}
    datasets = {}
    for label in study.variants:
        cfg = study.trial_config(label, study.seeds[0], "progress=false")
        cache = cfg.cache_dir or cache_dir or default_cache_dir()
        try:
            key = repr((cfg.data, cache))  # variants of one study mostly share their data
            if key not in datasets:
                datasets[key] = build_data(cfg.data, cache, progress=False)
            data = datasets[key]
            build_model(cfg.model, data.class_names, data.groups, cfg.data.image_size, cache)
        except Exception as exc:  # noqa: BLE001 - any reason a part cannot be built is reported as is
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            skipped[label] = reason.replace(os.path.expanduser("~"), "~")[:300]  # tables may be published
    study.skipped = skipped
    return skipped

