"""One trial: ``train(cfg)`` for one (variant, seed) of a study, reporting mAP to Ray Tune each epoch.

Each trial trains in a folder named by its seed and config digest, ``<storage>/trials/s<seed>-<hash>/``
(the usual ``config.yaml``, ``log.jsonl``, ``checkpoints/``, ``metrics.json``), so a trial that is
restarted (after a failure, or when an interrupted sweep is restored) continues from its last
epoch checkpoint, and a trial whose ``metrics.json`` is already there, from this sweep or another
study with the same config, is not trained again. A lock on the folder makes a second trial of
the same config wait and reuse. ``attempts.jsonl`` gets one line per start: how often a trial ran.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from typing import Any, Dict, Optional

from cssfe.sweep.studies import Study, config_hash, trial_key

# Tests set this to a folder: a trial whose "<folder>/<trial>.fail" exists raises once after its
# first epoch (leaving "<trial>.failed"), to exercise the retry path with a real failure.
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


def final_metrics(cfg, final: Dict[str, Any]) -> Dict[str, Any]:
    """A finished run's final metrics (``metrics.json``'s "final") as one last epoch report."""
    return epoch_metrics({"epoch": cfg.optim.epochs, **final})


def _maybe_fail_once(plan: Dict[str, Any], key: str) -> None:
    folder = plan.get("fail_once_dir")
    if folder and os.path.isfile(os.path.join(folder, key + ".fail")) and not os.path.exists(os.path.join(folder, key + ".failed")):
        open(os.path.join(folder, key + ".failed"), "w").close()
        raise InjectedFailure(f"injected failure of trial {key} (test hook {FAIL_ONCE_ENV})")


def trial_dir(plan: Dict[str, Any], study: Study, variant: str, seed: int) -> str:
    """The run folder of a trial: as the plan recorded it when the sweep started (a later change to
    the config schema must not move a half-finished sweep's trials), else from its config digest."""
    recorded = plan.get("trial_dirs", {}).get(f"{variant}|{seed}")
    if recorded:
        return recorded
    cfg = study.trial_config(variant, seed)
    workers = plan.get("workers_per_trial", 1)
    # DeepSpeed checkpoints of N ranks are not a one-process run's: their own folder per world size.
    suffix = f"-w{workers}" if workers > 1 else ""
    return os.path.join(plan["trials_dir"], f"s{seed}-{config_hash(cfg)}{suffix}")


def experiment_name(plan: Dict[str, Any]) -> str:
    """The sweep a start belongs to: trial folders are shared by studies with the same config."""
    return plan.get("experiment") or plan["study"]["name"]


def run_trial(config: Dict[str, Any], plan: Dict[str, Any]) -> None:
    """Ray Tune function trainable; ``config`` = {"trial": {"variant", "seed"}}, ``plan`` from
    :func:`cssfe.sweep.runner.make_plan`."""
    import ray
    import torch

    variant, seed = config["trial"]["variant"], int(config["trial"]["seed"])
    key = trial_key(variant, seed)
    study = Study.from_dict(plan["study"])
    run_dir = trial_dir(plan, study, variant, seed)
    # As many threads as the trial was given CPUs: trials side by side must not oversubscribe cores.
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))

    cfg = study.trial_config(variant, seed, f"output_dir={run_dir}", "progress=false")
    if cfg.cache_dir is None and plan.get("cache_dir"):
        cfg.cache_dir = plan["cache_dir"]
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        _train_or_reuse(cfg, run_dir, plan, key)


def _begin(run_dir: str, plan: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Log this start in ``attempts.jsonl`` (with the sweep it belongs to); returns the final
    metrics when the trial is done already."""
    done = os.path.join(run_dir, "metrics.json")
    reuse = os.path.isfile(done)  # the folder is named by the config's digest
    action = "reuse" if reuse else "resume" if _resumable(run_dir) else "start"
    with open(os.path.join(run_dir, "attempts.jsonl"), "a") as f:
        f.write(json.dumps({"time": time.time(), "action": action, "experiment": experiment_name(plan)}) + "\n")
    if not reuse:
        return None
    with open(done) as f:
        return json.load(f)["final"]


def _resumable(run_dir: str) -> bool:
    """A checkpoint to continue from: one process's, or DeepSpeed's pointer to its newest one."""
    return any(os.path.isfile(os.path.join(run_dir, "checkpoints", *p)) for p in (("last.pt",), ("deepspeed", "latest")))


def _train_or_reuse(cfg, run_dir: str, plan: Dict[str, Any], key: str) -> None:
    from ray import tune

    from cssfe.engine.train import train

    final = _begin(run_dir, plan)
    if final is not None:  # trained by another study, or finished just before this sweep was interrupted
        tune.report(final_metrics(cfg, final))
        return

    reported = []

    def report(record: Dict[str, Any]) -> None:
        reported.append(record["epoch"])
        tune.report(epoch_metrics(record))
        _maybe_fail_once(plan, key)

    result = train(cfg, resume=_resumable(run_dir), on_epoch_end=report)
    if not reported:  # resumed a run whose last epoch was done: report its final metrics once
        tune.report(final_metrics(cfg, result["final"]))


def worker_resources(plan: Dict[str, Any]) -> Dict[str, float]:
    """What each process of a distributed trial gets: the trial's CPUs and GPUs split evenly."""
    n = plan["workers_per_trial"]
    res = {"CPU": plan["cpus_per_trial"] / n}
    if plan.get("gpus_per_trial"):
        res["GPU"] = plan["gpus_per_trial"] / n
    return res


def distributed_trial(config: Dict[str, Any], plan: Dict[str, Any]) -> None:
    """Ray Tune function trainable of a trial that spans ``plan["workers_per_trial"]`` processes.

    Ray Train's ``TorchTrainer`` starts the workers (on any nodes of the cluster) with a process
    group, gloo on CPUs or NCCL on GPUs; ``train(cfg)`` sees the launcher's ``RANK`` /
    ``WORLD_SIZE`` and runs DeepSpeed in each worker, so the trial is the same run as
    ``deepspeed launch/train.py`` with that many ranks. Rank 0's epoch metrics reach Tune through
    ``TuneReportCallback``. This function itself only waits: it holds no CPU of its own.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    variant, seed = config["trial"]["variant"], int(config["trial"]["seed"])
    study = Study.from_dict(plan["study"])
    run_dir = trial_dir(plan, study, variant, seed)
    cfg = study.trial_config(variant, seed)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        final = _begin(run_dir, plan)
        if final is not None:
            from ray import tune

            tune.report(final_metrics(cfg, final))
            return
        resources = worker_resources(plan)
        gpu = resources.get("GPU", 0) > 0
        trainer = TorchTrainer(
            _distributed_worker,
            train_loop_config={"trial": config["trial"], "plan": plan},
            scaling_config=ray.train.ScalingConfig(num_workers=plan["workers_per_trial"], use_gpu=gpu,
                                                   resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            run_config=ray.train.RunConfig(
                name=f"{trial_key(variant, seed)}-{int(time.time())}",
                storage_path=os.path.join(run_dir, "ray_train"),
                # A failed worker fails the Tune trial, and Tune's max_failures retries it from the
                # last epoch checkpoint: one retry policy for single and distributed trials.
                failure_config=ray.train.FailureConfig(max_failures=0),
                callbacks=[TuneReportCallback()],
            ),
        )
        trainer.fit()


def _distributed_worker(loop_config: Dict[str, Any]) -> None:
    """One process of a distributed trial (inside a Ray Train worker, process group set up)."""
    import ray.train
    import torch

    from cssfe.engine.train import train

    plan = loop_config["plan"]
    variant, seed = loop_config["trial"]["variant"], int(loop_config["trial"]["seed"])
    key = trial_key(variant, seed)
    study = Study.from_dict(plan["study"])
    run_dir = trial_dir(plan, study, variant, seed)
    torch.set_num_threads(max(1, int(worker_resources(plan)["CPU"])))
    cfg = study.trial_config(variant, seed, f"output_dir={run_dir}", "progress=false")
    if cfg.cache_dir is None and plan.get("cache_dir"):
        cfg.cache_dir = plan["cache_dir"]
    rank = ray.train.get_context().get_world_rank()
    reported = []

    def report(record: Dict[str, Any]) -> None:  # every rank reports (a collective); Tune gets rank 0's
        reported.append(record["epoch"])
        ray.train.report(epoch_metrics(record))
        if rank == 0:
            _maybe_fail_once(plan, key)

    # Decided here, not by the driver: Ray Train may rerun this function (node preemption) after
    # the first run wrote checkpoints. No rank can checkpoint before all have joined.
    result = train(cfg, resume=_resumable(run_dir), on_epoch_end=report)
    if not reported:
        ray.train.report(final_metrics(cfg, result["final"]))


# How a trial runs, by the number of processes it spans.
TRIAL_RUNNERS = {"single": run_trial, "distributed": distributed_trial}
