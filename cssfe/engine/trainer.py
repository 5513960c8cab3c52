"""The training loop: epochs of steps (:mod:`cssfe.engine.steps`), the rules common to every step
(non-finite steps, step logging, stop signals and periodic checkpoints), the end of an epoch
(evaluation, the best model, ``log.jsonl``) and the final metrics. Built by :mod:`cssfe.engine.train`."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Any, Callable, Dict, Optional

import torch
from tqdm import tqdm

from cssfe.data import GROUP_NAMES
from cssfe.engine import distributed
from cssfe.engine.evaluate import evaluate, format_table
from cssfe.engine.sampler import seed_loader_workers
from cssfe.engine.signals import StopRequest, TrainingInterrupted

logger = logging.getLogger("cssfe.engine.train")  # the run's reports keep their logger name


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def _metric_rows(metrics: Dict[str, Any], label: str) -> Dict[str, Dict[str, float]]:
    rows = {label: metrics["mAP"]}
    if "first_pass_mAP" in metrics:
        rows[f"{label} (1st pass)"] = metrics["first_pass_mAP"]
    return rows


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


def new_run_state() -> Dict[str, Any]:
    """Everything about where the run stands, saved with every checkpoint."""
    return {"epoch": 0, "step": 0, "loss_sum": 0.0, "good_steps": 0, "skipped_steps": 0, "epoch_seconds": 0.0,
            "best_total": -math.inf, "best_metrics": None, "best_epoch": -1}


class Trainer:
    """Runs a built training setup (``parts``: a namespace from :func:`cssfe.engine.train._build`)."""

    def __init__(self, parts, run: Dict[str, Any], on_epoch_end: Optional[Callable[[Dict[str, Any]], None]] = None):
        self.p, self.cfg, self.ctx, self.run = parts, parts.cfg, parts.ctx, run
        self.on_epoch_end = on_epoch_end
        self.consecutive_bad = 0
        # The loss summed over the micro-batches since the last logged step (every logging.step_every
        # optimizer steps) seen by this process (a run resumed inside an accumulation window sees only its end)
        self.window_loss, self.window_batches = 0.0, 0
        self.metrics: Optional[Dict[str, Any]] = None

    def fit(self) -> Dict[str, Any]:
        p = self.p
        with StopRequest(second_signal_kills=p.engine is None) as stop, p.tracker:
            for epoch in range(self.run["epoch"], self.cfg.optim.epochs):
                record = self.train_epoch(epoch, stop)
                self.end_epoch(epoch, record)
                signum = p.step.pending_stop(stop.signum)
                if signum:
                    raise TrainingInterrupted(signum, p.last_path)
        return self.finish()

    def train_epoch(self, epoch: int, stop) -> Dict[str, Any]:
        p, run = self.p, self.run
        p.model.train()
        t0 = time.time() - run["epoch_seconds"]
        p.sampler.set_epoch(epoch, start=run["step"] * p.micro * self.ctx.world_size)
        seed_loader_workers(p.train_loader, self.cfg.seed, self.ctx.rank, epoch)
        bar = tqdm(p.train_loader, desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}", disable=not p.show,
                   leave=False, initial=run["step"], total=p.steps_per_epoch)
        for images, labels, _ in bar:
            if run["step"] >= p.steps_per_epoch:  # whole optimizer steps only (grad_accum)
                break
            global_step = epoch * p.optimizer_steps + (run["step"] // p.accum) + 1  # the optimizer step this batch ends in
            result = self.train_step(images, labels, stop)
            self.after_step(result, epoch, global_step, bar, t0, stop)
        bar.close()
        record: Dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": run["loss_sum"] / max(run["good_steps"], 1),
            "lr": p.scheduler.get_last_lr()[0],
            "skipped_steps": run["skipped_steps"],
            "epoch_seconds": round(time.time() - t0, 3),
        }
        record["images_per_second"] = round(p.steps_per_epoch * p.micro * self.ctx.world_size
                                            / max(record["epoch_seconds"], 1e-9), 3)
        if hasattr(p.model.head, "lam_raw"):  # hasattr(.., "lam") would compute it, outside a gather
            with distributed.gathered([p.model.head.lam_raw], p.zero3):
                record["lambda"] = float(p.model.head.lam.detach().float())
        return record

    def forward_loss(self, images, labels):
        """The micro-batch's loss (with the weighted first-pass loss) and the first-pass loss."""
        p = self.p
        images, labels = images.to(p.device, non_blocking=True), labels.to(p.device, non_blocking=True)
        if p.input_dtype is not None:
            images = images.to(p.input_dtype)
        with p.autocast():
            out = (p.engine or p.model)(images)
        loss = p.loss_fn(out["logits"].float(), labels)
        aux_loss = p.model.head.auxiliary_loss(out, labels, p.loss_fn)
        if aux_loss is not None:
            loss = loss + self.cfg.model.aux_weight * aux_loss
        return loss, aux_loss

    def train_step(self, images, labels, stop):
        loss, aux_loss = self.forward_loss(images, labels)
        return self.p.step(loss, aux_loss, self.run, stop.signum)

    def after_step(self, result, epoch: int, global_step: int, bar, t0: float, stop) -> None:
        """The rules of every step: count it, stop on too many non-finite steps, log, move the
        schedule on, checkpoint periodically or on a stop (at accumulation boundaries only)."""
        p, run = self.p, self.run
        if result.finite:
            run["loss_sum"] += float(result.loss)
            run["good_steps"] += 1
            self.consecutive_bad = 0
        else:  # the step skipped its update
            run["skipped_steps"] += 1
            self.consecutive_bad += 1
            if self.consecutive_bad >= self.cfg.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"{self.consecutive_bad} consecutive steps with {p.step.nonfinite_what} (epoch {epoch + 1}, "
                    f"step {run['step'] + 1}); stopped. The last good checkpoint is {p.last_path}. "
                    + p.step.divergence_hint)
        self.window_loss, self.window_batches = self.window_loss + result.loss, self.window_batches + 1
        closed = (run["step"] + 1) % p.accum == 0  # this micro-batch ends an optimizer step
        if closed:
            if p.tracker.wants_step(global_step):  # the learning rate this step used, before the schedule moves on
                p.tracker.log_step(global_step, loss=float(self.window_loss) / self.window_batches,
                                   lr=p.scheduler.get_last_lr()[0], **p.step.log_scalars(result),
                                   nonfinite_steps=run["skipped_steps"], **p.step.head_scalars(result))
            if global_step % self.cfg.logging.step_every == 0:  # logged: the mean since the last log
                self.window_loss, self.window_batches = 0.0, 0
        p.step.after_log()
        run["step"] += 1
        if p.show and global_step % self.cfg.logging.step_every == 0:
            bar.set_postfix(loss=f"{float(result.loss):.3f}")
        periodic = self.cfg.checkpoint_every_steps and run["step"] % self.cfg.checkpoint_every_steps == 0
        signum = p.step.pending_stop(stop.signum)
        if (signum or periodic) and closed and run["step"] < p.steps_per_epoch:
            run["epoch_seconds"] = time.time() - t0
            p.checkpoints.save(run)
            if signum:
                bar.close()
                raise TrainingInterrupted(signum, p.last_path)

    def evaluate(self, progress: bool) -> Dict[str, Any]:
        """The EMA model's metrics over the test set (every rank scores its shard)."""
        p = self.p
        p.ema.gather()
        if self.ctx.world_size > 1:
            distributed.broadcast_buffers(p.ema.module)
        kwargs = {"progress": progress} if progress is not None else {}
        return evaluate(p.ema.module, p.test_loader, p.data.groups, p.device, **kwargs, gather=p.gather,
                        class_names=p.data.class_names)

    def end_epoch(self, epoch: int, record: Dict[str, Any]) -> None:
        """Evaluate (every cfg.eval_every epochs and the last), keep the best model, write the
        log line, checkpoint, then tell ``on_epoch_end``."""
        p, cfg, run = self.p, self.cfg, self.run
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.optim.epochs:
            self.metrics = metrics = self.evaluate(p.show)
            record.update({k: metrics[k] for k in ("mAP", "f1", "first_pass_mAP") if k in metrics})
            if metrics["mAP"]["total"] > run["best_total"]:
                run.update(best_total=metrics["mAP"]["total"], best_metrics=metrics, best_epoch=epoch + 1)
                p.checkpoints.save_best(epoch + 1, metrics)
            if self.ctx.main:  # a report, printed also without progress bars (progress=false)
                lam = f", lambda {record['lambda']:.3f}" if "lambda" in record else ""
                logger.info(f"epoch {epoch + 1}/{cfg.optim.epochs}: loss {record['train_loss']:.4f}{lam}\n"
                            + format_table(_metric_rows(metrics, "EMA model")))
            p.tracker.log_evaluation((epoch + 1) * p.optimizer_steps, metrics, record["images_per_second"],
                                     p.data.class_names, p.data.groups, p.data.class_freq)
        if self.ctx.main:
            with open(p.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if p.rank_log is not None:
            with open(p.rank_log, "a") as f:
                f.write(json.dumps({"rank": self.ctx.rank, "world_size": self.ctx.world_size, "epoch": epoch + 1,
                                    "train_loss": record["train_loss"], "epoch_seconds": record["epoch_seconds"],
                                    "micro_batches": run["step"], "micro_batch": p.micro,
                                    **_peak_memory(p.device)}) + "\n")
        run.update(epoch=epoch + 1, step=0, loss_sum=0.0, good_steps=0, epoch_seconds=0.0)
        p.checkpoints.save(run)
        if self.on_epoch_end is not None:  # after the checkpoint: a caller that stops the run here loses nothing
            self.on_epoch_end(record)

    def finish(self) -> Dict[str, Any]:
        """Write ``metrics.json`` (final and best models) and report them."""
        p, run = self.p, self.run
        metrics = self.metrics
        if metrics is None:  # resumed a finished run: evaluate its final weights
            metrics = self.evaluate(None)
        best_metrics, best_epoch = run["best_metrics"], run["best_epoch"]
        result = {"final": metrics, "best": best_metrics, "best_epoch": best_epoch,
                  "groups": {n: int((p.data.groups == g).sum()) for g, n in enumerate(GROUP_NAMES)},
                  "skipped_steps": run["skipped_steps"], "skipped_images": len(p.data.skipped)}
        if self.ctx.main:
            with open(os.path.join(p.out_dir, "metrics.json"), "w") as f:
                json.dump(result, f, indent=2)
        if p.engine is not None and p.device.type == "cpu":
            distributed.release_cpu_buffers(self.ctx)
        if self.ctx.main:
            rows = {**_metric_rows(metrics, "final"), f"best (epoch {best_epoch})": best_metrics["mAP"]}
            logger.info(format_table(rows, left_out=metrics.get("left_out")))
            logger.info(f"F1 (final): weighted {metrics['f1']['weighted']:.3f}, micro {metrics['f1']['micro']:.3f}, "
                        f"macro {metrics['f1']['macro']:.3f}")
            logger.info(f"outputs in {p.out_dir}")
        return result
