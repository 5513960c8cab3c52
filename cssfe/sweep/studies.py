"""Studies: named sets of config variants to train over several seeds, read from YAML files.

A study file (``configs/sweeps/<name>.yaml``) is data::

    title: Loss functions (supplement Table 1)   # table heading and chart title
    config: null                  # base config file; null: the built-in defaults
    overrides: {optim.epochs: 40} # dotted key -> value, applied to every trial
    seeds: [0, 1, 2]              # a sweep dimension like the variants
    variants:                     # label -> overrides of that variant (may be empty)
      ASL: {loss.name: asl}
      BCE: {loss.name: bce}
    grid:                         # and/or: every combination of these values becomes a variant
      model.dim: [64, 128]
    paired_against: ASL           # optional: the report adds each variant's per-seed differences to this one

String values may name environment variables (``$GLOVE_VECTORS``): a file that lives in a
different place on every machine is then given without editing the study.
"""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from cssfe.config import ADDED_KEYS, ConfigError, TrainConfig, load_config

# Studies shipped with the repository (configs/sweeps/ beside the package).
STUDY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "sweeps")
_STUDY_KEYS = {"title", "config", "overrides", "seeds", "variants", "grid", "paired_against"}


@dataclass
class Study:
    name: str
    title: str
    config: Optional[str]  # base config file or None for the built-in defaults
    overrides: Dict[str, Any]
    seeds: List[int]
    variants: Dict[str, Dict[str, Any]]  # label -> dotted-key overrides, in the study's order
    source: Optional[str] = None  # the YAML file it was read from
    skipped: Dict[str, str] = field(default_factory=dict)  # label -> why it cannot run here
    paired_against: Optional[str] = None  # the variant the report pairs every other one with, seed by seed

    def override_list(self, variant: str, seed: int, *extra: str) -> List[str]:
        """``key=value`` strings for one trial: study-wide, then the variant's, then the seed and ``extra``."""
        items = {**self.overrides, **self.variants[variant]}
        return [_as_override(k, v) for k, v in items.items()] + [f"seed={seed}", *extra]

    def trial_config(self, variant: str, seed: int, *extra: str) -> TrainConfig:
        return load_config(self.config, self.override_list(variant, seed, *extra))

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "title": self.title, "config": self.config, "overrides": self.overrides,
                "seeds": self.seeds, "variants": self.variants, "skipped": self.skipped,
                "paired_against": self.paired_against}

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "Study":
        return cls(**values)


def expand_env(value: Any) -> Any:
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    return value


def _as_override(key: str, value: Any) -> str:
    # JSON is valid YAML, so cssfe.config.parse_override reads the value back unchanged.
    return f"{key}={json.dumps(expand_env(value))}"


def trial_key(variant: str, seed: int) -> str:
    """A readable name for one trial: the variant label made file-safe, and the seed."""
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", variant).strip("_") or "variant"
    return f"{slug}_s{seed}"




def config_hash(cfg: TrainConfig) -> str:
    """A digest of what changes a run's numbers (not where it writes, its cache or its console):
    trials of the same config in different studies share one run folder, and train once."""
    import hashlib

    from cssfe.config import to_dict
    from cssfe.engine.train import RESUMABLE_CHANGES

    def strip(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
        out = {}
        for k, v in d.items():
            if prefix + k in RESUMABLE_CHANGES or (prefix + k in ADDED_KEYS and v == ADDED_KEYS[prefix + k]):
                continue
            if isinstance(v, dict) and k not in ("params", "embedding_options"):
                v = strip(v, f"{prefix}{k}.")
                if not v:  # a section of console / resumable keys only (logging) leaves no trace
                    continue
            out[k] = v
        return out

    blob = json.dumps(strip(to_dict(cfg)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def available_studies() -> List[str]:
    if not os.path.isdir(STUDY_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(STUDY_DIR) if f.endswith(".yaml"))


def study_path(name_or_path: str) -> str:
    """A study's YAML file: a path as given, else ``configs/sweeps/<name>.yaml``."""
    if os.path.isfile(name_or_path):
        return name_or_path
    path = os.path.join(STUDY_DIR, f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"unknown study {name_or_path!r}: not a file and not one of: {', '.join(available_studies())}")
    return path


def _grid_variants(grid: Dict[str, Sequence[Any]]) -> Dict[str, Dict[str, Any]]:
    keys = list(grid)
    if not keys:
        return {}
    for k in keys:
        if not isinstance(grid[k], (list, tuple)) or not grid[k]:
            raise ConfigError(f"study grid key {k!r} must be a non-empty list of values")
    out = {}
    for values in itertools.product(*(grid[k] for k in keys)):
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
        out[label] = dict(zip(keys, values))
    return out


def load_study(name_or_path: str, seeds: Optional[Sequence[int]] = None, overrides: Sequence[str] = (),
               variants: Optional[Sequence[str]] = None, paired_against: Optional[str] = None) -> Study:
    """Read a study; ``seeds``, ``overrides`` (``key=value``, for every trial), a subset of
    ``variants`` (labels) and the variant to pair the others with (``paired_against``) replace or
    narrow what the file says. Every trial's config is validated here, so a wrong key fails before
    anything is scheduled."""
    path = study_path(name_or_path)
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    unknown = sorted(set(raw) - _STUDY_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown study key {unknown[0]!r}; valid keys: {', '.join(sorted(_STUDY_KEYS))}")
    found = {label: dict(ov or {}) for label, ov in (raw.get("variants") or {}).items()}
    found.update(_grid_variants(raw.get("grid") or {}))
    if not found:
        raise ConfigError(f"{path}: a study needs 'variants' or 'grid'")
    paired_against = paired_against if paired_against is not None else raw.get("paired_against")
    if paired_against is not None and paired_against not in found:
        raise ConfigError(f"{path}: paired_against {paired_against!r} is not a variant; the study has: {', '.join(found)}")
    if variants:
        missing = [v for v in variants if v not in found]
        if missing:
            raise ConfigError(f"{path}: no variant {missing[0]!r}; the study has: {', '.join(found)}")
        found = {v: found[v] for v in variants}
    common = dict(raw.get("overrides") or {})
    for item in overrides:
        key, _, value = item.partition("=")
        common[key.strip()] = yaml.safe_load(value) if value != "" else ""
    name = os.path.splitext(os.path.basename(path))[0]
    config = raw.get("config")
    if config and not os.path.isabs(config) and not os.path.isfile(config):  # a shipped config: from the repository root
        config = os.path.join(os.path.dirname(os.path.dirname(STUDY_DIR)), config)
    study = Study(name=name, title=str(raw.get("title") or name), config=config, overrides=common,
                  seeds=[int(s) for s in (seeds if seeds is not None else raw.get("seeds") or [0])],
                  variants=found, source=path, paired_against=paired_against)
    seen: Dict[str, str] = {}
    for label in study.variants:  # fail now, naming the variant, rather than inside a trial
        try:
            digest = config_hash(study.trial_config(label, study.seeds[0]))
        except ConfigError as exc:
            raise ConfigError(f"{path}: variant {label!r}: {exc}") from None
        if digest in seen:  # two labels for one model would train into one folder
            raise ConfigError(f"{path}: variants {seen[digest]!r} and {label!r} give the same config")
        seen[digest] = label
    return study
