"""One trial: ``train(cfg)`` for one (variant, seed) of a study, reporting mAP to Ray Tune each epoch.

On a storage folder, each trial trains in a folder named by its seed and reuse key (config digest,
device kind, precision), ``<storage>/trials/s<seed>-<key>/`` (the usual ``config.yaml``,
``log.jsonl``, ``checkpoints/``, ``metrics.json``): a trial whose ``metrics.json`` is already there,
from this sweep or another study with the same config, is not trained again, and a lock on the
folder makes a second trial of the same config wait and reuse. On a URI storage the folder is
node-local. Every evaluated epoch is reported with the run folder as a Tune checkpoint
(``tune.report(..., checkpoint=...)``): a retry or a restored sweep whose folder lacks the
checkpoint (another node, a lost disk) continues from Ray's copy. ``attempts.jsonl`` gets one line
per start: how often a trial ran.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from typing import Any, Dict, Optional

from cssfe.sweep.studies import Study, config_hash, trial_key

# Tests set this to a folder: a trial whose "<folder>/<trial>.fail" exists raises once after its
# first epoch (leaving "<trial>.failed"), to exercise the retry path with a real failure; if that
# file says "lose-run-folder", the run folder is emptied first (the retry must restore from Tune).
FAIL_ONCE_ENV = "CSSFE_SWEEP_FAIL_ONCE"


class InjectedFailure(RuntimeError):
    """The failure a test asked for (see FAIL_ONCE_ENV)."""


def epoch_metrics(record: Dict[str, Any]) -> Dict[str, Any]:
    """A ``log.jsonl`` record flattened into the scalars a scheduler and a results table use."""
    out: Dict[str, Any] = {"epoch": record["epoch"], "train_loss": record.get("train_loss")}
    for block, prefix in (("mAP", "map_"), ("first_pass_mAP", "first_pass_map_")):
        for group, value in (record.get(block) or {}).items():
            out[prefix + group] = value
    if "lambda" in record:
        out["lambda"] = record["lambda"]
    return out


def final_metrics(cfg, final: Dict[str, Any], run_dir: Optional[str] = None) -> Dict[str, Any]:
    """A finished run's final metrics (``metrics.json``'s "final") as one last epoch report, with
    its F1 scores (``f1_weighted``, ``f1_micro``, ``f1_macro``) and the λ of its last epoch
    (``log.jsonl`` of ``run_dir``: metrics.json holds the evaluation alone)."""
    out = epoch_metrics({"epoch": cfg.optim.epochs, **final})
    if "lambda" not in out and run_dir:
        lam = _last_lambda(os.path.join(run_dir, "log.jsonl"))
        if lam is not None:
            out["lambda"] = lam
    out.update({f"f1_{name}": value for name, value in (final.get("f1") or {}).items()})
    return out


def _last_lambda(log_path: str) -> Optional[float]:
    try:
        with open(log_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    return next((r["lambda"] for r in reversed(records) if r.get("lambda") is not None), None)


def _maybe_fail_once(plan: Dict[str, Any], key: str, run_dir: str) -> None:
    folder = plan.get("fail_once_dir")
    marker = os.path.join(folder, key + ".fail") if folder else ""
    if folder and os.path.isfile(marker) and not os.path.exists(os.path.join(folder, key + ".failed")):
        open(os.path.join(folder, key + ".failed"), "w").close()
        with open(marker) as f:
            if f.read().strip() == "lose-run-folder":  # as if the retry ran on a node without this folder
                for name in os.listdir(run_dir):
                    path = os.path.join(run_dir, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        raise InjectedFailure(f"injected failure of trial {key} (test hook {FAIL_ONCE_ENV})")


def trial_device(cfg, plan: Dict[str, Any]) -> str:
    """Where a trial trains: on a GPU when the sweep gives it one and its config does not say cpu."""
    return "cuda" if plan.get("gpus_per_trial") and cfg.device != "cpu" else "cpu"


def trial_precision(cfg, plan: Dict[str, Any]) -> str:
    """The arithmetic a trial trains in: DeepSpeed's precision, else autocast (optim.amp; auto: on CUDA)."""
    if plan.get("workers_per_trial", 1) > 1:
        return cfg.distributed.precision
    on = cfg.optim.amp == "on" or (cfg.optim.amp == "auto" and trial_device(cfg, plan) == "cuda")
    return "amp" if on else "fp32"


def reuse_key(cfg, device: str, precision: str) -> str:
    """What makes two trials the same run: the config digest, the device kind and the precision
    (device and amp "auto" resolve differently per machine; a GPU sweep must not reuse CPU runs)."""
    import hashlib

    return hashlib.sha256(f"{config_hash(cfg)}|{device}|{precision}".encode()).hexdigest()[:12]


def trial_dir(plan: Dict[str, Any], study: Study, variant: str, seed: int) -> Optional[str]:
    """The run folder of a trial on the sweep's storage: as the plan recorded it when the sweep
    started (a later change to the config schema must not move a half-finished sweep's trials), else
    from its reuse key. None when the storage is a URI: the trial then trains in a node-local folder
    and keeps its state in Tune's checkpoints."""
    recorded = plan.get("trial_dirs", {}).get(f"{variant}|{seed}")
    if recorded:
        return recorded
    if not plan.get("trials_dir"):
        return None
    cfg = study.trial_config(variant, seed)
    workers = plan.get("workers_per_trial", 1)
    # DeepSpeed checkpoints of N ranks are not a one-process run's: their own folder per world size.
    suffix = f"-w{workers}" if workers > 1 else ""
    key = reuse_key(cfg, trial_device(cfg, plan), trial_precision(cfg, plan))
    return os.path.join(plan["trials_dir"], f"s{seed}-{key}{suffix}")


def local_run_dir(plan: Dict[str, Any], variant: str, seed: int, trial_id: str) -> str:
    """A trial's node-local folder when the storage is a URI. Named by Tune's trial id, which a
    restore keeps and a new sweep (another storage, --fresh) does not: no run is reused from there."""
    import tempfile

    return os.path.join(tempfile.gettempdir(), "cssfe-sweeps", experiment_name(plan), f"{trial_key(variant, seed)}_{trial_id}")


def experiment_name(plan: Dict[str, Any]) -> str:
    """The sweep a start belongs to: trial folders are shared by studies with the same config."""
    return plan.get("experiment") or plan["study"]["name"]


def _trial_config(plan: Dict[str, Any], study: Study, variant: str, seed: int, run_dir: str):
    cfg = study.trial_config(variant, seed, f"output_dir={run_dir}", "progress=false")
    if cfg.cache_dir is None and plan.get("cache_dir"):
        cfg.cache_dir = plan["cache_dir"]
    if trial_device(cfg, plan) == "cpu":
        cfg.device = "cpu"  # a trial without a GPU of its own must not pick cuda:0 ("auto")
    return cfg


def run_trial(config: Dict[str, Any], plan: Dict[str, Any]) -> None:
    """Ray Tune function trainable; ``config`` = {"trial": {"variant", "seed"}}, ``plan`` from
    :func:`cssfe.sweep.runner.make_plan`."""
    import ray
    import torch
    from ray import tune

    variant, seed = config["trial"]["variant"], int(config["trial"]["seed"])
    key = trial_key(variant, seed)
    study = Study.from_dict(plan["study"])
    run_dir = trial_dir(plan, study, variant, seed) or local_run_dir(plan, variant, seed, tune.get_context().get_trial_id())
    # As many threads as the trial was given CPUs: trials side by side must not oversubscribe cores.
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))

    cfg = _trial_config(plan, study, variant, seed, run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        restore_from_checkpoint(tune.get_checkpoint(), run_dir)
        _train_or_reuse(cfg, run_dir, plan, key)


def restore_from_checkpoint(checkpoint, run_dir: str) -> bool:
    """Fill a run folder that has no epoch checkpoint (a retry on another node, a node-local folder
    that is gone) from Ray's copy of the trial's last reported one; True if it did."""
    if checkpoint is None or resumable(run_dir) or os.path.isfile(os.path.join(run_dir, "metrics.json")):
        return False
    checkpoint.to_directory(run_dir)
    return True


def _begin(run_dir: str, plan: Dict[str, Any]) -> Dict[str, Any]:
    """Log this start in ``attempts.jsonl`` (with the sweep it belongs to). Returns what every report
    of this start carries: the final metrics when the trial is done already ("final"), how often this
    sweep started training it, and whether another sweep trained it."""
    done = os.path.join(run_dir, "metrics.json")
    reuse = os.path.isfile(done)  # the folder is named by the trial's reuse key
    action = "reuse" if reuse else "resume" if resumable(run_dir) else "start"
    attempts = os.path.join(run_dir, "attempts.jsonl")
    with open(attempts, "a") as f:
        f.write(json.dumps({"time": time.time(), "action": action, "experiment": experiment_name(plan)}) + "\n")
    with open(attempts) as f:
        actions = [a["action"] for a in map(json.loads, filter(str.strip, f)) if a.get("experiment") == experiment_name(plan)]
    status = {"attempts": sum(a != "reuse" for a in actions), "reused": all(a == "reuse" for a in actions),
              "run_dir": run_dir}
    if reuse:
        with open(done) as f:
            status["final"] = json.load(f)["final"]
    return status


def resumable(run_dir: str) -> bool:
    """A checkpoint to continue from: one process's, or DeepSpeed's pointer to its newest one."""
    return any(os.path.isfile(os.path.join(run_dir, "checkpoints", *p)) for p in (("last.pt",), ("deepspeed", "latest")))


def _run_checkpoint(run_dir: str):
    """The whole run folder (config, log, attempts, epoch checkpoints) as a Tune checkpoint."""
    from ray.tune import Checkpoint

    return Checkpoint.from_directory(run_dir)


def _train_or_reuse(cfg, run_dir: str, plan: Dict[str, Any], key: str) -> None:
    from ray import tune

    from cssfe.engine.train import train

    status = _begin(run_dir, plan)
    final = status.pop("final", None)
    if final is not None:  # trained by another study, or finished just before this sweep was interrupted
        tune.report({**final_metrics(cfg, final, run_dir), **status, "finished": True})
        return

    def report(record: Dict[str, Any]) -> None:
        if "mAP" not in record:  # an epoch without evaluation (eval_every > 1): nothing to rank it by
            return
        tune.report({**epoch_metrics(record), **status}, checkpoint=_run_checkpoint(run_dir))
        _maybe_fail_once(plan, key, run_dir)

    result = train(cfg, resume=resumable(run_dir), on_epoch_end=report)
    # The last report says the run is complete (metrics.json written): the table counts only these.
    tune.report({**final_metrics(cfg, result["final"], run_dir), **status, "finished": True}, checkpoint=_run_checkpoint(run_dir))


def worker_resources(plan: Dict[str, Any]) -> Dict[str, float]:
    """What each process of a distributed trial gets: the trial's CPUs split evenly, one GPU each."""
    n = plan["workers_per_trial"]
    res = {"CPU": plan["cpus_per_trial"] / n}
    if plan.get("gpus_per_trial"):
        res["GPU"] = 1
    return res


def distributed_trial(config: Dict[str, Any], plan: Dict[str, Any]) -> None:
    """Ray Tune function trainable of a trial that spans ``plan["workers_per_trial"]`` processes.

    Ray Train's ``TorchTrainer`` starts the workers (on any nodes of the cluster, placed by
    ``plan["placement"]``) with a process group, gloo on CPUs or NCCL on GPUs; ``train(cfg)`` sees
    the launcher's ``RANK`` / ``WORLD_SIZE`` and runs DeepSpeed in each worker, so the trial is the
    same run as ``deepspeed launch/train.py`` with that many ranks. Rank 0's epoch metrics reach
    Tune through ``TuneReportCallback``. The Train run is named by the trial (no timestamp): a retry
    finds Ray Train's own checkpoints under that name. This function itself only waits.
    """
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    variant, seed = config["trial"]["variant"], int(config["trial"]["seed"])
    study = Study.from_dict(plan["study"])
    run_dir = trial_dir(plan, study, variant, seed)
    resources = worker_resources(plan)
    gpu = resources.get("GPU", 0) > 0
    trainer = TorchTrainer(
        _distributed_worker,
        train_loop_config={"trial": config["trial"], "plan": plan, "trial_id": tune.get_context().get_trial_id()},
        scaling_config=ray.train.ScalingConfig(num_workers=plan["workers_per_trial"], use_gpu=gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=plan.get("placement", "PACK")),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"{experiment_name(plan)}-{trial_key(variant, seed)}",
            storage_path=plan["train_storage"],
            # A failed worker fails the Tune trial, and Tune's max_failures retries it from the
            # last epoch checkpoint: one retry policy for single and distributed trials.
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
        ),
    )
    if run_dir is None:
        trainer.fit()
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, ".lock"), "w") as lock:  # one trial of this config at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        trainer.fit()


def _distributed_worker(loop_config: Dict[str, Any]) -> None:
    """One process of a distributed trial (inside a Ray Train worker, process group set up)."""
    import ray.train
    import ray.train.torch
    import torch

    from cssfe.engine.train import train

    plan = loop_config["plan"]
    variant, seed = loop_config["trial"]["variant"], int(loop_config["trial"]["seed"])
    key = trial_key(variant, seed)
    study = Study.from_dict(plan["study"])
    context = ray.train.get_context()
    rank, local_rank = context.get_world_rank(), context.get_local_rank()
    shared_dir = trial_dir(plan, study, variant, seed)
    run_dir = shared_dir or local_run_dir(plan, variant, seed, loop_config["trial_id"])
    torch.set_num_threads(max(1, int(worker_resources(plan)["CPU"])))
    cfg = _trial_config(plan, study, variant, seed, run_dir)
    if cfg.device != "cpu":
        cfg.device = str(ray.train.torch.get_device())  # this rank's own GPU, as Ray assigned it
    # One copy per folder: rank 0's on shared storage, each node's first rank's on node-local folders.
    # Every process holds its own ZeRO shards in the folder, and Ray merges the uploads of one report
    # into one checkpoint: the shards stay together.
    owner = rank == 0 if shared_dir else local_rank == 0
    if owner:
        os.makedirs(run_dir, exist_ok=True)
        restore_from_checkpoint(ray.train.get_checkpoint(), run_dir)
        status = _begin(run_dir, plan)
    torch.distributed.barrier()
    if not owner:
        status = {}
    final = status.pop("final", None)
    finals = [final]
    torch.distributed.broadcast_object_list(finals, src=0)
    if finals[0] is not None:  # trained by another sweep with the same config
        ray.train.report({**final_metrics(cfg, finals[0], run_dir), **status, "finished": True})
        return

    def report(record: Dict[str, Any]) -> None:  # every rank reports (a collective); Tune gets rank 0's
        if "mAP" not in record:
            return
        ray.train.report({**epoch_metrics(record), **status}, checkpoint=_run_checkpoint(run_dir) if owner else None)
        if rank == 0:
            _maybe_fail_once(plan, key, run_dir)

    # Decided here, not by the driver: Ray Train may rerun this function (node preemption) after
    # the first run wrote checkpoints. No rank can checkpoint before all have joined.
    # node-local folders: Ray merges every node's upload into one checkpoint, restored on each node
    result = train(cfg, resume=resumable(run_dir), on_epoch_end=report, shared_storage=shared_dir is not None)
    ray.train.report({**final_metrics(cfg, result["final"], run_dir), **status, "finished": True},
                     checkpoint=_run_checkpoint(run_dir) if owner else None)


# How a trial runs, by the number of processes it spans.
TRIAL_RUNNERS = {"single": run_trial, "distributed": distributed_trial}
