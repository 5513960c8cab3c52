"""A study's file paths made absolute in the driver, before any trial starts.

Ray Tune runs each trial in its own working directory (``RAY_CHDIR_TO_TRIAL_DIR``, on by default),
maybe on another node, so ``data.root=hvoc/VOCdevkit`` or a study's ``config: base.yaml`` would name
a different (absent) place there. ``$VARS`` in values are expanded here too: a trial's environment
is not the driver's.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from cssfe.sweep.studies import Study, expand_env

# Config keys that name a file or folder (dotted, as in overrides). Parts of a dataset
# (data.train_images, ...) are relative to data.root and stay as they are.
PATH_KEYS = ("data.root", "model.weights_path", "distributed.deepspeed_config", "cache_dir")
# Text-encoder options that may be local files (vectors, checkpoints, model folders) or names
# (``pretrained: openai``): made absolute only when they exist relative to the driver's directory.
OPTION_PATH_KEYS = ("path", "pretrained", "model")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _absolute(value: Any, cwd: str) -> Any:
    if isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.normpath(os.path.join(cwd, os.path.expanduser(value)))
    return value


def pin_paths(study: Study, cwd: Optional[str] = None) -> Study:
    """``study`` with every relative path of every variant made absolute against ``cwd`` (default:
    the working directory) and environment variables expanded; changed in place and returned."""
    cwd = cwd or os.getcwd()
    study.overrides = expand_env(study.overrides)
    study.variants = {label: expand_env(ov) for label, ov in study.variants.items()}
    if study.config:
        study.config = _absolute(study.config, cwd)
    for label, variant in study.variants.items():
        cfg = study.trial_config(label, study.seeds[0])
        for key in PATH_KEYS:
            value = _get(cfg, key)
            if _absolute(value, cwd) != value:
                variant[key] = _absolute(value, cwd)
        options: Dict[str, Any] = dict(cfg.model.embedding_options)
        changed = {k: _absolute(v, cwd) for k, v in options.items()
                   if k in OPTION_PATH_KEYS and isinstance(v, str) and not os.path.isabs(v)
                   and os.path.exists(os.path.join(cwd, v))}
        if changed:
            variant["model.embedding_options"] = {**options, **changed}
    return study
