"""Single-process training: ``train(cfg)``. No argument parsing, no global state.

Writes to ``cfg.output_dir``: ``config.yaml`` (resolved), ``log.jsonl`` (one line per evaluated
epoch), ``checkpoints/last.pt`` and ``checkpoints/best.pt``, and ``metrics.json`` with the final
and best models' metrics.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from cssfe.cache import default_cache_dir
from cssfe.config import ConfigError, TrainConfig, to_dict, validate
from cssfe.data import GROUP_NAMES, build_data
from cssfe.data.datasets import check_batch
from cssfe.engine import compiling, distributed, ds_checkpoint, tracking
from cssfe.engine.checkpoint import load_checkpoint, load_latest, previous_path, rng_state, save_checkpoint, set_rng_state
from cssfe.engine.ds_checkpoint import CONSOLIDATED_MODEL, UNIVERSAL_SUFFIX, client_path
from cssfe.engine.ema import ModelEMA, PartitionedEMA
from cssfe.engine.evaluate import evaluate, format_table
from cssfe.engine.sampler import EpochShuffle, seed_loader_workers, seed_rank_streams
from cssfe.engine.signals import StopRequest, TrainingInterrupted
from cssfe.losses import build_loss
from cssfe.models.model import build_model
from cssfe.ops import kernel_backend

# Keys that may differ between a run and its resumption: they do not change the numbers.
RESUMABLE_CHANGES = {
    "progress", "device", "eval_every", "output_dir", "cache_dir", "checkpoint_every_steps", "max_nonfinite_steps",
    "data.num_workers", "data.eval_batch_size", "data.check_images", "data.on_bad_image",
    "logging.log_level", "logging.tensorboard", "logging.wandb", "logging.wandb_project", "logging.step_every",
    "compile", "compile_mode",
    "distributed.timeout_s",  # how long a rank waits in a collective: not what it computes
}

logger = logging.getLogger(__name__)


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


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("params", "embedding_options"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _check_resume_config(saved: Dict[str, Any], cfg: TrainConfig, path: str) -> None:
    """Refuse to resume with another config. A key the run's config lacks was added to cssfe after
    the run started: it counts as its default (what the run trained with)."""
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    old = {**{k: v for k, v in _flatten(to_dict(TrainConfig())).items() if k not in old}, **old}
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {path}: the config differs from the run's ({details})")


def _amp_context(device: torch.device, amp: str):
    enabled = amp == "on" or (amp == "auto" and device.type == "cuda")
    if not enabled:
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _metric_rows(metrics: Dict[str, Any], label: str) -> Dict[str, Dict[str, float]]:
    rows = {label: metrics["mAP"]}
    if "first_pass_mAP" in metrics:
        rows[f"{label} (1st pass)"] = metrics["first_pass_mAP"]
    return rows


def _as_float(value) -> Optional[float]:
    return None if value is None else float(value)


def _head_scalars(model: torch.nn.Module, aux_loss: Optional[torch.Tensor], lam: bool = True) -> Dict[str, float]:
    """Per-step scalars of the CSSFE head: lambda and the first-pass loss, where the head has them."""
    out = {}
    if lam and hasattr(model.head, "lam"):
        out["lambda"] = float(model.head.lam.detach().float())
    if aux_loss is not None:
        out["first_pass_loss"] = aux_loss.item()
    return out


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def _run_checkpoint(model, ema, optimizer, scheduler, scaler, cfg, data, progress: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "model": model.state_dict(),
        "ema": ema.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        **progress,
        "config": to_dict(cfg),
        "class_names": data.class_names,
        "groups": data.groups.tolist(),
        "class_freq": data.class_freq.tolist(),
    }


# ----------------------------------------------------------------------------- DeepSpeed steps and checkpoints
def _ds_step(engine, loss, loss_scale, run, signum, update_ema, consecutive_bad, device):
    """One micro-batch under DeepSpeed. The ranks agree (one all-reduce) on the global batch's loss
    and on whether any of them got a stop signal, so they all skip or all stop together.
    Returns (consecutive non-finite steps, agreed signal number or 0, the global micro-batch loss)."""
    import torch.distributed as dist

    # one host read per micro-batch, after the all-reduce: the skip decision needs the global loss
    flags = torch.stack([loss.detach().to(torch.float64), torch.tensor(1.0 if signum else 0.0, dtype=torch.float64, device=device)])
    dist.all_reduce(flags)
    total, stops = flags.tolist()
    # The window is ours (run["step"]), not DeepSpeed's micro-step count, which a resume resets and
    # a skipped micro-batch would leave behind: windows stay where an uninterrupted run has them.
    boundary = (run["step"] + 1) % engine.gradient_accumulation_steps() == 0
    finite = math.isfinite(total)
    if finite or (boundary and run.get("window_good", 0)):
        engine.set_gradient_accumulation_boundary(boundary)
        if finite:
            engine.backward(loss * loss_scale)
        else:  # a non-finite micro-batch that closes a window adds zero to the window's other gradients
            _backward_zero(engine)
        engine.step()  # optimizer, clipping, zeroing and the LR schedule at accumulation boundaries
        if boundary:
            update_ema()
    run["window_good"] = 0 if boundary else run.get("window_good", 0) + finite
    if finite:
        run["loss_sum"] += total
        run["good_steps"] += 1
        consecutive_bad = 0
    else:  # never apply a non-finite update: every rank skips this micro-batch
        run["skipped_steps"] += 1
        consecutive_bad += 1
    return consecutive_bad, (signum or 15) if stops else 0, total


def _backward_zero(engine) -> None:
    """A backward that adds exactly zero to every gradient (built from the weights, not from a
    forward that may hold non-finite values), so that DeepSpeed still closes the window."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    with distributed.gathered(params, engine.zero_optimization_partition_weights()):
        engine.backward(sum((p * 0).sum() for p in params))


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _peak_memory(device: torch.device) -> Dict[str, Optional[int]]:
    """This process's peak memory: resident, virtual (VmPeak: also allocations never touched, such
    as DeepSpeed's communication buckets on CPU ranks) and, on a GPU, what torch allocated."""
    vm = None
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            vm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmPeak:")), None)
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_rss_bytes": _peak_rss_bytes(), "peak_vm_bytes": vm, "peak_gpu_bytes": gpu}


def _ds_checkpoint(engine, ds_dir: str, ctx, client: Dict[str, Any]) -> None:
    """Every rank writes its own state (RNG, position; rank 0 also the EMA weights) into the tag
    folder, DeepSpeed the model and optimizer shards; after a barrier rank 0 marks the tag complete
    and points ``latest`` at it (:mod:`cssfe.engine.ds_checkpoint`): a run killed at any moment
    resumes from the newest complete tag. Tags older than the previous complete one are removed."""
    import torch.distributed as dist

    run = client["run"]
    tag = ds_checkpoint.tag_name(run["epoch"], run["step"])
    if ctx.main:
        ds_checkpoint.clear_tag(ds_dir, tag)
    dist.barrier()  # no rank writes into the tag before a leftover of it is gone
    save_checkpoint(client, client_path(ds_dir, tag, ctx.rank))
    if engine.zero_optimization_partition_weights():
        # ZeRO-3: the model file below holds placeholders; with stage3_gather_16bit_weights_on_model_save
        # DeepSpeed gathers the weights (in the training precision) into one file (all ranks take part)
        engine.save_16bit_model(os.path.join(ds_dir, tag), CONSOLIDATED_MODEL)
    # universal_checkpoint_info lets DeepSpeed's ds_to_universal convert the tag (resume at another world size)
    engine.save_checkpoint(ds_dir, tag=tag, save_latest=False,  # latest: written with the completion marker
                           client_state={"world_size": ctx.world_size,
                                         "universal_checkpoint_info": {"universal_checkpoint_version": 0.4}})
    dist.barrier()  # every rank's files are on disk
    if ctx.main:
        ds_checkpoint.mark_complete(ds_dir, tag, ctx.world_size)
        ds_checkpoint.prune(ds_dir)


def _ds_resume(engine, ds_dir: str, cfg: TrainConfig, ctx) -> Dict[str, Any]:
    """Load the newest complete DeepSpeed checkpoint; returns this rank's cssfe state with rank 0's
    EMA weights (a rank that did not exist when it was written gets rank 0's state, without its
    random state)."""

    tag = ds_checkpoint.require_tag(ds_dir)
    main = load_checkpoint(client_path(ds_dir, tag, 0))
    written_by = main["world_size"]
    if (written_by != ctx.world_size and not tag.endswith(UNIVERSAL_SUFFIX)
            and not ds_checkpoint.world_size_free(os.path.join(ds_dir, tag))):
        raise ValueError(
            f"cannot resume {ds_dir} with {ctx.world_size} ranks: checkpoint {tag} was written by {written_by}. "
            f"Resume with {written_by} ranks, or convert it first: python -m cssfe.engine.reshard {os.path.dirname(os.path.dirname(ds_dir))}")
    saved = main
    if 0 < ctx.rank < written_by:  # this rank's own RNG state and position
        saved = load_checkpoint(client_path(ds_dir, tag, ctx.rank))
    elif ctx.rank > 0:  # a rank the checkpoint did not have: rank 0's position, the seeded random state
        saved = {**main, "rng": None}
    _check_resume_config(saved["config"], cfg, ds_dir)
    load_path, _ = engine.load_checkpoint(ds_dir, tag=tag)
    if load_path is None:
        raise FileNotFoundError(f"--resume: DeepSpeed found no checkpoint {tag} in {ds_dir}")
    return {**saved, "ema": main["ema"]}  # written once, by rank 0


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
    out_dir = cfg.output_dir
    last_path = os.path.join(out_dir, "checkpoints", "last.pt")
    best_path = os.path.join(out_dir, "checkpoints", "best.pt")
    ds_dir = os.path.join(out_dir, "checkpoints", "deepspeed")
    use_ds = distributed.wanted(cfg)
    ds_config = None
    if resume == "auto":  # a requeued job: continue the run where it has a complete checkpoint, else start it
        resume = ds_checkpoint.has_checkpoint(out_dir)
    if use_ds:  # the batch arithmetic and the DeepSpeed file are checked before any work
        ds_config = distributed.deepspeed_config(cfg, distributed.world_size())
        ds_checkpoint.check_node_local_storage(ds_config, cfg.distributed.deepspeed_config)
        last_path = ds_dir  # the newest complete tag in it is the run's checkpoint
        if resume and ds_checkpoint.require_tag(ds_dir).endswith(UNIVERSAL_SUFFIX):  # converted by cssfe.engine.reshard
            ds_config["checkpoint"] = {**(ds_config.get("checkpoint") or {}), "load_universal": True}
    elif resume and not (os.path.isfile(last_path) or os.path.isfile(previous_path(last_path))):
        raise FileNotFoundError(f"--resume: no checkpoint at {last_path}")
    if not resume and (ds_checkpoint.newest_complete_tag(ds_dir) if use_ds else os.path.exists(last_path)):
        raise FileExistsError(
            f"{out_dir} already holds a run ({last_path}); pass --resume to continue it or choose another --output-dir"
        )
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
    show = cfg.progress and ctx.main  # rank 0 alone prints progress
    if shared_storage:
        ds_checkpoint.check_shared(ds_dir, ctx)  # every rank reads rank 0's checkpoint files
    cache_dir = cfg.cache_dir or default_cache_dir()
    seed_everything(cfg.seed)

    # Rank 0 fills the dataset and embedding caches first; the others then read them.
    if ctx.world_size > 1 and not ctx.main:
        torch.distributed.barrier()
    data = build_data(cfg.data, cache_dir, progress=show)
    # kernels other than "reference": the loss goes through the fused op too, where it has one (ASL)
    loss_fn = build_loss(cfg.loss.name, data.class_freq, len(data.train), fused=cfg.kernels != "reference",
                         **cfg.loss.params)
    model = build_model(cfg.model, data.class_names, data.groups, cfg.data.image_size, cache_dir).to(device)
    if ctx.world_size > 1 and ctx.main:
        torch.distributed.barrier()
    seed_rank_streams(cfg.seed, ctx.rank)  # the same model on every rank; augmentations of their own
    ema = ModelEMA(model, cfg.optim.ema_decay)  # before DeepSpeed: ZeRO-3 partitions the model's parameters
    if use_ds and cfg.distributed.sync_batchnorm:  # the EMA copy keeps plain batch norm (same state_dict)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.compile:  # in place, after the EMA copy (each compiles its own graph); state_dict keys unchanged
        compiling.compile_for_training(model, ema.module, loss_fn, cfg.compile_mode)

    batch_size = cfg.data.batch_size
    micro = ds_config["train_micro_batch_size_per_gpu"] if use_ds else batch_size
    accum = cfg.distributed.grad_accum if use_ds else 1
    check_batch(data, batch_size, strict=use_ds)  # DeepSpeed's batch is fixed; otherwise said, and trained
    sampler = EpochShuffle(len(data.train), cfg.seed, ctx.rank, ctx.world_size, micro)
    train_loader = DataLoader(
        data.train,
        batch_size=micro,
        sampler=sampler,
        generator=torch.Generator(),  # the loader's own seed draw stays off the global RNG
        drop_last=len(data.train) > batch_size,  # no size-1 batch for batch norm
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )
    test_set = data.test
    if ctx.world_size > 1:  # each rank scores its own contiguous shard; no padded duplicates
        test_set = torch.utils.data.Subset(data.test, distributed.shard_range(len(data.test), ctx.rank, ctx.world_size))
    test_loader = DataLoader(test_set, batch_size=cfg.data.eval_batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    gather = distributed.gather_predictions if ctx.world_size > 1 else None
    optimizer_steps = len(data.train) // batch_size if len(data.train) > batch_size else 1
    steps_per_epoch = optimizer_steps * accum  # loader iterations (micro-batches) per epoch
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    scheduler = one_cycle(optimizer, cfg.optim.lr, cfg.optim.epochs * optimizer_steps, cfg.optim.pct_start)
    autocast, scaler = _amp_context(device, cfg.optim.amp)
    engine = None
    if use_ds:
        import deepspeed

        autocast, scaler = contextlib.nullcontext, None  # DeepSpeed's own precision (distributed.precision)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        model = engine.module
    input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.distributed.precision) if use_ds else None
    # Sum-reduced losses: DeepSpeed averages gradients over ranks and accumulation steps, one
    # process sums over the global batch; scaling the micro-batch loss makes the two agree.
    loss_scale = float(ctx.world_size * accum) if use_ds and getattr(loss_fn, "reduction", "sum") == "sum" else 1.0
    zero3 = distributed.zero3(ds_config)  # parameters partitioned: read them only inside distributed.gathered
    if zero3:  # each rank averages its partition of the fp32 master weights; gathered only to be read
        ema = PartitionedEMA(ema, model)

    def update_ema() -> None:
        ema.update(model)

    # Everything about where the run stands, saved with every checkpoint.
    run = {"epoch": 0, "step": 0, "loss_sum": 0.0, "good_steps": 0, "skipped_steps": 0, "epoch_seconds": 0.0,
           "best_total": -math.inf, "best_metrics": None, "best_epoch": -1}
    if resume and use_ds:
        state = _ds_resume(engine, ds_dir, cfg, ctx)
        ema.load(state["ema"])
        if state["rng"] is not None:
            set_rng_state(state["rng"])
        run.update({k: state["run"][k] for k in run if k in state["run"]})
    elif resume:
        state = load_latest(last_path)
        _check_resume_config(state["config"], cfg, last_path)
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        run.update({k: state[k] for k in run if k in state})
    os.makedirs(out_dir, exist_ok=True)
    if ctx.main:
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    if data.skipped and ctx.main:
        with open(os.path.join(out_dir, "skipped_images.txt"), "w") as f:
            f.writelines(f"{path}\t{reason}\n" for path, reason in data.skipped)

    def checkpoint() -> None:
        if engine is None:
            save_checkpoint(_run_checkpoint(model, ema, optimizer, scheduler, scaler, cfg, data, run), last_path, keep_previous=True)
        else:
            ema.gather()  # ZeRO-3: every rank takes part
            _ds_checkpoint(engine, ds_dir, ctx, {"run": dict(run), "rng": rng_state(),
                                                 **({"ema": ema.module.state_dict()} if ctx.main else {}),  # read by every rank
                                                 "config": to_dict(cfg), "world_size": ctx.world_size,
                                                 # what cssfe.engine.consolidate needs beside the weights
                                                 "class_names": data.class_names, "groups": data.groups.tolist(),
                                                 "class_freq": data.class_freq.tolist()})

    rank_log = None
    if use_ds:  # every rank logs to its own file
        os.makedirs(os.path.join(out_dir, "ranks"), exist_ok=True)
        rank_log = os.path.join(out_dir, "ranks", f"rank{ctx.rank}.log")

    tracker = tracking.open_run_tracker(cfg, out_dir, ctx.main)  # rank 0 alone writes event files
    # The loss summed over the micro-batches since the last logged step (every logging.step_every
    # optimizer steps) seen by this process (a run resumed inside an accumulation window sees only its end)
    window_loss, window_batches = 0.0, 0
    metrics: Optional[Dict[str, Any]] = None
    log_path = os.path.join(out_dir, "log.jsonl")
    consecutive_bad = 0
    stop_signum = 0  # under DeepSpeed: a signal any rank received, agreed on by all at each step
    with StopRequest(second_signal_kills=not use_ds) as stop, tracker:
        for epoch in range(run["epoch"], cfg.optim.epochs):
            model.train()
            t0 = time.time() - run["epoch_seconds"]
            sampler.set_epoch(epoch, start=run["step"] * micro * ctx.world_size)
            seed_loader_workers(train_loader, cfg.seed, ctx.rank, epoch)
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", disable=not show, leave=False,
                       initial=run["step"], total=steps_per_epoch)
            for images, labels, _ in bar:
                if run["step"] >= steps_per_epoch:  # whole optimizer steps only (grad_accum)
                    break
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if input_dtype is not None:
                    images = images.to(input_dtype)
                with autocast():
                    out = (engine or model)(images)
                loss = loss_fn(out["logits"].float(), labels)
                aux_loss = model.head.auxiliary_loss(out, labels, loss_fn)
                if aux_loss is not None:
                    loss = loss + cfg.model.aux_weight * aux_loss
                global_step = epoch * optimizer_steps + (run["step"] // accum) + 1  # the optimizer step this batch ends in
                if engine is not None:
                    consecutive_bad, stop_signum, step_loss = _ds_step(
                        engine, loss, loss_scale, run, stop.signum, update_ema, consecutive_bad, device)
                    if consecutive_bad >= cfg.max_nonfinite_steps:
                        raise TrainingDiverged(
                            f"{consecutive_bad} consecutive steps with a non-finite loss (epoch {epoch + 1}, step "
                            f"{run['step'] + 1}); stopped. The last good checkpoint is {last_path}. "
                            "Try a lower optim.lr, distributed.precision=fp32 or a smaller optim.grad_clip.")
                    run["step"] += 1
                    bar.set_postfix(loss=f"{step_loss:.3f}")
                    window_loss, window_batches = window_loss + step_loss, window_batches + 1
                    if run["step"] % accum == 0:
                        if tracker.wants_step(global_step):
                            tracker.log_step(global_step, loss=window_loss / window_batches, lr=scheduler.get_last_lr()[0],
                                             grad_norm=_as_float(engine.get_global_grad_norm()),
                                             nonfinite_steps=run["skipped_steps"],
                                             # this rank's first-pass loss is not the global one: left out
                                             **_head_scalars(model, None, lam=not zero3))
                        if global_step % cfg.logging.step_every == 0:  # logged: the mean since the last log
                            window_loss, window_batches = 0.0, 0
                    periodic = cfg.checkpoint_every_steps and run["step"] % cfg.checkpoint_every_steps == 0
                    # on accumulation boundaries only: a stop inside a window waits for its end
                    if (stop_signum or periodic) and run["step"] % accum == 0 and run["step"] < steps_per_epoch:
                        run["epoch_seconds"] = time.time() - t0
                        checkpoint()
                        if stop_signum:
                            bar.close()
                            raise TrainingInterrupted(stop_signum, last_path)
                    continue
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
                if torch.isfinite(loss) and torch.isfinite(grad_norm):
                    if scaler is not None:
                        scaler.step(optimizer)
                    else:
                        optimizer.step()
                    ema.update(model)
                    run["loss_sum"] += loss.item()
                    run["good_steps"] += 1
                    consecutive_bad = 0
                else:  # never apply a non-finite update
                    run["skipped_steps"] += 1
                    consecutive_bad += 1
                    if consecutive_bad >= cfg.max_nonfinite_steps:
                        raise TrainingDiverged(
                            f"{consecutive_bad} consecutive steps with a non-finite loss or gradient (epoch {epoch + 1}, "
                            f"step {run['step'] + 1}); stopped. The last good checkpoint is {last_path}. "
                            "Try a lower optim.lr, optim.amp=off or a smaller optim.grad_clip."
                        )
                # the loss summed on the device and read when logged: the mean since the last logged step
                window_loss, window_batches = window_loss + loss.detach().float(), window_batches + 1
                if tracker.wants_step(global_step):  # the learning rate this step used, before the schedule moves on
                    tracker.log_step(global_step, loss=float(window_loss) / window_batches, lr=scheduler.get_last_lr()[0],
                                     grad_norm=grad_norm.item(), nonfinite_steps=run["skipped_steps"],
                                     **_head_scalars(model, aux_loss))
                if global_step % cfg.logging.step_every == 0:
                    window_loss, window_batches = 0.0, 0
                if scaler is not None:
                    scaler.update()
                scheduler.step()
                run["step"] += 1
                if show and global_step % cfg.logging.step_every == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                periodic = cfg.checkpoint_every_steps and run["step"] % cfg.checkpoint_every_steps == 0
                if (stop.signum is not None or periodic) and run["step"] < steps_per_epoch:
                    run["epoch_seconds"] = time.time() - t0
                    checkpoint()
                    if stop.signum is not None:
                        bar.close()
                        raise TrainingInterrupted(stop.signum, last_path)
            bar.close()
            record: Dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": run["loss_sum"] / max(run["good_steps"], 1),
                "lr": scheduler.get_last_lr()[0],
                "skipped_steps": run["skipped_steps"],
                "epoch_seconds": round(time.time() - t0, 3),
            }
            record["images_per_second"] = round(steps_per_epoch * micro * ctx.world_size / max(record["epoch_seconds"], 1e-9), 3)
            if hasattr(model.head, "lam_raw"):  # hasattr(.., "lam") would compute it, outside a gather
                with distributed.gathered([model.head.lam_raw], zero3):
                    record["lambda"] = float(model.head.lam.detach().float())
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.optim.epochs:
                ema.gather()
                if ctx.world_size > 1:
                    distributed.broadcast_buffers(ema.module)
                metrics = evaluate(ema.module, test_loader, data.groups, device, progress=show, gather=gather,
                                   class_names=data.class_names)
                record.update({k: metrics[k] for k in ("mAP", "f1", "first_pass_mAP") if k in metrics})
                if metrics["mAP"]["total"] > run["best_total"]:
                    run.update(best_total=metrics["mAP"]["total"], best_metrics=metrics, best_epoch=epoch + 1)
                    if ctx.main:
                        save_checkpoint(
                            {
                                "model": ema.module.state_dict(),
                                "config": to_dict(cfg),
                                "epoch": epoch + 1,
                                "metrics": metrics,
                                "class_names": data.class_names,
                                "groups": data.groups.tolist(),
                                "class_freq": data.class_freq.tolist(),
                            },
                            best_path,
                        )
                if ctx.main:  # a report, printed also without progress bars (progress=false)
                    lam = f", lambda {record['lambda']:.3f}" if "lambda" in record else ""
                    logger.info(f"epoch {epoch + 1}/{cfg.optim.epochs}: loss {record['train_loss']:.4f}{lam}\n"
                                + format_table(_metric_rows(metrics, "EMA model")))
                tracker.log_evaluation((epoch + 1) * optimizer_steps, metrics, record["images_per_second"],
                                       data.class_names, data.groups, data.class_freq)
            if ctx.main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if rank_log is not None:
                with open(rank_log, "a") as f:
                    f.write(json.dumps({"rank": ctx.rank, "world_size": ctx.world_size, "epoch": epoch + 1,
                                        "train_loss": record["train_loss"], "epoch_seconds": record["epoch_seconds"],
                                        "micro_batches": run["step"], "micro_batch": micro,
                                        **_peak_memory(device)}) + "\n")
            run.update(epoch=epoch + 1, step=0, loss_sum=0.0, good_steps=0, epoch_seconds=0.0)
            checkpoint()
            if on_epoch_end is not None:  # after the checkpoint: a caller that stops the run here loses nothing
                on_epoch_end(record)
            signum = stop_signum if engine is not None else stop.signum
            if signum:
                raise TrainingInterrupted(signum, last_path)
    if metrics is None:  # resumed a finished run: evaluate its final weights
        ema.gather()
        if ctx.world_size > 1:
            distributed.broadcast_buffers(ema.module)
        metrics = evaluate(ema.module, test_loader, data.groups, device, gather=gather, class_names=data.class_names)
    best_metrics, best_epoch = run["best_metrics"], run["best_epoch"]
    result = {"final": metrics, "best": best_metrics, "best_epoch": best_epoch,
              "groups": {n: int((data.groups == g).sum()) for g, n in enumerate(GROUP_NAMES)},
              "skipped_steps": run["skipped_steps"], "skipped_images": len(data.skipped)}
    if ctx.main:
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
    if use_ds and device.type == "cpu":
        distributed.release_cpu_buffers(ctx)
    if ctx.main:
        rows = {**_metric_rows(metrics, "final"), f"best (epoch {best_epoch})": best_metrics["mAP"]}
        logger.info(format_table(rows, left_out=metrics.get("left_out")))
        logger.info(f"F1 (final): weighted {metrics['f1']['weighted']:.3f}, micro {metrics['f1']['micro']:.3f}, "
                    f"macro {metrics['f1']['macro']:.3f}")
        logger.info(f"outputs in {out_dir}")
    return result
