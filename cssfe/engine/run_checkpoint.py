"""A run's checkpoints: what is saved, where, and how a run resumes from them.

A single process writes ``checkpoints/last.pt`` (keeping the previous one); DeepSpeed writes tag
folders under ``checkpoints/deepspeed`` (:mod:`cssfe.engine.ds_checkpoint`). The best model by
mAP goes to ``checkpoints/best.pt``. :class:`CheckpointManager` owns saving and resuming.
"""
from __future__ import annotations

import os
from typing import Any, Dict

from cssfe.config import TrainConfig, to_dict
from cssfe.engine import ds_checkpoint
from cssfe.engine.checkpoint import load_checkpoint, load_latest, rng_state, save_checkpoint, set_rng_state
from cssfe.engine.ds_checkpoint import CONSOLIDATED_MODEL, UNIVERSAL_SUFFIX, client_path

# Keys that may differ between a run and its resumption: they do not change the numbers.
RESUMABLE_CHANGES = {
    "progress", "device", "eval_every", "output_dir", "cache_dir", "checkpoint_every_steps", "max_nonfinite_steps",
    "data.num_workers", "data.eval_batch_size", "data.check_images", "data.on_bad_image",
    "logging.log_level", "logging.tensorboard", "logging.wandb", "logging.wandb_project", "logging.step_every",
    "compile", "compile_mode",
    "distributed.timeout_s",  # how long a rank waits in a collective: not what it computes
}


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


def _data_fields(data) -> Dict[str, Any]:
    """What cssfe.engine.consolidate and inference need beside the weights."""
    return {"class_names": data.class_names, "groups": data.groups.tolist(), "class_freq": data.class_freq.tolist()}


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
        **_data_fields(data),
    }


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


class CheckpointManager:
    """Saves the run's state (``last``: every epoch, periodically and on a stop; ``best``: the
    EMA model with the best total mAP) and restores it on a resume."""

    def __init__(self, cfg: TrainConfig, ctx, data, model, ema, optimizer, scheduler, scaler, engine,
                 last_path: str, best_path: str, ds_dir: str):
        self.cfg, self.ctx, self.data = cfg, ctx, data
        self.model, self.ema, self.optimizer, self.scheduler, self.scaler, self.engine = (
            model, ema, optimizer, scheduler, scaler, engine)
        self.last_path, self.best_path, self.ds_dir = last_path, best_path, ds_dir

    def save(self, run: Dict[str, Any]) -> None:
        if self.engine is None:
            state = _run_checkpoint(self.model, self.ema, self.optimizer, self.scheduler, self.scaler, self.cfg,
                                    self.data, run)
            save_checkpoint(state, self.last_path, keep_previous=True)
            return
        self.ema.gather()  # ZeRO-3: every rank takes part
        ema = {"ema": self.ema.module.state_dict()} if self.ctx.main else {}  # read by every rank
        _ds_checkpoint(self.engine, self.ds_dir, self.ctx,
                       {"run": dict(run), "rng": rng_state(), **ema, "config": to_dict(self.cfg),
                        "world_size": self.ctx.world_size, **_data_fields(self.data)})

    def resume(self, run: Dict[str, Any]) -> None:
        """Restore the newest checkpoint's weights, optimizer, RNG and position (into ``run``)."""
        if self.engine is not None:
            state = _ds_resume(self.engine, self.ds_dir, self.cfg, self.ctx)
            self.ema.load(state["ema"])
            if state["rng"] is not None:
                set_rng_state(state["rng"])
            run.update({k: state["run"][k] for k in run if k in state["run"]})
            return
        state = load_latest(self.last_path)
        _check_resume_config(state["config"], self.cfg, self.last_path)
        self.model.load_state_dict(state["model"])
        self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        run.update({k: state[k] for k in run if k in state})

    def save_best(self, epoch: int, metrics: Dict[str, Any]) -> None:
        if self.ctx.main:
            save_checkpoint({"model": self.ema.module.state_dict(), "config": to_dict(self.cfg), "epoch": epoch,
                             "metrics": metrics, **_data_fields(self.data)}, self.best_path)
