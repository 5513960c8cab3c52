"""Who started this process: each launcher's variables, read into RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT (what ``torch.distributed``'s ``env://`` and DeepSpeed read).

``LAUNCHERS`` lists the launchers innermost first: a launcher started inside another one (torchrun
inside srun, a Ray worker on a node that srun started, mpirun's ranks inside a Slurm allocation)
inherits the outer one's variables, so the first description whose marker is set describes this
process and the outer variables are ignored. No mpi4py is needed: the MPI launchers' own variables
say the rank and size.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Tuple

DEFAULT_MASTER_PORT = 29500  # torch's and DeepSpeed's default
LOCALHOST = "127.0.0.1"


class LaunchError(ValueError):
    """A launcher's variables are missing, not numbers or contradict each other; the message names them."""


@dataclass(frozen=True)
class Launch:
    """This process's place in the launch; ``launcher`` None: a single process (no launcher, or a
    launcher that started just one task)."""

    launcher: Optional[str] = None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: Optional[str] = None  # None: must already be in the environment (or not needed)
    master_port: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.launcher is not None

    def variables(self) -> dict:
        """The torch variables this launch sets (only those it knows)."""
        out = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank)}
        if self.master_addr is not None:
            out["MASTER_ADDR"] = self.master_addr
        if self.master_port is not None:
            out["MASTER_PORT"] = self.master_port
        return out


MasterRule = Callable[[Mapping[str, str], int, Optional[int]], Optional[str]]


def _given(env: Mapping[str, str], world_size: int, local_size: Optional[int]) -> Optional[str]:
    return None  # the launcher exports MASTER_ADDR itself (deepspeed, torchrun, Ray Train)


def _one_node(env: Mapping[str, str], world_size: int, local_size: Optional[int]) -> Optional[str]:
    """Every rank on this node: rank 0 is local. Across nodes MPI says nothing about rank 0's host."""
    return LOCALHOST if local_size == world_size else None


def _slurm_first_node(env: Mapping[str, str], world_size: int, local_size: Optional[int]) -> Optional[str]:
    """srun places task 0 on the first node of the step (block and cyclic distributions alike)."""
    if env.get("SLURM_STEP_NUM_NODES") == "1":
        return LOCALHOST
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    scontrol = shutil.which("scontrol")
    if not nodes or scontrol is None:
        return None
    try:
        out = subprocess.run([scontrol, "show", "hostnames", nodes], capture_output=True, text=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    hosts = out.stdout.split()
    return hosts[0] if hosts else None


def _refuse_unstarted_tasks(env: Mapping[str, str]) -> None:
    """A batch script's own process inside an allocation of several tasks: srun was forgotten."""
    tasks = env.get("SLURM_NTASKS")
    if tasks is not None and tasks.isdigit() and int(tasks) > 1:
        raise LaunchError(
            f"this process runs inside a Slurm allocation of {tasks} tasks (SLURM_NTASKS={tasks}, SLURM_JOB_ID="
            f"{env.get('SLURM_JOB_ID')}) but srun did not start it (no SLURM_STEP_NUM_TASKS): it would train alone. "
            "Start every task with 'srun python launch/train.py ...' (one task per GPU) or 'srun torchrun ...' / "
            "'srun deepspeed ...' (one task per node), or run one process with 'srun --ntasks 1 python launch/train.py ...'")


@dataclass(frozen=True)
class Launcher:
    """What one launcher sets in the processes it starts. ``rank`` None: it starts single processes."""

    name: str
    marker: str  # set only in the processes this launcher started
    rank: Optional[str] = None
    world_size: Optional[str] = None
    local_rank: Tuple[str, ...] = ()  # the first one set
    local_size: Optional[str] = None  # ranks on this node, where the launcher says
    master_addr: MasterRule = _given
    single_task_is_distributed: bool = False  # a world of one still runs through DeepSpeed
    check: Optional[Callable[[Mapping[str, str]], None]] = None


LAUNCHERS: Tuple[Launcher, ...] = (
    # deepspeed, torchrun, Ray Train, DeepSpeed's MPICH / Intel MPI runners: the torch variables
    Launcher("a torch launcher (deepspeed, torchrun, Ray Train)", "RANK", "RANK", "WORLD_SIZE", ("LOCAL_RANK",),
             "LOCAL_WORLD_SIZE", single_task_is_distributed=True),
    Launcher("a Ray worker", "RAY_RAYLET_PID"),  # one process; Ray Train's workers carry RANK
    Launcher("Open MPI (mpirun)", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
             ("OMPI_COMM_WORLD_LOCAL_RANK",), "OMPI_COMM_WORLD_LOCAL_SIZE", _one_node),
    Launcher("MVAPICH (mpirun_rsh)", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
             ("MV2_COMM_WORLD_LOCAL_RANK",), "MV2_COMM_WORLD_LOCAL_SIZE", _one_node),
    Launcher("MPICH / Intel MPI (PMI)", "PMI_SIZE", "PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PALS_LOCAL_RANKID"),
             "MPI_LOCALNRANKS", _one_node),
    Launcher("Slurm (srun)", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", ("SLURM_LOCALID",),
             None, _slurm_first_node),
    Launcher("a Slurm batch script", "SLURM_JOB_ID", check=_refuse_unstarted_tasks),
)


def _integer(env: Mapping[str, str], name: str, launcher: Launcher) -> int:
    value = env.get(name)
    if value is None:
        raise LaunchError(f"started by {launcher.name} ({launcher.marker} is set) but {name} is not set")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not a number (started by {launcher.name})") from None


def _first(env: Mapping[str, str], names: Tuple[str, ...]) -> Optional[str]:
    return next((n for n in names if n in env), None)


def detect(env: Optional[Mapping[str, str]] = None) -> Launch:
    """This process's launch from ``env`` (default ``os.environ``), checked: raises
    :class:`LaunchError` naming the variables when they are missing or contradict each other."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" not in env and not any(
            launcher.marker in env for launcher in LAUNCHERS if launcher.rank is not None):
        raise LaunchError(f"WORLD_SIZE={env['WORLD_SIZE']} is set but RANK is not: set both (or neither)")
    launcher = next((launcher for launcher in LAUNCHERS if launcher.marker in env), None)
    if launcher is None:
        return Launch()
    if launcher.check is not None:
        launcher.check(env)
    if launcher.rank is None:
        return Launch()
    rank, world_size = _integer(env, launcher.rank, launcher), _integer(env, launcher.world_size, launcher)
    if world_size < 1 or not 0 <= rank < world_size:
        raise LaunchError(f"{launcher.rank}={rank} is not a rank of {launcher.world_size}={world_size} "
                          f"(expected 0 <= rank < size; started by {launcher.name})")
    if world_size == 1 and not launcher.single_task_is_distributed:
        return Launch()
    local_names = tuple(dict.fromkeys(launcher.local_rank + ("LOCAL_RANK",)))  # the launcher's, else an exported one
    local_name = _first(env, local_names)
    if local_name is None and world_size == 1:
        return Launch(launcher.name, 0, 1, 0, env.get("MASTER_ADDR"), env.get("MASTER_PORT"))
    if local_name is None:
        raise LaunchError(f"started by {launcher.name} as rank {rank} of {world_size}, but none of "
                          f"{', '.join(local_names)} says its rank on this node")
    local_rank = _integer(env, local_name, launcher)
    local_size = _integer(env, launcher.local_size, launcher) if launcher.local_size and launcher.local_size in env else None
    if local_rank < 0 or (local_size is not None and local_rank >= local_size):
        bound = f" < {launcher.local_size}={local_size}" if local_size is not None else ""
        raise LaunchError(f"{local_name}={local_rank} is not a rank on this node (expected 0 <= it{bound}; "
                          f"started by {launcher.name})")
    launch = Launch(launcher.name, rank, world_size, local_rank)
    # Variables an outer tool already exported must say the same (e.g. WORLD_SIZE from mpirun -genv).
    for name, value in launch.variables().items():
        if name in env and name not in (launcher.rank, launcher.world_size, local_name) and env[name] != value:
            raise LaunchError(f"{name}={env[name]} disagrees with {launcher.name}, which makes it {value} "
                              f"({launcher.rank}={rank}, {launcher.world_size}={world_size}, {local_name}={local_rank})")
    master_addr = env.get("MASTER_ADDR")
    if master_addr is None:
        master_addr = launcher.master_addr(env, world_size, local_size)
    if master_addr is None and launcher.master_addr is not _given:
        raise LaunchError(
            f"started by {launcher.name} as rank {rank} of {world_size} on several nodes, but the host of rank 0 is "
            "unknown: export MASTER_ADDR (and MASTER_PORT) to every rank (e.g. mpirun -x MASTER_ADDR=<first host>, "
            "or put MASTER_ADDR=<first host> in .deepspeed_env for deepspeed --launcher openmpi)"
            + ("; under srun it is read from SLURM_STEP_NODELIST with 'scontrol show hostnames', which failed"
               if launcher.marker.startswith("SLURM") else ""))
    port = env.get("MASTER_PORT") or (None if launcher.master_addr is _given else str(DEFAULT_MASTER_PORT))
    return Launch(launcher.name, rank, world_size, local_rank, master_addr, port)
