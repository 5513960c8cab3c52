"""Training configuration: typed dataclasses, YAML loading, ``key=value`` overrides, validation.

A config is data. Every key has a type and a default here; a YAML file or an override that names
a key that does not exist, or gives a value of the wrong type, fails with the key's full name
before any work starts.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A configuration key, type or value is wrong; the message names the key."""


# torch.compile modes (cssfe.engine.compiling): inductor's own names
COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")


@dataclass
class DataConfig:
    name: str = "bundled"  # dataset registry name: bundled | bundled_coco | split_folder | lt_voc | lt_coco | odir5k | voc | coco
    root: Optional[str] = None  # dataset folder; for the bundled datasets, where it is generated (default: cache)
    # Parts of an annotated dataset (lt_voc, lt_coco, odir5k, voc, coco), relative to root; null:
    # the dataset's default place (docs/datasets.md).
    train_images: Optional[str] = None  # image folder (VOC: the folder with JPEGImages and Annotations)
    test_images: Optional[str] = None
    train_annotations: Optional[str] = None  # COCO instances JSON; ODIR-5K table (.xlsx or .csv)
    test_annotations: Optional[str] = None
    train_list: Optional[str] = None  # image ids, one per line, or "path idx idx ..." lines
    test_list: Optional[str] = None
    split_dir: Optional[str] = None  # class_freq.pkl and class_split.pkl (default: beside train_list)
    test_fraction: float = 0.2  # ODIR-5K without lists: share of patients held out for testing
    image_size: int = 64
    batch_size: int = 32
    eval_batch_size: int = 128
    num_workers: int = 0
    seed: int = 0  # the bundled dataset's generation seed (fixed: it defines the dataset); ODIR-5K's patient split
    head_min: int = 100  # a class with at least this many training positives is head
    tail_max: int = 20  # a class with fewer than this many training positives is tail
    augment: str = "digits"  # none | digits | natural (see cssfe/data/transforms.py)
    check_images: bool = True  # decode every image once before training
    on_bad_image: str = "skip"  # skip: leave unreadable images out and say so | error: stop


@dataclass
class ModelConfig:
    backbone: str = "smallcnn"
    pretrained: bool = False
    weights_path: Optional[str] = None  # local backbone weights, used instead of a download
    head: str = "cssfe"  # cssfe | cprfl | baseline
    embedding: str = "minilm"  # text encoder: rie | minilm | clip
    embedding_options: Dict[str, Any] = field(default_factory=dict)
    prompt: str = "a photo of {}."
    dim: int = 128  # d, the width of queries, keys and values
    enhance: bool = True
    # how the enhancement transfers (cssfe/models/enhance_forms.py, docs/method.md): published | stage_lambda | presence | sharpen
    enhance_form: str = "published"
    mask: bool = True
    global_branch: bool = True
    gate: str = "uncertainty"  # uncertainty: 1 - |2p - 1| | absence: 1 - p
    tau: float = 0.1  # temperature of the semantic affinity
    aux_weight: float = 0.5  # weight of the loss on first-pass logits
    head_options: Dict[str, Any] = field(default_factory=dict)  # cprfl: depth, heads, dropout, stop_*_grad... (docs/method.md)


@dataclass
class LossConfig:
    name: str = "asl"
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    epochs: int = 40
    lr: float = 2e-3
    weight_decay: float = 1e-4
    pct_start: float = 0.2
    grad_clip: float = 10.0
    ema_decay: float = 0.99
    amp: str = "auto"  # auto (on for CUDA) | on | off


@dataclass
class DistributedConfig:
    """Used when a launcher (deepspeed, torchrun) started the process, or when deepspeed_config is set.
    data.batch_size is then the global batch: micro-batch x grad_accum x world size."""

    deepspeed_config: Optional[str] = None  # DeepSpeed JSON/YAML (configs/deepspeed/zero{1,2,3}.yaml); null: ZeRO stage 0
    zero_stage: Optional[int] = None  # overrides the file's zero_optimization.stage: 0 | 1 | 2 | 3
    precision: str = "fp32"  # fp32 | bf16 | fp16 (DeepSpeed's mixed precision; optim.amp does not apply)
    grad_accum: int = 1  # micro-batches per optimizer step
    # seconds a rank waits in a collective, the start-up wait for rank 0's data and caches included;
    # null: DeepSpeed's 10 minutes (DEEPSPEED_TIMEOUT). Run launch/prepare_data.py first to keep that wait short.
    timeout_s: Optional[float] = None
    sync_batchnorm: bool = False  # batch norm over the global batch (SyncBatchNorm; GPU ranks only)


@dataclass
class LoggingConfig:
    """What a run reports besides ``log.jsonl``; none of it changes the numbers."""

    log_level: str = "info"  # console messages of the command-line tools: debug | info | warning | error
    tensorboard: bool = True  # event files in <output_dir>/tensorboard/
    wandb: bool = False  # Weights & Biases (needs the wandb package; WANDB_MODE=offline honoured)
    wandb_project: str = "cssfe"
    step_every: int = 1  # per-step scalars every this many optimizer steps


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    kernels: str = "auto"  # backend of the CSSFE ops: auto | reference | cpu | cuda | triton (see cssfe/ops)
    compile: bool = False  # torch.compile the model and the loss, for training and evaluation (docs/performance.md)
    compile_mode: str = "default"  # default | max-autotune | reduce-overhead (CUDA graphs)
    output_dir: str = "runs/default"
    eval_every: int = 1
    # also checkpoint inside epochs, every this many micro-batches (a multiple of distributed.grad_accum; 0: at epoch ends only)
    checkpoint_every_steps: int = 0
    max_nonfinite_steps: int = 5  # stop after this many consecutive non-finite steps
    progress: bool = True
    cache_dir: Optional[str] = None  # datasets and embeddings cache (default $CSSFE_CACHE or ~/.cache/cssfe)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


Config = TrainConfig


# Keys added after runs were trained, with the value that means what their absence meant: run digests
# (cssfe.sweep.studies.config_hash) leave them out at that value, so those runs keep their folders.
ADDED_KEYS: Dict[str, Any] = {"model.head_options": {}, "model.enhance_form": "published",
                              "distributed.sync_batchnorm": False}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, prefix=key + ".")
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if origin in (list, List, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is Any:
        return value
    if tp is str and isinstance(value, bool):  # YAML 1.1 reads on/off (optim.amp's values) as booleans
        return "on" if value else "off"
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _from_dict(cls: Any, values: Dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys under '{prefix or '<top>'}': "
            + ", ".join(sorted(names))
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(values: Dict[str, Any]) -> TrainConfig:
    cfg = _from_dict(TrainConfig, values or {})
    validate(cfg)
    return cfg


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("params", "embedding_options"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> Dict[str, Any]:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}``, the value parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    out: Dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    values: Dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        values = loaded
    for item in overrides:
        values = _merge(values, parse_override(item))
    try:
        return from_dict(values)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """A new config: ``cfg`` with ``key=value`` overrides applied and validated."""
    values = to_dict(cfg)
    for item in overrides:
        values = _merge(values, parse_override(item))
    return from_dict(values)


def validate(cfg: TrainConfig) -> None:
    """Check values and registry names; raises ConfigError naming the key."""
    # Imported here: the registries import torch models, which the YAML layer does not need.
    from cssfe.data import DATASETS
    from cssfe.data.transforms import AUGMENTATIONS
    from cssfe.losses import LOSSES
    from cssfe.models.backbones import BACKBONES
    from cssfe.models.enhance_forms import ENHANCE_FORMS
    from cssfe.models.heads import HEADS
    from cssfe.models.text_encoders import TEXT_ENCODERS

    def check_name(key: str, name: str, registry: Any) -> None:
        if name not in registry:
            raise ConfigError(f"config key '{key}': unknown name {name!r}; choose one of: {', '.join(registry.names())}")

    check_name("data.name", cfg.data.name, DATASETS)
    check_name("model.backbone", cfg.model.backbone, BACKBONES)
    check_name("model.head", cfg.model.head, HEADS)
    check_name("model.enhance_form", cfg.model.enhance_form, ENHANCE_FORMS)
    check_name("model.embedding", cfg.model.embedding, TEXT_ENCODERS)
    check_name("loss.name", cfg.loss.name, LOSSES)
    check_name("data.augment", cfg.data.augment, AUGMENTATIONS)

    def positive(key: str, value: float, strict: bool = True) -> None:
        if (value <= 0) if strict else (value < 0):
            raise ConfigError(f"config key '{key}' must be {'>' if strict else '>='} 0, got {value}")

    positive("data.image_size", cfg.data.image_size)
    positive("data.batch_size", cfg.data.batch_size)
    positive("data.eval_batch_size", cfg.data.eval_batch_size)
    positive("data.num_workers", cfg.data.num_workers, strict=False)
    positive("model.dim", cfg.model.dim)
    positive("model.tau", cfg.model.tau)
    positive("model.aux_weight", cfg.model.aux_weight, strict=False)
    positive("optim.epochs", cfg.optim.epochs)
    positive("optim.lr", cfg.optim.lr)
    positive("optim.weight_decay", cfg.optim.weight_decay, strict=False)
    positive("optim.grad_clip", cfg.optim.grad_clip, strict=False)
    positive("eval_every", cfg.eval_every)
    positive("checkpoint_every_steps", cfg.checkpoint_every_steps, strict=False)
    positive("max_nonfinite_steps", cfg.max_nonfinite_steps)
    if not 0 < cfg.optim.pct_start < 1:
        raise ConfigError(f"config key 'optim.pct_start' must be in (0, 1), got {cfg.optim.pct_start}")
    if not 0 <= cfg.optim.ema_decay < 1:
        raise ConfigError(f"config key 'optim.ema_decay' must be in [0, 1), got {cfg.optim.ema_decay}")
    if cfg.data.tail_max > cfg.data.head_min:
        raise ConfigError(
            f"config keys 'data.tail_max' ({cfg.data.tail_max}) must not exceed 'data.head_min' ({cfg.data.head_min})"
        )
    if cfg.kernels not in ("auto", "reference", "cpu", "cuda", "triton"):
        raise ConfigError(f"config key 'kernels' must be auto, reference, cpu, cuda or triton, got {cfg.kernels!r}")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"config key 'compile_mode' must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile_mode!r}")
    if not 0 < cfg.data.test_fraction < 1:
        raise ConfigError(f"config key 'data.test_fraction' must be in (0, 1), got {cfg.data.test_fraction}")
    if cfg.data.on_bad_image not in ("skip", "error"):
        raise ConfigError(f"config key 'data.on_bad_image' must be 'skip' or 'error', got {cfg.data.on_bad_image!r}")
    if cfg.model.gate not in ("uncertainty", "absence"):
        raise ConfigError(f"config key 'model.gate' must be 'uncertainty' or 'absence', got {cfg.model.gate!r}")
    if cfg.optim.amp not in ("auto", "on", "off"):
        raise ConfigError(f"config key 'optim.amp' must be auto, on or off, got {cfg.optim.amp!r}")
    if cfg.model.enhance_form != ModelConfig.enhance_form:  # a form of the CSSFE head's enhancement
        if cfg.model.head != "cssfe" or not cfg.model.enhance:
            raise ConfigError(f"config key 'model.enhance_form' ({cfg.model.enhance_form!r}) applies to model.head=cssfe "
                              f"with model.enhance=true, not model.head={cfg.model.head!r}, model.enhance={cfg.model.enhance}")
    if cfg.model.head_options:  # only CPRFL takes head options
        if cfg.model.head != "cprfl":
            raise ConfigError(f"config key 'model.head_options' applies to model.head=cprfl, not {cfg.model.head!r}")
        from cssfe.models.cprfl import check_options

        check_options(cfg.model.head_options)
    if "{}" not in cfg.model.prompt and "{class}" not in cfg.model.prompt:
        raise ConfigError(f"config key 'model.prompt' must contain '{{}}' or '{{class}}' for the class name, got {cfg.model.prompt!r}")
    if cfg.model.weights_path is not None and not os.path.isfile(cfg.model.weights_path):
        raise ConfigError(f"config key 'model.weights_path': file not found: {cfg.model.weights_path}")
    if cfg.distributed.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"config key 'distributed.precision' must be fp32, bf16 or fp16, got {cfg.distributed.precision!r}")
    if cfg.distributed.zero_stage is not None and cfg.distributed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'distributed.zero_stage' must be 0, 1, 2 or 3, got {cfg.distributed.zero_stage}")
    positive("distributed.grad_accum", cfg.distributed.grad_accum)
    if cfg.distributed.timeout_s is not None:
        positive("distributed.timeout_s", cfg.distributed.timeout_s)
    if cfg.checkpoint_every_steps % cfg.distributed.grad_accum:  # DeepSpeed keeps no half-accumulated window
        raise ConfigError(f"config key 'checkpoint_every_steps' ({cfg.checkpoint_every_steps}, in micro-batches) must be a "
                          f"multiple of distributed.grad_accum ({cfg.distributed.grad_accum}): checkpoints fall on "
                          "accumulation boundaries")
    if cfg.distributed.deepspeed_config is not None and not os.path.isfile(cfg.distributed.deepspeed_config):
        raise ConfigError(f"config key 'distributed.deepspeed_config': file not found: {cfg.distributed.deepspeed_config}")
    if cfg.logging.log_level not in LOG_LEVELS:
        raise ConfigError(f"config key 'logging.log_level' must be one of {', '.join(LOG_LEVELS)}, got {cfg.logging.log_level!r}")
    positive("logging.step_every", cfg.logging.step_every)
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
