"""Run a study with Ray Tune: one trial per (variant, seed), resumable, with retries.

``run_sweep(study, SweepOptions(...))`` starts a local Ray cluster (or joins one at ``address``),
skips the variants that cannot be built here, and runs the rest as a grid of trials under
``<storage_path>/<name>/`` (a folder every node sees, or a cloud URI). If that experiment already
holds the same sweep, interrupted, it is restored with ``Tuner.restore``: finished trials are kept,
unfinished and errored ones continue from their last epoch checkpoint, which each trial reports to
Tune (``tune.report(..., checkpoint=...)``). The records that :mod:`cssfe.sweep.summary` turns into
tables come from Ray's results (the metrics the trials reported), not from trial folders: they are
right whichever node ran a trial.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from cssfe.config import ConfigError
from cssfe.sweep import storage
from cssfe.sweep.reuse import import_runs, read_runs
from cssfe.sweep.studies import Study, trial_key
from cssfe.sweep.summary import F1_FIELDS
from cssfe.sweep.trainable import FAIL_ONCE_ENV, TRIAL_RUNNERS, experiment_name, trial_dir

PLAN_FILE = "sweep_plan.json"  # the study as the sweep first ran it: a restore reruns exactly this


@dataclass
class SweepOptions:
    storage_path: str = "runs/sweeps"  # a folder every node sees, or a URI (s3://, gs://); absolute with a cluster
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
    placement: str = "PACK"  # placement group strategy of a distributed trial's workers: PACK | STRICT_PACK | SPREAD
    trial_resources: Dict[str, float] = field(default_factory=dict)  # custom resources of each trial's own process
    ship_code: bool = False  # send this package to the nodes with the job (runtime_env py_modules)
    reuse_runs: List[str] = field(default_factory=list)  # folders of finished runs to reuse (cssfe.sweep.reuse)


def experiment_dir(options: SweepOptions, study: Study) -> str:
    """``<storage>/<name>``: an absolute folder, or a URI kept as a URI."""
    return storage.join(storage.resolve(options.storage_path), options.name or study.name)


def make_plan(study: Study, options: SweepOptions, exp_dir: str) -> Dict[str, Any]:
    """Everything a trial needs besides its (variant, seed): plain data, saved beside the experiment."""
    from cssfe.cache import default_cache_dir

    base = exp_dir.rsplit("/", 1)[0] if storage.is_uri(exp_dir) else os.path.dirname(exp_dir)
    plan = {
        "study": study.to_dict(),
        # Beside the experiments, not inside one: studies that share a config share its run. On a
        # URI, trials train in node-local folders and keep their state in Tune's checkpoints.
        "trials_dir": None if storage.is_uri(exp_dir) else os.path.join(base, "trials"),
        # Ray Train's runs of distributed trials (their checkpoints), named by trial.
        "train_storage": storage.join(exp_dir, "train"),
        "cache_dir": os.path.abspath(default_cache_dir()),
        "experiment": exp_dir.rsplit("/", 1)[-1],
        "workers_per_trial": options.workers_per_trial,
        "cpus_per_trial": options.cpus_per_trial,
        "gpus_per_trial": options.gpus_per_trial,
        "placement": options.placement,
        "fail_once_dir": os.environ.get(FAIL_ONCE_ENV),
    }
    plan["trial_dirs"] = {f"{v}|{s}": trial_dir(plan, study, v, s) for v in study.variants if v not in study.skipped
                          for s in study.seeds}
    return plan


def _ensure_ray(options: SweepOptions) -> bool:
    """Start or join a cluster unless this process is connected already; True if we started it.
    Trials on every node get the driver's relevant environment and, if asked, this package."""
    import ray

    from cssfe.sweep.resources import runtime_env

    if ray.is_initialized():
        return False
    if options.address:
        ray.init(address=options.address, runtime_env=runtime_env(options))
    else:
        ray.init(num_cpus=options.num_cpus, include_dashboard=False, runtime_env=runtime_env(options))
    return True


def _trainable(plan: Dict[str, Any], options: SweepOptions):
    from ray import tune

    from cssfe.sweep.resources import trial_actor_resources

    runner = TRIAL_RUNNERS["distributed" if plan.get("workers_per_trial", 1) > 1 else "single"]
    return tune.with_resources(tune.with_parameters(runner, plan=plan), trial_actor_resources(options))


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


def trial_record(config: Dict[str, Any], metrics: Optional[Dict[str, Any]], error: Optional[BaseException] = None,
                 ended: bool = True) -> Dict[str, Any]:
    """One trial from what it reported to Tune (``Result.metrics``: its last report). ``ended``: the
    sweep is over, so a trial that neither finished nor failed was stopped by the scheduler (ASHA)."""
    metrics = metrics or {}
    variant, seed = config["trial"]["variant"], int(config["trial"]["seed"])
    record: Dict[str, Any] = {"variant": variant, "seed": seed, "epochs": metrics.get("epoch", 0),
                              "lambda": metrics.get("lambda"), "error": None, "run_dir": metrics.get("run_dir"),
                              "attempts": metrics.get("attempts", 0), "reused": bool(metrics.get("reused", False)),
                              **{g: metrics.get(f"map_{g}") for g in ("total", "head", "medium", "tail")},
                              **{f: metrics.get(f) for f in F1_FIELDS}}
    if metrics.get("finished"):
        record["status"] = "finished"
    elif error is not None:
        record["status"] = "failed"
        record["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    else:
        record["status"] = "stopped early" if ended else "unfinished"
    return record


def _order(study: Study, records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The records in table order, with one "not started" record for each trial of the study that
    Tune never created (a sweep interrupted before it got there creates no trial for it)."""
    seen = {(r["variant"], r["seed"]) for r in records}
    missing = [{**trial_record({"trial": {"variant": v, "seed": s}}, None, ended=False), "status": "not started"}
               for v in study.variants if v not in study.skipped for s in study.seeds if (v, s) not in seen]
    order = {label: i for i, label in enumerate(study.variants)}
    return sorted(records + missing, key=lambda r: (order.get(r["variant"], len(order)), r["seed"]))


def records_from_results(study: Study, results, ended: bool = True) -> List[Dict[str, Any]]:
    """The table's records from a ``ResultGrid`` (or any ``Result`` list): reported metrics only."""
    return _order(study, [trial_record(r.config, r.metrics, r.error, ended) for r in results])


def _read_plan(exp_dir: str) -> Optional[Dict[str, Any]]:
    text = storage.read_text(storage.join(exp_dir, PLAN_FILE))
    return json.loads(text) if text is not None else None


def current_records(options: SweepOptions, study: Study) -> Dict[str, Any]:
    """The sweep as Ray's experiment state shows it now (saved every second while it runs): for a
    table of a sweep still running (unfinished trials are listed, not averaged). Returns what
    :func:`run_sweep` returns."""
    from ray.tune import ExperimentAnalysis

    exp_dir = experiment_dir(options, study)
    plan = _read_plan(exp_dir)
    if plan is None:
        raise FileNotFoundError(f"no sweep in {exp_dir} (no {PLAN_FILE})")
    study = Study.from_dict(plan["study"])
    analysis = ExperimentAnalysis(exp_dir)
    records = [trial_record(t.config, t.last_result, _trial_error(t), ended=t.status in ("TERMINATED", "ERROR"))
               for t in analysis.trials]
    return {"study": study, "records": _order(study, records), "experiment_dir": exp_dir}


def _trial_error(trial) -> Optional[BaseException]:
    if trial.status != "ERROR":
        return None
    return RuntimeError((trial.error_message or "failed").strip().splitlines()[-1])


def restore_conflicts(planned: Study, requested: Study) -> List[str]:
    """What a restore would not honour: the interrupted sweep reruns its own seeds, variants and
    overrides. Empty when the request is the same sweep."""
    differences = []
    if requested.seeds != planned.seeds:
        differences.append(f"seeds {requested.seeds} (the sweep has {planned.seeds})")
    if list(requested.variants) != list(planned.variants):
        differences.append(f"variants {list(requested.variants)} (the sweep has {list(planned.variants)})")
    elif requested.variants != planned.variants:
        changed = [v for v in requested.variants if requested.variants[v] != planned.variants[v]]
        differences.append(f"other overrides for variants {changed}")
    if requested.overrides != planned.overrides or requested.config != planned.config:
        changed = sorted(k for k in set(requested.overrides) | set(planned.overrides)
                         if requested.overrides.get(k) != planned.overrides.get(k))
        differences.append(f"other overrides ({', '.join(changed) or 'config'}) for every trial")
    return differences


def _prepare(study: Study, options: SweepOptions) -> None:
    """Checks that need no cluster, before anything else."""
    from cssfe.sweep.preflight import check_distributed
    from cssfe.sweep.resources import check_placement

    if options.workers_per_trial < 1:
        raise ValueError(f"workers_per_trial must be >= 1, got {options.workers_per_trial}")
    storage.check_cluster_storage(options.storage_path, options.address)
    check_placement(options)
    if options.workers_per_trial > 1:
        check_distributed(study, options.workers_per_trial)


def _used_by_others(run_dir: str, experiment: str) -> bool:
    """Whether another study's sweep started this shared run folder (its ``attempts.jsonl``)."""
    text = storage.read_text(storage.join(run_dir, "attempts.jsonl")) or ""
    return any(json.loads(line).get("experiment") != experiment for line in text.splitlines() if line.strip())


def run_sweep(study: Study, options: SweepOptions) -> Dict[str, Any]:
    """Run (or continue) the sweep; returns {"study", "records", "experiment_dir", "results"}."""
    import ray
    from ray import tune

    from cssfe.sweep.paths import pin_paths
    from cssfe.sweep.preflight import check_variants
    from cssfe.sweep.resources import check_resources

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    study = pin_paths(study)  # trials run in their own working directories, maybe on other nodes
    _prepare(study, options)
    reusable = read_runs(options.reuse_runs) if options.reuse_runs else {}
    exp_dir = experiment_dir(options, study)
    # The experiment state is tiny: save it every second so that a trial that finished just before
    # an interruption is known as finished (Ray's default waits up to 10 s).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    plan = _read_plan(exp_dir)
    if not options.restore and plan is not None:  # --fresh: the experiment and its trials' runs start over
        kept = []
        for folder in filter(None, plan.get("trial_dirs", {}).values()):
            if _used_by_others(folder, experiment_name(plan)):
                kept.append(folder)
            else:
                storage.remove_tree(folder)
        if kept:
            print(f"sweep: --fresh kept {len(kept)} run folder(s) that other studies share (their trials are "
                  f"reused, not retrained): {', '.join(kept)}", flush=True)
        storage.remove_tree(exp_dir)
        plan = None
    restoring = plan is not None and tune.Tuner.can_restore(exp_dir)
    if restoring:
        conflicts = restore_conflicts(Study.from_dict({**plan["study"], "skipped": {}}),
                                      Study(**{**study.to_dict(), "skipped": {}}))
        if conflicts:
            raise ConfigError(f"{exp_dir} holds an interrupted sweep that a restore would continue as it started, "
                              f"not with {'; '.join(conflicts)}: rerun without them, or start over with --fresh, "
                              "or give another --name")
        study = Study.from_dict(plan["study"])
        print(f"sweep: continuing the interrupted sweep in {exp_dir}", flush=True)
    else:
        check_variants(study)
        for label, reason in study.skipped.items():
            print(f"sweep: skipping variant {label!r}: {reason}", flush=True)
        plan = make_plan(study, options, exp_dir)
    if reusable:
        copied = import_runs(reusable, study, plan)
        print(f"sweep: --reuse-runs: {len(copied)} finished run(s) taken for trials of this study"
              + "".join(f"\n  {line}" for line in copied), flush=True)
    runnable = [label for label in study.variants if label not in study.skipped]
    started = _ensure_ray(options)
    try:
        check_resources(study, options, ray.cluster_resources())
        if options.address:
            missing = storage.nodes_not_seeing(storage.resolve(options.storage_path))
            if missing:
                raise ConfigError(f"--storage {options.storage_path}: nodes {', '.join(missing)} do not see this folder "
                                  "(node-local storage); give a folder shared by all nodes or a cloud URI")
        if not restoring:
            storage.write_text(storage.join(exp_dir, PLAN_FILE), json.dumps(plan, indent=1))
        if not runnable:
            return {"study": study, "records": [], "experiment_dir": exp_dir, "results": None}
        trainable = _trainable(plan, options)
        if restoring:
            tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = _new_tuner(study, options, plan, trainable, runnable, exp_dir)
        grid = tuner.fit()
        # Interrupted (Ctrl-C): in the result grid an interrupted trial looks like one ASHA stopped, and
        # trials not created yet carry no config; Tune's state saved at the interruption tells them apart.
        saved = current_records(options, study)
        if any(r.config is None for r in grid) or any(r["status"] == "unfinished" for r in saved["records"]):
            return {**saved, "results": grid}
        return {"study": study, "records": records_from_results(study, grid), "experiment_dir": exp_dir, "results": grid}
    finally:
        if started:
            ray.shutdown()


def _trial_dirname(trial) -> str:
    """Tune's folder of a trial, by variant and seed (Ray's default is a hash of the config)."""
    return f"{trial_key(trial.config['trial']['variant'], trial.config['trial']['seed'])}_{trial.trial_id}"


def _new_tuner(study: Study, options: SweepOptions, plan: Dict[str, Any], trainable, runnable: List[str], exp_dir: str):
    from ray import tune

    scheduler = None
    if options.asha:
        from ray.tune.schedulers import ASHAScheduler

        epochs = study.trial_config(runnable[0], study.seeds[0]).optim.epochs
        # max_t one past the last epoch: at max_t ASHA stops a trial, which would cut the trial off
        # between its last epoch's report and the report of its complete run (metrics.json).
        scheduler = ASHAScheduler(time_attr="epoch", metric="map_total", mode="max", max_t=epochs + 1,
                                  grace_period=min(options.asha_grace_epochs, epochs))
    base = exp_dir.rsplit("/", 1)[0] if storage.is_uri(exp_dir) else os.path.dirname(exp_dir)
    return tune.Tuner(
        trainable,
        # One grid dimension in an explicit order, seed by seed: a sweep cut short has every
        # variant at the same number of seeds.
        param_space={"trial": tune.grid_search([{"variant": v, "seed": s} for s in study.seeds for v in runnable])},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=_max_concurrent(options, plan),
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=plan["experiment"],
            storage_path=base,
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            # The newest epoch checkpoint is all a retry or a restore needs.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=options.verbose,
        ),
    )
