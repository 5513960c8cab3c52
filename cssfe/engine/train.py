"""Training: ``train(cfg)``. No argument parsing, no global state.

Writes to ``cfg.output_dir``: ``config.yaml`` (resolved), ``log.jsonl`` (one line per evaluated
epoch), ``checkpoints/last.pt`` and ``checkpoints/best.pt``, and ``metrics.json`` with the final
and best models' metrics. This module builds the run (data, model, optimizer, DeepSpeed); the
loop is :class:`cssfe.engine.trainer.Trainer`, one step :mod:`cssfe.engine.steps`, the
checkpoints :class:`cssfe.engine.run_checkpoint.CheckpointManager`.
"""
from __future__ import annotations

import contextlib
import os
import random
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from cssfe.cache import default_cache_dir
from cssfe.config import ConfigError, TrainConfig, to_dict, validate
from cssfe.data import build_data
from cssfe.data.datasets import check_batch
from cssfe.engine import compiling, distributed, ds_checkpoint, tracking
from cssfe.engine.checkpoint import previous_path
from cssfe.engine.ds_checkpoint import UNIVERSAL_SUFFIX
from cssfe.engine.ema import ModelEMA, PartitionedEMA
from cssfe.engine.run_checkpoint import (  # noqa: F401  (re-exported)
    RESUMABLE_CHANGES,
    CheckpointManager,
    _check_resume_config,
    _ds_checkpoint,
    _ds_resume,
    _flatten,
    _run_checkpoint,
)
from cssfe.engine.sampler import EpochShuffle, seed_rank_streams
from cssfe.engine.steps import DeepSpeedStep, SingleProcessStep, StepResult, _amp_context  # noqa: F401
from cssfe.engine.trainer import Trainer, TrainingDiverged, new_run_state  # noqa: F401  (re-exported)
from cssfe.losses import build_loss
from cssfe.models.model import build_model
from cssfe.ops import kernel_backend


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"config key 'device' asks for {name!r} but CUDA is not available; use device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases, norms, label embeddings and lambda (SPEC: lambda undecayed)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith("embeddings") or name.endswith("lam_raw"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def one_cycle(optimizer, max_lr: float, total_steps: int, pct_start: float):
    """OneCycleLR. A warm-up of exactly one step (``pct_start * total_steps == 1``, e.g. 5 steps at
    0.2) makes torch's first phase end at step 0 and divide by zero: it then lasts two steps."""
    if abs(pct_start * total_steps - 1.0) < 1e-9 and total_steps > 2:
        pct_start = 2.0 / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start)


def train(cfg: TrainConfig, resume: Union[bool, str] = False,
          on_epoch_end: Optional[Callable[[Dict[str, Any]], None]] = None, shared_storage: bool = True) -> Dict[str, Any]:
    """Train ``cfg``; see :func:`_train`. The CSSFE ops run on the ``cfg.kernels`` backend.

    ``on_epoch_end(record)``, if given, receives each epoch's log record (the ``log.jsonl`` line)
    after that epoch's checkpoint is written, e.g. to report metrics to a scheduler.
    ``shared_storage=False`` lets the ranks of a DeepSpeed run see different output folders: for a
    caller that gathers every node's checkpoint files itself before a resume (the Ray sweep).
    """
    validate(cfg)
    tracking.check(cfg)
    with kernel_backend(cfg.kernels):
        return _train(cfg, resume, on_epoch_end, shared_storage)


def _train(cfg: TrainConfig, resume: Union[bool, str] = False,
           on_epoch_end: Optional[Callable[[Dict[str, Any]], None]] = None, shared_storage: bool = True) -> Dict[str, Any]:
    """Train ``cfg`` and return ``{"final": metrics, "best": metrics, "best_epoch": int}``.

    With ``resume``, continue the run in ``cfg.output_dir`` from its last checkpoint (which may be
    in the middle of an epoch); with ``resume="auto"``, continue it if it has one, else start it.
    SIGTERM / SIGINT save a checkpoint at the next step (under DeepSpeed: the next accumulation
    boundary) and raise :class:`TrainingInterrupted`; ``cfg.max_nonfinite_steps`` consecutive non-finite steps raise
    :class:`TrainingDiverged`, leaving the last good checkpoint as it was.
    """
    parts = _build(cfg, resume, shared_storage)
    run = new_run_state()
    if parts.resume:
        parts.checkpoints.resume(run)
    _write_run_files(parts)
    return Trainer(parts, run, on_epoch_end).fit()


def _run_paths(cfg: TrainConfig, resume: Union[bool, str]) -> SimpleNamespace:
    """Where the run writes, whether it resumes and (under DeepSpeed) its checked DeepSpeed config;
    a missing or an unexpected checkpoint is refused before any work."""
    out_dir = cfg.output_dir
    paths = SimpleNamespace(out_dir=out_dir, last_path=os.path.join(out_dir, "checkpoints", "last.pt"),
                            best_path=os.path.join(out_dir, "checkpoints", "best.pt"),
                            ds_dir=os.path.join(out_dir, "checkpoints", "deepspeed"),
                            log_path=os.path.join(out_dir, "log.jsonl"), ds_config=None)
    use_ds = distributed.wanted(cfg)
    if resume == "auto":  # a requeued job: continue the run where it has a complete checkpoint, else start it
        resume = ds_checkpoint.has_checkpoint(out_dir)
    if use_ds:  # the batch arithmetic and the DeepSpeed file are checked before any work
        ds_config = distributed.deepspeed_config(cfg, distributed.world_size())
        ds_checkpoint.check_node_local_storage(ds_config, cfg.distributed.deepspeed_config)
        paths.last_path = paths.ds_dir  # the newest complete tag in it is the run's checkpoint
        if resume and ds_checkpoint.require_tag(paths.ds_dir).endswith(UNIVERSAL_SUFFIX):  # converted by cssfe.engine.reshard
            ds_config["checkpoint"] = {**(ds_config.get("checkpoint") or {}), "load_universal": True}
        paths.ds_config = ds_config
    elif resume and not (os.path.isfile(paths.last_path) or os.path.isfile(previous_path(paths.last_path))):
        raise FileNotFoundError(f"--resume: no checkpoint at {paths.last_path}")
    if not resume and (ds_checkpoint.newest_complete_tag(paths.ds_dir) if use_ds else os.path.exists(paths.last_path)):
        raise FileExistsError(
            f"{out_dir} already holds a run ({paths.last_path}); pass --resume to continue it or choose another --output-dir"
        )
    paths.use_ds, paths.resume = use_ds, resume
    return paths


def _start_process(cfg: TrainConfig, use_ds: bool):
    """The device and the process group (a world of one without DeepSpeed)."""
    device = select_device(cfg.device)
    ctx = distributed.Context()
    if use_ds:
        distributed.check_precision(cfg.distributed.precision, device.type)
        if cfg.distributed.sync_batchnorm and device.type != "cuda":  # torch's SyncBatchNorm: GPUs only
            raise ConfigError(f"config key 'distributed.sync_batchnorm': SyncBatchNorm runs on GPU ranks only, "
                              f"not on {device.type}; set distributed.sync_batchnorm=false")
        ctx = distributed.init(device.type, cfg.distributed.timeout_s)
        if device.type == "cuda":
            if device.index is None:  # an explicit cuda:N is the launcher's choice (Ray Train's get_device())
                device = distributed.rank_device(ctx.local_rank)
            torch.cuda.set_device(device)
    return device, ctx


def _build_model(cfg: TrainConfig, parts: SimpleNamespace) -> None:
    """The data, the loss, the model and its EMA copy (rank 0 fills the caches first)."""
    ctx, device = parts.ctx, parts.device
    cache_dir = cfg.cache_dir or default_cache_dir()
    seed_everything(cfg.seed)
    # Rank 0 fills the dataset and embedding caches first; the others then read them.
    if ctx.world_size > 1 and not ctx.main:
        torch.distributed.barrier()
    data = build_data(cfg.data, cache_dir, progress=parts.show)
    # kernels other than "reference": the loss goes through the fused op too, where it has one (ASL)
    loss_fn = build_loss(cfg.loss.name, data.class_freq, len(data.train), fused=cfg.kernels != "reference",
                         **cfg.loss.params)
    model = build_model(cfg.model, data.class_names, data.groups, cfg.data.image_size, cache_dir).to(device)
    if ctx.world_size > 1 and ctx.main:
        torch.distributed.barrier()
    seed_rank_streams(cfg.seed, ctx.rank)  # the same model on every rank; augmentations of their own
    ema = ModelEMA(model, cfg.optim.ema_decay)  # before DeepSpeed: ZeRO-3 partitions the model's parameters
    if parts.use_ds and cfg.distributed.sync_batchnorm:  # the EMA copy keeps plain batch norm (same state_dict)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.compile:  # in place, after the EMA copy (each compiles its own graph); state_dict keys unchanged
        compiling.compile_for_training(model, ema.module, loss_fn, cfg.compile_mode)
    parts.data, parts.loss_fn, parts.model, parts.ema = data, loss_fn, model, ema


def _build_loaders(cfg: TrainConfig, parts: SimpleNamespace) -> None:
    """The train loader (this rank's micro-batches), the test loader (this rank's shard) and the step counts."""
    ctx, data, use_ds = parts.ctx, parts.data, parts.use_ds
    batch_size = cfg.data.batch_size
    parts.micro = parts.ds_config["train_micro_batch_size_per_gpu"] if use_ds else batch_size
    parts.accum = cfg.distributed.grad_accum if use_ds else 1
    check_batch(data, batch_size, strict=use_ds)  # DeepSpeed's batch is fixed; otherwise said, and trained
    parts.sampler = EpochShuffle(len(data.train), cfg.seed, ctx.rank, ctx.world_size, parts.micro)
    parts.train_loader = DataLoader(
        data.train,
        batch_size=parts.micro,
        sampler=parts.sampler,
        generator=torch.Generator(),  # the loader's own seed draw stays off the global RNG
        drop_last=len(data.train) > batch_size,  # no size-1 batch for batch norm
        num_workers=cfg.data.num_workers,
        pin_memory=parts.device.type == "cuda",
    )
    test_set = data.test
    if ctx.world_size > 1:  # each rank scores its own contiguous shard; no padded duplicates
        test_set = torch.utils.data.Subset(data.test, distributed.shard_range(len(data.test), ctx.rank, ctx.world_size))
    parts.test_loader = DataLoader(test_set, batch_size=cfg.data.eval_batch_size, shuffle=False,
                                   num_workers=cfg.data.num_workers)
    parts.gather = distributed.gather_predictions if ctx.world_size > 1 else None
    parts.optimizer_steps = len(data.train) // batch_size if len(data.train) > batch_size else 1
    parts.steps_per_epoch = parts.optimizer_steps * parts.accum  # loader iterations (micro-batches) per epoch


def _build_optimization(cfg: TrainConfig, parts: SimpleNamespace) -> None:
    """The optimizer, the schedule, AMP or DeepSpeed, and the step that uses them."""
    model, ctx, use_ds = parts.model, parts.ctx, parts.use_ds
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    scheduler = one_cycle(optimizer, cfg.optim.lr, cfg.optim.epochs * parts.optimizer_steps, cfg.optim.pct_start)
    autocast, scaler = _amp_context(parts.device, cfg.optim.amp)
    engine = None
    if use_ds:
        import deepspeed

        autocast, scaler = contextlib.nullcontext, None  # DeepSpeed's own precision (distributed.precision)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=parts.ds_config)
        model = engine.module
    parts.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.distributed.precision) if use_ds else None
    parts.zero3 = distributed.zero3(parts.ds_config)  # parameters partitioned: read them only inside distributed.gathered
    if parts.zero3:  # each rank averages its partition of the fp32 master weights; gathered only to be read
        parts.ema = PartitionedEMA(parts.ema, model)
    if engine is None:
        parts.step = SingleProcessStep(model, parts.ema, optimizer, scheduler, scaler, cfg.optim.grad_clip)
    else:
        # Sum-reduced losses: DeepSpeed averages gradients over ranks and accumulation steps, one
        # process sums over the global batch; scaling the micro-batch loss makes the two agree.
        sums = getattr(parts.loss_fn, "reduction", "sum") == "sum"
        loss_scale = float(ctx.world_size * parts.accum) if sums else 1.0
        parts.step = DeepSpeedStep(engine, model, parts.ema, loss_scale, parts.device, parts.zero3)
    parts.model, parts.engine, parts.optimizer, parts.scheduler, parts.autocast = model, engine, optimizer, scheduler, autocast
    parts.checkpoints = CheckpointManager(cfg, ctx, parts.data, model, parts.ema, optimizer, scheduler, scaler, engine,
                                          parts.last_path, parts.best_path, parts.ds_dir)


def _build(cfg: TrainConfig, resume: Union[bool, str], shared_storage: bool) -> SimpleNamespace:
    """Everything a :class:`Trainer` runs, checked and built in order."""
    parts = _run_paths(cfg, resume)
    parts.cfg = cfg
    parts.device, parts.ctx = _start_process(cfg, parts.use_ds)
    parts.show = cfg.progress and parts.ctx.main  # rank 0 alone prints progress
    if shared_storage:
        ds_checkpoint.check_shared(parts.ds_dir, parts.ctx)  # every rank reads rank 0's checkpoint files
    _build_model(cfg, parts)
    _build_loaders(cfg, parts)
    _build_optimization(cfg, parts)
    return parts


def _write_run_files(parts: SimpleNamespace) -> None:
    """config.yaml, the skipped images, the ranks' log folder and the step trackers."""
    cfg, ctx, out_dir = parts.cfg, parts.ctx, parts.out_dir
    os.makedirs(out_dir, exist_ok=True)
    if ctx.main:
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    if parts.data.skipped and ctx.main:
        with open(os.path.join(out_dir, "skipped_images.txt"), "w") as f:
            f.writelines(f"{path}\t{reason}\n" for path, reason in parts.data.skipped)
    parts.rank_log = None
    if parts.use_ds:  # every rank logs to its own file
        os.makedirs(os.path.join(out_dir, "ranks"), exist_ok=True)
        parts.rank_log = os.path.join(out_dir, "ranks", f"rank{ctx.rank}.log")
    parts.tracker = tracking.open_run_tracker(cfg, out_dir, ctx.main)  # rank 0 alone writes event files
