"""Run a study with Ray Tune: one trial per (variant, seed), resumable, with retries.

``run_sweep(study, SweepOptions(...))`` starts a local Ray cluster (or joins one at ``address``),
skips the variants that cannot be built here, and runs the rest as a grid of trials under
``<storage_path>/<name>/``. If that folder already holds the same sweep, interrupted, it is
restored with ``Tuner.restore``: finished trials are kept, unfinished and errored ones continue
from their last epoch checkpoint. Returns the trial records that :mod:`cssfe.sweep.summary`
turns into tables.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from cssfe.sweep.studies import Study
from cssfe.sweep.summary import F1_FIELDS
from cssfe.sweep.trainable import FAIL_ONCE_ENV, TRIAL_RUNNERS, experiment_name, trial_dir

PLAN_FILE = "sweep_plan.json"  # the study as the sweep first ran it: a restore reruns exactly this


@dataclass
class SweepOptions:
    storage_path: str = "runs/sweeps"  # must be reachable from every node when joining a cluster
    name: Optional[str] = None  # experiment folder name (default: the study's name)
    address: Optional[str] = None  # None: start a local cluster; "auto" or "HOST:PORT": join one
    num_cpus: Optional[int] = None  # CPUs of a local cluster (None: all)
    cpus_per_trial: float = 1.0  # of a distributed trial: of all its workers together, split evenly
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1  # > 1: a distributed trial (Ray Train workers running DeepSpeed)
    max_concurrent_trials: int = 0  # 0: as many as resources allow
    max_failures: int = 1  # retries of a trial that raises, each from its last epoch checkpoint
    asha: bool = False  # stop weak trials early (ASHA on total mAP)
    asha_grace_epochs: int = 5
    restore: bool = True  # continue an interrupted sweep of the same name
    verbose: int = 1  # Ray Tune's console output: 0 silent, 1 status, 2 every result


def experiment_dir(options: SweepOptions, study: Study) -> str:
    return os.path.join(os.path.abspath(options.storage_path), options.name or study.name)


def make_plan(study: Study, options: SweepOptions, exp_dir: str) -> Dict[str, Any]:
    """Everything a trial needs besides its (variant, seed): plain data, saved beside the experiment."""
    from cssfe.engine.train import default_cache_dir

    plan = {
        "study": study.to_dict(),
        # Beside the experiments, not inside one: studies that share a config share its run.
        "trials_dir": os.path.join(os.path.dirname(exp_dir), "trials"),
        "cache_dir": os.path.abspath(default_cache_dir()),
        "experiment": os.path.basename(exp_dir),
        "workers_per_trial": options.workers_per_trial,
        "cpus_per_trial": options.cpus_per_trial,
        "gpus_per_trial": options.gpus_per_trial,
        "fail_once_dir": os.environ.get(FAIL_ONCE_ENV),
    }
    plan["trial_dirs"] = {f"{v}|{s}": trial_dir(plan, study, v, s) for v in study.variants if v not in study.skipped
                          for s in study.seeds}
    return plan


def _ensure_ray(options: SweepOptions) -> bool:
    """Start or join a cluster unless this process is connected already; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if options.address:
        ray.init(address=options.address)
    else:
        ray.init(num_cpus=options.num_cpus, include_dashboard=False)
    return True


def _trainable(plan: Dict[str, Any], options: SweepOptions):
    from ray import tune

    distributed = plan.get("workers_per_trial", 1) > 1
    runner = TRIAL_RUNNERS["distributed" if distributed else "single"]
    # A distributed trial's own process only waits for its Ray Train workers, which hold the CPUs and
    # GPUs; Tune needs some request, so it asks for a byte of memory.
    resources = {"cpu": 0, "gpu": 0, "memory": 1} if distributed else {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(runner, plan=plan), resources)


def _max_concurrent(options: SweepOptions, plan: Dict[str, Any]) -> Optional[int]:
    """Trials at a time. Distributed trials hold no resources of their own, so Tune would start every
    one of them at once, each waiting for its workers: cap them at what the cluster can run."""
    if options.max_concurrent_trials:
        return options.max_concurrent_trials
    if plan.get("workers_per_trial", 1) <= 1:
        return None
    import ray

    cluster = ray.cluster_resources()
    fits = [cluster.get(kind, 0) // amount for kind, amount in (("CPU", options.cpus_per_trial), ("GPU", options.gpus_per_trial))
            if amount]
    return max(1, int(min(fits))) if fits else None


def trial_record(study: Study, plan: Dict[str, Any], variant: str, seed: int, tune_status: Optional[str] = None,
                 error: Optional[BaseException] = None) -> Dict[str, Any]:
    """One trial as its run folder shows it: final metrics from metrics.json when it finished, else
    those of its last logged epoch. ``tune_status`` (from Ray's results) tells a trial the scheduler
    stopped (ASHA) from one that has not ended yet."""
    run_dir = trial_dir(plan, study, variant, seed)
    log_path, final_path = os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "metrics.json")
    record: Dict[str, Any] = {"variant": variant, "seed": seed, "epochs": 0, "lambda": None, "error": None, "run_dir": run_dir,
                              **{g: None for g in ("total", "head", "medium", "tail")}, **{f: None for f in F1_FIELDS}}
    if os.path.isfile(log_path):
        with open(log_path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        if lines:
            last = lines[-1]
            record.update(epochs=last["epoch"], **{"lambda": last.get("lambda")}, **(last.get("mAP") or {}))
    if os.path.isfile(final_path):
        with open(final_path) as f:
            final = json.load(f)["final"]
        record.update(final["mAP"])
        record.update({f"f1_{k}": v for k, v in (final.get("f1") or {}).items() if f"f1_{k}" in F1_FIELDS})
        record["status"] = "finished"
    elif error is not None:
        record["status"] = "failed"
        record["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    else:
        record["status"] = "stopped early" if tune_status == "done" else "unfinished"
    attempts = os.path.join(run_dir, "attempts.jsonl")
    lines = [json.loads(line) for line in open(attempts) if line.strip()] if os.path.isfile(attempts) else []
    # The folder may serve several studies with this config: count only this sweep's starts.
    actions = [a["action"] for a in lines if a.get("experiment") == experiment_name(plan)]
    record["attempts"] = sum(a != "reuse" for a in actions)  # training starts; "reuse" trains nothing
    record["reused"] = bool(actions) and all(a == "reuse" for a in actions)  # trained by another sweep
    return record


def _order(study: Study, records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    order = {label: i for i, label in enumerate(study.variants)}
    return sorted(records, key=lambda r: (order.get(r["variant"], len(order)), r["seed"]))


def _records(study: Study, plan: Dict[str, Any], grid) -> List[Dict[str, Any]]:
    return _order(study, [trial_record(study, plan, r.config["trial"]["variant"], int(r.config["trial"]["seed"]),
                                       tune_status="done", error=r.error) for r in grid])


def current_records(options: SweepOptions, study: Study) -> Dict[str, Any]:
    """The sweep as its folders show it now, without Ray: for a table of a sweep still running
    (unfinished trials are listed, not averaged). Returns what :func:`run_sweep` returns."""
    exp_dir = experiment_dir(options, study)
    plan_path = os.path.join(exp_dir, PLAN_FILE)
    if not os.path.isfile(plan_path):
        raise FileNotFoundError(f"no sweep in {exp_dir} (no {PLAN_FILE})")
    with open(plan_path) as f:
        plan = json.load(f)
    study = Study.from_dict(plan["study"])
    records = [trial_record(study, plan, v, s) for v in study.variants if v not in study.skipped for s in study.seeds]
    return {"study": study, "records": _order(study, records), "experiment_dir": exp_dir}


def run_sweep(study: Study, options: SweepOptions) -> Dict[str, Any]:
    """Run (or continue) the sweep; returns {"study", "records", "experiment_dir"}."""
    import ray
    from ray import tune

    from cssfe.sweep.preflight import check_distributed, check_variants

    if options.workers_per_trial < 1:
        raise ValueError(f"workers_per_trial must be >= 1, got {options.workers_per_trial}")
    exp_dir = experiment_dir(options, study)
    plan_path = os.path.join(exp_dir, PLAN_FILE)
    # The experiment state is tiny: save it every second so that a trial that finished just before
    # an interruption is known as finished (Ray's default waits up to 10 s).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    restoring = options.restore and os.path.isfile(plan_path) and tune.Tuner.can_restore(exp_dir)
    if restoring:
        with open(plan_path) as f:
            plan = json.load(f)
        study = Study.from_dict(plan["study"])
        print(f"sweep: continuing the interrupted sweep in {exp_dir}", flush=True)
    else:
        if options.workers_per_trial > 1:
            check_distributed(study, options.workers_per_trial, options.gpus_per_trial)
        check_variants(study)
        for label, reason in study.skipped.items():
            print(f"sweep: skipping variant {label!r}: {reason}", flush=True)
        os.makedirs(exp_dir, exist_ok=True)
        plan = make_plan(study, options, exp_dir)
        with open(plan_path, "w") as f:
            json.dump(plan, f, indent=1)
    runnable = [label for label in study.variants if label not in study.skipped]
    started = _ensure_ray(options)
    try:
        if not runnable:
            return {"study": study, "records": [], "experiment_dir": exp_dir}
        trainable = _trainable(plan, options)
        if restoring:
            tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            scheduler = None
            if options.asha:
                from ray.tune.schedulers import ASHAScheduler

                epochs = study.trial_config(runnable[0], study.seeds[0]).optim.epochs
                # max_t one past the last epoch: at max_t ASHA stops a trial, which would cut the
                # trial off between its last report and the metrics.json that train() writes after it.
                scheduler = ASHAScheduler(time_attr="epoch", metric="map_total", mode="max", max_t=epochs + 1,
                                          grace_period=min(options.asha_grace_epochs, epochs))
            tuner = tune.Tuner(
                trainable,
                # One grid dimension in an explicit order, seed by seed: a sweep cut short has every
                # variant at the same number of seeds.
                param_space={"trial": tune.grid_search([{"variant": v, "seed": s} for s in study.seeds for v in runnable])},
                tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=_max_concurrent(options, plan)),
                run_config=tune.RunConfig(
                    name=os.path.basename(exp_dir),
                    storage_path=os.path.dirname(exp_dir),
                    failure_config=tune.FailureConfig(max_failures=options.max_failures),
                    verbose=options.verbose,
                ),
            )
        grid = tuner.fit()
        return {"study": study, "records": _records(study, plan, grid), "experiment_dir": exp_dir}
    finally:
        if started:
            ray.shutdown()
