"""Multi-process training with DeepSpeed: joining the launch, each rank's device, the DeepSpeed
config, gathered evaluation.

Who started the process (deepspeed, torchrun, srun, mpirun, Ray Train) is read by
:mod:`cssfe.engine.launchers`; a config with ``distributed.deepspeed_config`` asks for DeepSpeed in
a single process too. CPU ranks use DeepSpeed's CPU accelerator with the gloo backend; GPU ranks use
NCCL.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from cssfe.config import ConfigError, TrainConfig
from cssfe.engine.launchers import LaunchError, detect

PRECISION_SECTIONS = {
    "fp32": {},
    "bf16": {"bf16": {"enabled": True}},
    "fp16": {"fp16": {"enabled": True, "initial_scale_power": 16}},
}
# The one rule for mixed dtypes under bf16 / fp16: DeepSpeed holds every floating parameter AND
# buffer in the training dtype (it keeps buffers in fp32 unless told), so batch norm sees weights,
# running statistics and input of one dtype; PyTorch's norm kernels accumulate in fp32 inside.
# The head computes its probabilities (affinity R, gate) and the loss from fp32 and casts R and the
# gate to the activations' dtype where they meet them; the EMA copy and evaluation are fp32.
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def launched() -> bool:
    """True when a launcher (deepspeed, torchrun, srun, mpirun, Ray Train) started this process as
    one rank; raises :class:`LaunchError` when its variables contradict each other."""
    return detect().distributed


def wanted(cfg: TrainConfig) -> bool:
    return launched() or cfg.distributed.deepspeed_config is not None


def world_size() -> int:
    """The number of ranks of this launch (1 without a launcher)."""
    return detect().world_size


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device_type: str, timeout_s: Optional[float] = None) -> Context:
    """Join the process group: the launcher's variables become the torch ones (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT), a group of one without a launcher. ``timeout_s``
    (``distributed.timeout_s``) bounds every collective, the wait for rank 0's preparation
    included; None keeps DeepSpeed's (10 minutes, or DEEPSPEED_TIMEOUT)."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    launch = detect()
    if launch.distributed:
        os.environ.update(launch.variables())
    else:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():  # Ray Train sets its group up before train() runs
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise LaunchError(f"started by {launch.launcher} as rank {launch.rank} of {launch.world_size}, but "
                              f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: the launcher "
                              "sets them (deepspeed, torchrun); export them when starting ranks by hand")
        # DeepSpeed's own MPI discovery (mpi4py) is off: the launcher's variables are already the torch ones
        extra = {"timeout": timedelta(seconds=timeout_s)} if timeout_s is not None else {}
        deepspeed.init_distributed(dist_backend="gloo" if device_type == "cpu" else "nccl", auto_mpi_discovery=False, **extra)
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def leaving_process_group():
    """Leave, when the block ends, a process group joined inside it (a group that existed before,
    Ray Train's, is its owner's to end). The command line wraps its run in this: gloo's worker
    threads left to interpreter finalization can abort a finished rank (SIGABRT, "terminate called
    without an active exception"), turning a good run into a failed launch. ``train()`` itself
    keeps the group: DeepSpeed caches its groups per process, so a process that trains again (a
    notebook, the tests) reuses the one it joined."""
    import torch.distributed as dist

    joined_before = dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        if not joined_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def rank_device(local_rank: int) -> torch.device:
    """The GPU of the rank with this LOCAL_RANK, among those visible to it. A rank that sees every
    GPU of its node (deepspeed, torchrun) takes ``cuda:LOCAL_RANK``; a rank the scheduler gave one
    GPU (srun --gpus-per-task 1, CUDA_VISIBLE_DEVICES with one entry) takes ``cuda:0``. Anything
    else would guess, so it stops naming the numbers."""
    visible = torch.cuda.device_count()
    if local_rank < visible:
        return torch.device("cuda", local_rank)
    if visible == 1:
        return torch.device("cuda", 0)
    raise LaunchError(
        f"LOCAL_RANK={local_rank}, but this rank sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): give each rank either every GPU of its node (it "
        "uses the one its LOCAL_RANK names) or exactly one (srun --gpus-per-task 1), or name it with device=cuda:N")


def _read_file(path: str) -> Dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"config key 'distributed.deepspeed_config': cannot read {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key 'distributed.deepspeed_config': {path} must hold a mapping")
    return data


# DeepSpeed keys a file may not set: cssfe builds these from its own config.
CSSFE_OWNED_KEYS = {"optimizer": "optim (AdamW with cssfe's parameter groups)",
              "scheduler": "optim (the OneCycle schedule)", "amp": "distributed.precision",
              "torch_autocast": "distributed.precision"}
# Under bf16, gradients are reduced over ranks in fp32 at ZeRO stages 1-3 and accumulated over
# micro-batches in fp32 at stages 2-3 (DeepSpeed would use bf16 for both); a file may set these keys
# itself. Stage 0 cannot (DeepSpeed's stage-0 bf16 optimizer refuses another grad_accum_dtype);
# at stage 1 an fp32 grad_accum_dtype switches DeepSpeed to its BF16_Optimizer, whose checkpoints
# zero_to_fp32 (cssfe.engine.consolidate) cannot read.
EXACT_BF16_COMMUNICATION = ("communication_data_type", "fp32", 1)  # key, value, from this stage on
EXACT_BF16_DATA_TYPES = ("grad_accum_dtype", "fp32", 2)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed config of this run, with the batch arithmetic checked before any work:
    data.batch_size (global) = micro-batch x distributed.grad_accum x world size. Keys the cssfe
    config decides (batch sizes, gradient clipping, precision, optimizer and schedule) may appear
    in the file only with the values cssfe gives them; a conflict stops the run naming file and key."""
    d = cfg.distributed
    path = d.deepspeed_config
    base = _read_file(path) if path else {}
    where = f"{path}: " if path else ""
    zero = dict(base.get("zero_optimization") or {})
    stage = d.zero_stage if d.zero_stage is not None else zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    zero["stage"] = stage
    accum = d.grad_accum
    micro, rest = divmod(cfg.data.batch_size, accum * world_size)
    if rest or micro == 0:
        raise ConfigError(
            f"config key 'data.batch_size' ({cfg.data.batch_size}, the global batch) must be a multiple of "
            f"distributed.grad_accum ({accum}) x world size ({world_size}) = {accum * world_size}: "
            f"global = micro-batch x accumulation x world size")
    batch = {"train_batch_size": cfg.data.batch_size, "train_micro_batch_size_per_gpu": micro,
             "gradient_accumulation_steps": accum}
    for key, value in batch.items():
        if key in base and base[key] != value:
            raise ConfigError(f"{where}{key} is {base[key]}, but the cssfe config gives {value} "
                              f"(data.batch_size={cfg.data.batch_size}, distributed.grad_accum={accum}, world size {world_size})")
    if "gradient_clipping" in base and base["gradient_clipping"] != cfg.optim.grad_clip:
        raise ConfigError(f"{where}gradient_clipping is {base['gradient_clipping']}, but optim.grad_clip is "
                          f"{cfg.optim.grad_clip}; remove the key (cssfe sets it from optim.grad_clip)")
    for key, owner in CSSFE_OWNED_KEYS.items():
        if key in base:
            raise ConfigError(f"{where}{key} is set, but cssfe takes it from {owner}; remove the key")
    precision = {}
    for name in ("bf16", "fp16"):
        section = dict(base.get(name) or {})
        enabled = bool(section.get("enabled", False))
        if enabled and d.precision != name:
            raise ConfigError(f"{where}{name} is enabled, but distributed.precision is {d.precision!r}; set one of them")
        if d.precision == name:  # the file's own settings of this precision (loss scaling, ...) are kept
            if "enabled" in section and not enabled:
                raise ConfigError(f"{where}{name}.enabled is false, but distributed.precision is {name}; set one of them")
            precision[name] = {**PRECISION_SECTIONS[name][name], **section}
    data_types = dict(base.get("data_types") or {})
    if d.precision in PRECISION_DTYPES:
        buffers = data_types.setdefault("buffer_dtype", d.precision)
        if buffers != d.precision:
            raise ConfigError(f"{where}data_types.buffer_dtype is {buffers!r}, but distributed.precision={d.precision} "
                              f"keeps buffers (batch-norm statistics) in {d.precision} too; remove it")
    out = {k: v for k, v in base.items() if k not in ("bf16", "fp16", "data_types")}
    if d.precision == "bf16":
        for section, (key, value, from_stage) in ((out, EXACT_BF16_COMMUNICATION), (data_types, EXACT_BF16_DATA_TYPES)):
            if stage >= from_stage:
                section.setdefault(key, value)
    out.update(batch)
    out.update(precision)
    if data_types:
        out["data_types"] = data_types
    out["zero_optimization"] = zero
    out["gradient_clipping"] = cfg.optim.grad_clip
    out.setdefault("steps_per_print", 1 << 30)  # our own progress bar and log report the steps
    out.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW, with our parameter groups
    return out


def check_precision(precision: str, device_type: str) -> None:
    """Refuse, before any work, a precision the ranks' device cannot train in, naming what can."""
    if precision not in PRECISION_DTYPES:
        return
    if device_type == "cpu":
        # what DeepSpeed's CPU accelerator asks (oneDNN fp16 kernels); bf16 it always accepts
        supported = precision == "bf16" or torch.ops.mkldnn._is_mkldnn_fp16_supported()
        hint = "distributed.precision=bf16 (or fp32)"
    else:
        supported = precision == "fp16" or torch.cuda.is_bf16_supported()
        hint = "distributed.precision=fp16 (or fp32)"
    if not supported:
        raise ConfigError(f"config key 'distributed.precision': {precision} is not supported on this {device_type} "
                          f"({'no oneDNN fp16 kernels' if device_type == 'cpu' else 'the GPU has no bf16'}, which "
                          f"DeepSpeed needs); use {hint}")


def zero3(ds_config: Optional[Dict[str, Any]]) -> bool:
    return ds_config is not None and ds_config["zero_optimization"]["stage"] == 3


def gathered(params, partitioned: bool):
    """``with gathered(params, partitioned):`` the full values of ``params`` are readable inside;
    under ZeRO-3 (``partitioned``) each rank holds only a slice outside such a block. Every rank
    must enter it (it is a collective)."""
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params))


def release_cpu_buffers(ctx: Context) -> None:
    """Unlink this rank's CPU all-reduce buffer, which DeepSpeed leaves in /dev/shm
    (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, one per rank and launch). Every rank
    opened every buffer when DeepSpeed set them up, and mappings outlive the name, so no barrier."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{ctx.rank}"
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # DeepSpeed did not need one (one rank, or GPU collectives)
        pass


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Make every rank hold rank 0's buffers (batch-norm statistics are per rank: no SyncBN on CPU)."""
    import torch.distributed as dist

    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def all_reduce_sum(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def shard_range(size: int, rank: int, world_size: int) -> range:
    """Contiguous, disjoint, covering: each test image is evaluated by exactly one rank."""
    return range(size * rank // world_size, size * (rank + 1) // world_size)


def gather_predictions(local: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Every rank's predictions, concatenated in rank order (= the test set's order)."""
    import torch.distributed as dist

    parts: List[Optional[Dict[str, np.ndarray]]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: np.concatenate([p[k] for p in parts]) for k in local}
