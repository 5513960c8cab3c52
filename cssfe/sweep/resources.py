"""What a trial asks the cluster for, checked against what the cluster has before anything is
scheduled, and the environment every node's trial processes get.

- GPUs: Ray 2.60 no longer sets ``CUDA_VISIBLE_DEVICES`` for actors that ask for no GPU, so on a
  cluster with GPUs a GPU-less trial would train on ``cuda:0`` beside whatever owns that GPU: such a
  sweep is refused unless its configs say ``device=cpu``. A rank of a distributed trial gets
  exactly one GPU.
- Placement: the strategy of a distributed trial's placement group (``PACK``: ranks on as few nodes
  as fit, ``STRICT_PACK``: all on one node, ``SPREAD``: one per node as far as possible).
- Custom resources (``--trial-resource non_preemptible=0.01``): the trial's own process (for a
  distributed trial: the one that waits for its workers) needs them, so it lands on nodes that
  were started with ``ray start --resources '{"non_preemptible": 100}'``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping

from cssfe.config import ConfigError
from cssfe.sweep.studies import Study

PLACEMENT_STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD")
# The driver's settings that trials on other nodes need to see (hub access, caches, thread counts).
PROPAGATED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TORCH_HOME", "CSSFE_CACHE",
                  "CSSFE_EXT_DIR", "OMP_NUM_THREADS", "TRITON_INTERPRET", "DS_ACCELERATOR")


def check_resources(study: Study, options, cluster: Mapping[str, float]) -> None:
    """Refuse what the cluster (``ray.cluster_resources()``) cannot run, naming the option at fault."""
    gpus = cluster.get("GPU", 0)
    if gpus and not options.gpus_per_trial:
        on_gpu = [label for label in study.variants if label not in study.skipped
                  and study.trial_config(label, study.seeds[0]).device != "cpu"]
        if on_gpu:
            raise ConfigError(
                f"the cluster has {gpus:g} GPUs but --gpus-per-trial is 0: Ray gives GPU-less trials no "
                "CUDA_VISIBLE_DEVICES, so every trial would train on cuda:0 at once. Ask for GPUs "
                f"(--gpus-per-trial {options.workers_per_trial}) or train on CPUs with the override device=cpu")
    if options.gpus_per_trial and options.gpus_per_trial > gpus:
        raise ConfigError(f"--gpus-per-trial {options.gpus_per_trial:g}: the cluster has {gpus:g} GPUs")
    for name, amount in options.trial_resources.items():
        if cluster.get(name, 0) < amount:
            raise ConfigError(f"--trial-resource {name}={amount:g}: no node offers the custom resource {name!r} "
                              f"(the cluster has: {', '.join(sorted(cluster))}); start nodes with "
                              f"ray start --resources '{{\"{name}\": 1}}'")


def check_placement(options) -> None:
    if options.placement not in PLACEMENT_STRATEGIES:
        raise ConfigError(f"--placement {options.placement!r}: one of {', '.join(PLACEMENT_STRATEGIES)}")
    if options.gpus_per_trial and options.gpus_per_trial != options.workers_per_trial:
        raise ConfigError(
            f"--gpus-per-trial {options.gpus_per_trial:g} with {options.workers_per_trial} worker(s) per trial: each "
            "process (DeepSpeed rank) trains on exactly one GPU; use --gpus-per-trial equal to --workers-per-trial")


def trial_actor_resources(options) -> Dict[str, float]:
    """The Tune trial's own process. A distributed trial's process only waits for its Ray Train
    workers, which hold the CPUs and GPUs; Tune needs some request, so it asks for a byte of memory."""
    if options.workers_per_trial > 1:
        base: Dict[str, float] = {"cpu": 0, "gpu": 0, "memory": 1}
    else:
        base = {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial}
    return {**base, **options.trial_resources}


def runtime_env(options) -> Dict[str, Any]:
    """Ray's ``runtime_env`` for the job: the driver's relevant environment variables, Ray Train V2,
    and, with ``ship_code``, this package (for nodes where it is not installed)."""
    env_vars = {name: os.environ[name] for name in PROPAGATED_ENV if name in os.environ}
    env_vars["RAY_TRAIN_V2_ENABLED"] = "1"  # TuneReportCallback and the restore-by-name of Train V2
    env: Dict[str, Any] = {"env_vars": env_vars}
    if options.ship_code:
        import cssfe

        env["py_modules"] = [os.path.dirname(os.path.abspath(cssfe.__file__))]
    return env
