"""Who started the process: every launcher's environment, simulated with the variables it sets (no
real MPI or Slurm), and the device each rank takes. A two-rank run started the way srun starts it is
in test_distributed.py."""
import os
import stat

import pytest
import torch

from cssfe.config import ConfigError, load_config, validate
from cssfe.engine import distributed, launchers
from cssfe.engine.launchers import Launch, LaunchError, detect

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What each launcher puts in the environment of rank 5 of 8, the second of four on its node.
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
MVAPICH = {"MV2_COMM_WORLD_RANK": "5", "MV2_COMM_WORLD_SIZE": "8", "MV2_COMM_WORLD_LOCAL_RANK": "1",
           "MV2_COMM_WORLD_LOCAL_SIZE": "4"}
MPICH = {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}
SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "0"}
SRUN = {**SLURM_JOB, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07",
            "MASTER_PORT": "29400"}


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """``scontrol show hostnames LIST`` of a two-node list, as Slurm prints it."""
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames gpu[07-08]' ] || exit 1\nprintf 'gpu07\\ngpu08\\n'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("env, name, master", [
    (OPEN_MPI, "Open MPI (mpirun)", None),
    (MVAPICH, "MVAPICH (mpirun_rsh)", None),
    (MPICH, "MPICH / Intel MPI (PMI)", None),
    (TORCHRUN, "a torch launcher (deepspeed, torchrun, Ray Train)", "gpu07"),
])
def test_each_launcher_gives_rank_size_and_local_rank(env, name, master):
    launch = detect({**env, "MASTER_ADDR": "gpu07"} if master is None else env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == (name, 5, 8, 1)
    assert launch.master_addr == "gpu07" and launch.distributed


def test_srun_tasks_find_rank_zeros_host_with_scontrol(fake_scontrol):
    launch = detect(SRUN)
    assert launch == Launch("Slurm (srun)", 5, 8, 1, "gpu07", str(launchers.DEFAULT_MASTER_PORT))
    assert launch.variables() == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                                  "MASTER_PORT": "29500"}
    assert detect({**SRUN, "MASTER_PORT": "31000"}).master_port == "31000"  # an exported port wins


def test_one_node_needs_no_master_address():
    one_node = {**OPEN_MPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "5"}
    assert detect(one_node).master_addr == "127.0.0.1"
    assert detect({**SRUN, "SLURM_STEP_NUM_NODES": "1", "SLURM_LOCALID": "5"}).master_addr == "127.0.0.1"


def test_several_nodes_without_a_master_address_are_refused(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no scontrol
    with pytest.raises(LaunchError, match=r"Open MPI.*rank 5 of 8 on several nodes.*export MASTER_ADDR"):
        detect(OPEN_MPI)
    with pytest.raises(LaunchError, match=r"Slurm \(srun\).*MASTER_ADDR.*SLURM_STEP_NODELIST.*scontrol"):
        detect(SRUN)


def test_the_innermost_launcher_describes_the_process(fake_scontrol):
    """torchrun inside srun (one task per node): torchrun's ranks, not Slurm's node-level task ids;
    mpirun inside a Slurm allocation: MPI's; a Ray worker on a node srun started: one process."""
    per_node = {**SRUN, "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    assert detect({**per_node, **TORCHRUN}).rank == 5
    assert detect({**per_node, **OPEN_MPI, "MASTER_ADDR": "gpu07"}).launcher == "Open MPI (mpirun)"
    assert detect({**per_node, "RAY_RAYLET_PID": "77"}) == Launch()


def test_no_launcher_and_single_tasks_are_one_process():
    assert detect({}) == Launch() and not Launch().distributed
    assert detect({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == Launch()  # sbatch, 1 task
    assert detect({**SRUN, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}) == Launch()
    assert detect({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"}) == Launch()
    # deepspeed --num_gpus 1 still trains through DeepSpeed
    assert detect({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}).distributed


def test_a_batch_script_that_forgot_srun_is_refused():
    """sbatch --ntasks 8 whose script runs plain python: one process would train on one GPU of eight."""
    with pytest.raises(LaunchError, match=r"Slurm allocation of 8 tasks \(SLURM_NTASKS=8.*srun did not start it.*srun python"):
        detect(SLURM_JOB)


@pytest.mark.parametrize("env, message", [
    ({**OPEN_MPI, "OMPI_COMM_WORLD_RANK": "8"}, r"OMPI_COMM_WORLD_RANK=8 is not a rank of OMPI_COMM_WORLD_SIZE=8"),
    ({**MPICH, "PMI_RANK": "-1"}, r"PMI_RANK=-1 is not a rank of PMI_SIZE=8"),
    ({**MPICH, "PMI_SIZE": "eight"}, r"PMI_SIZE='eight' is not a number"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_PROCID"}, r"Slurm \(srun\).*SLURM_PROCID is not set"),
    ({**OPEN_MPI, "OMPI_COMM_WORLD_LOCAL_RANK": "4"}, r"OMPI_COMM_WORLD_LOCAL_RANK=4 is not a rank on this node.*< OMPI_COMM_WORLD_LOCAL_SIZE=4"),
    ({k: v for k, v in MPICH.items() if k != "MPI_LOCALRANKID"}, r"none of MPI_LOCALRANKID, PALS_LOCAL_RANKID, LOCAL_RANK"),
    ({k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}, r"rank 5 of 8, but none of LOCAL_RANK says"),
    ({"WORLD_SIZE": "8"}, r"WORLD_SIZE=8 is set but RANK is not"),
    # two launchers disagreeing: mpirun -genv WORLD_SIZE 16 with PMI's 8 ranks, a stale LOCAL_RANK
    ({**MPICH, "WORLD_SIZE": "16", "MASTER_ADDR": "gpu07"}, r"WORLD_SIZE=16 disagrees with MPICH / Intel MPI \(PMI\), which makes it 8"),
    ({**OPEN_MPI, "LOCAL_RANK": "3", "MASTER_ADDR": "gpu07"}, r"LOCAL_RANK=3 disagrees with Open MPI"),
])
def test_inconsistent_launcher_variables_are_refused_naming_them(env, message):
    with pytest.raises(LaunchError, match=message):
        detect(env)


def test_an_srun_launch_sets_the_torch_variables_before_deepspeed_starts(monkeypatch, fake_scontrol):
    """What ``init`` hands to DeepSpeed: the torch variables, MPI discovery off, the configured timeout."""
    import deepspeed
    import torch.distributed as dist

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"):
        monkeypatch.setenv(name, "")  # recorded, so that what init() sets is undone after the test
        monkeypatch.delenv(name)
    for name, value in SRUN.items():
        monkeypatch.setenv(name, value)
    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs, env={k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")})
        raise RuntimeError("stop here")

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", fake_init)
    with pytest.raises(RuntimeError, match="stop here"):
        distributed.init("cpu", timeout_s=5400)
    assert seen["env"] == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    assert seen["auto_mpi_discovery"] is False and seen["timeout"].total_seconds() == 5400
    assert distributed.world_size() == 8


def test_timeout_key_is_validated():
    assert load_config(None, ["distributed.timeout_s=3600"]).distributed.timeout_s == 3600
    with pytest.raises(ConfigError, match=r"distributed.timeout_s' must be > 0, got 0"):
        validate(load_config(None, ["distributed.timeout_s=0"]))


# ------------------------------------------------------------------------------------ the device of a rank
@pytest.mark.parametrize("visible, local_rank, index", [
    (8, 3, 3),  # every GPU of the node visible (deepspeed, torchrun): the one LOCAL_RANK names
    (1, 3, 0),  # the scheduler gave this task one GPU (srun --gpus-per-task 1)
    (1, 0, 0),
    (4, 1, 1),  # a task given several GPUs of its own: the one LOCAL_RANK names
])
def test_each_rank_takes_a_gpu_it_can_see(monkeypatch, visible, local_rank, index):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert distributed.rank_device(local_rank) == torch.device("cuda", index)


def test_an_ambiguous_gpu_assignment_is_refused_naming_the_variables(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    with pytest.raises(LaunchError, match=r"LOCAL_RANK=3, but this rank sees 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES=6,7\)"):
        distributed.rank_device(3)


# ------------------------------------------------------------------------------------ the documented .deepspeed_env
def _documented_deepspeed_env():
    with open(os.path.join(ROOT, "docs", "distributed.md")) as f:
        blocks = f.read().split("```")
    (block,) = [b for b in blocks if b.lstrip("\n").startswith("NCCL_SOCKET_IFNAME=")]
    return block.lstrip("\n").splitlines(keepends=True)


def _deepspeed_exports(lines):
    """What DeepSpeed's multi-node launcher makes of the lines of a .deepspeed_env (its own code)."""
    from types import SimpleNamespace

    from deepspeed.launcher.multinode_runner import MultiNodeRunner

    runner = SimpleNamespace(exports={})
    for var in lines:  # deepspeed/launcher/runner.py: key, val = var.split('=', maxsplit=1)
        key, val = var.split("=", maxsplit=1)
        MultiNodeRunner.add_export(runner, key, val)
    return runner.exports


def test_documented_deepspeed_env_exports_each_value_as_written():
    pytest.importorskip("deepspeed")
    lines = _documented_deepspeed_env()
    exports = _deepspeed_exports(lines)
    assert exports == {line.split("=", 1)[0]: line.strip().split("=", 1)[1] for line in lines}
    assert exports["NCCL_SOCKET_IFNAME"] == "eth0"
    # what the docs warn of: an inline comment becomes part of the value, a blank line stops the launcher
    assert _deepspeed_exports(["NCCL_SOCKET_IFNAME=eth0   # the interface\n"])["NCCL_SOCKET_IFNAME"] == '"eth0   # the interface"'
    with pytest.raises(ValueError, match="not enough values to unpack"):
        _deepspeed_exports(["NCCL_DEBUG=WARN\n", "\n"])
