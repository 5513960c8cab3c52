"""DeepSpeed training on CPU ranks (gloo): equivalence with one process, sharded evaluation, every
ZeRO stage x precision through the launcher (SIGKILL mid-epoch, resume, DeepSpeed's converter,
evaluate.py), a two-node run simulated on one machine, bad DeepSpeed configs.

Every run uses one thread per rank (CPU training with more threads is not bitwise reproducible).
"""
import glob
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cssfe.config import ConfigError, load_config, validate
from cssfe.data.split_files import read_classes, read_split, write_split_folder
from cssfe.engine import distributed
from cssfe.engine.sampler import EpochShuffle
from cssfe.engine.train import train

pytest.importorskip("deepspeed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "launch", "train.py")
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
ZERO2 = os.path.join(ROOT, "configs", "deepspeed", "zero2.yaml")
EVALUATE = os.path.join(ROOT, "launch", "evaluate.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(autouse=True)
def _remove_shared_memory_buffers():
    """DeepSpeed's CPU all-reduce leaves a /dev/shm buffer per rank behind."""
    before = set(glob.glob("/dev/shm/deepspeed_*"))
    yield
    for path in set(glob.glob("/dev/shm/deepspeed_*")) - before:
        try:
            os.remove(path)
        except OSError:
            pass


@pytest.fixture(scope="module")
def tiny_root(bundled_root, tmp_path_factory):
    """96 training and 45 test images of the bundled data (45: not divisible by 2 ranks)."""
    out = tmp_path_factory.mktemp("tiny_split")
    names = read_classes(bundled_root)
    ids, labels = {}, {}
    for split, n in (("train", 96), ("test", 45)):
        split_ids, split_labels = read_split(bundled_root, split, len(names))
        ids[split] = split_ids[:n]
        labels[split] = [list(map(int, np.flatnonzero(row))) for row in split_labels[:n]]
    write_split_folder(str(out), names, ids, labels, head_min=10, tail_max=3)
    os.symlink(os.path.join(bundled_root, "images"), out / "images")
    return str(out)


def _tiny(root):
    # group norm, no augmentation and the plain-PyTorch ops: the numbers cannot depend on how a batch
    # is split over ranks (the C++ attention sums shared queries' gradients per run of images, so
    # its rounding follows the split, and a different rounding path, even one that is the same per
    # element, sends a 2-epoch Adam run elsewhere by more than the weight tolerance below)
    # EMA decay 0: the EMA (what the metrics score) is the trained model, which DeepSpeed's
    # checkpoint holds, so a converted checkpoint must score the run's own metrics
    return ["data.name=split_folder", f"data.root={root}", "model.backbone=smallcnn_gn", "model.embedding=rie",
            "model.dim=16", "data.augment=none", "data.batch_size=16", "optim.epochs=2", "progress=false",
            "kernels=reference", "optim.ema_decay=0"]


def _deepspeed(out, args, ranks=2, resume=False, extra_launcher=(), wait=True, port=None):
    cmd = [*DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port or _port()), *extra_launcher, TRAIN,
           "--output-dir", str(out), *(["--resume"] if resume else []), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True, cwd=ROOT)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    return output


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _ds_weights(out):
    with open(os.path.join(out, "checkpoints", "deepspeed", "latest")) as f:
        tag = f.read().strip()
    state = torch.load(os.path.join(out, "checkpoints", "deepspeed", tag, "mp_rank_00_model_states.pt"),
                       map_location="cpu", weights_only=False)
    return state["module"]


@pytest.fixture(scope="module")
def one_process(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each rank: the comparison must not depend on thread count
    try:
        train(load_config(None, [*_tiny(tiny_root), f"output_dir={out}"]))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def two_ranks(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks") / "run"
    port = _port()
    _deepspeed(out, [*_tiny(tiny_root), f"distributed.deepspeed_config={ZERO2}"], port=port)
    (out.parent / "master_port").write_text(str(port))
    return out


def test_ranks_unlink_their_cpu_allreduce_buffers(two_ranks):
    """DeepSpeed's CPU all-reduce puts one shared-memory buffer per rank in /dev/shm and leaves it;
    each rank removes its own when training ends."""
    port = (two_ranks.parent / "master_port").read_text()
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in f]


def test_two_ranks_with_micro_batch_b_match_one_process_with_2b(one_process, two_ranks):
    """Global batch 16: two ranks of micro-batch 8 against one process of 16. The 45 test images
    are scored in two shards (22 + 23) and gathered: the metrics are the single-process ones."""
    single, double = _metrics(one_process), _metrics(two_ranks)
    for which in ("final", "best"):
        for group, value in single[which]["mAP"].items():
            assert double[which]["mAP"][group] == pytest.approx(value, abs=1e-6), (which, group)
    for a, b in zip(_log(one_process), _log(two_ranks)):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    plain = torch.load(os.path.join(one_process, "checkpoints", "last.pt"), map_location="cpu", weights_only=False)["model"]
    ds = _ds_weights(two_ranks)
    assert plain.keys() == ds.keys()
    # The key projection's bias shifts every score of a class by the same q.b, which the softmax
    # over positions cancels: its true gradient is 0, and Adam turns the rounding noise left in it
    # into full-size steps of either sign. The same happens inside a unit whose gradient is (almost)
    # zero, such as a backbone channel that ReLU has switched off: seen once as 14 weights of two
    # conv channels and one BN bias 2-4x off while everything else agreed to 0.4x the tolerance. So
    # per tensor, 99 % of the elements must agree and the rest within 20x the tolerance; a
    # distributed mistake (a rank's gradient lost, not averaged, stale weights) moves far more.
    gradient_free = {"head.key.bias"}
    for name, value in plain.items():
        if name in gradient_free or not value.is_floating_point():
            if not value.is_floating_point():
                assert torch.equal(ds[name], value), name
            continue
        diff, tol = (ds[name] - value).abs(), 1e-5 + 1e-4 * value.abs()
        off = diff > tol
        assert off.float().mean().item() <= 0.01, (name, int(off.sum()), value.numel())
        assert (diff <= 20 * tol).all(), (name, (diff / tol).max().item())
    ranks = sorted(os.listdir(os.path.join(two_ranks, "ranks")))
    assert ranks == ["rank0.log", "rank1.log"]


def test_ranks_draw_augmentations_of_their_own(two_ranks):
    """Augmentations draw from each rank's global generators; the ranks seed them alike to build
    one model and then apart (seed, rank), so their states, saved per rank for resume, differ."""
    ds_dir = os.path.join(two_ranks, "checkpoints", "deepspeed")
    with open(os.path.join(ds_dir, "latest")) as f:
        tag = f.read().strip()
    states = [torch.load(os.path.join(ds_dir, tag, f"cssfe_rank{r}.pt"), map_location="cpu", weights_only=False)["rng"]
              for r in (0, 1)]
    assert not torch.equal(states[0]["torch"], states[1]["torch"])
    assert not torch.equal(states[0]["numpy"]["keys"], states[1]["numpy"]["keys"])


def test_test_shards_cover_each_image_once():
    for size in (1, 2, 45, 1000):
        for world in (1, 2, 3, 8):
            shards = [distributed.shard_range(size, r, world) for r in range(world)]
            assert [i for s in shards for i in s] == list(range(size))


def test_a_run_leaves_the_process_group_it_joined_and_no_other(tmp_path):
    """A group joined during the run is destroyed when it ends (left to interpreter exit, gloo's
    threads can abort a finished rank); a group that existed before (Ray Train's) stays."""
    import torch.distributed as dist

    def join(name):
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / name), 1), rank=0, world_size=1)

    with distributed.leaving_process_group():
        join("store-a")
        assert dist.is_initialized()
    assert not dist.is_initialized()
    join("store-b")
    try:
        with distributed.leaving_process_group():
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_the_command_line_leaves_the_process_group_before_exit(tiny_root, tmp_path):
    """launch/train.py's process has left the group its run joined when main() returns (gloo's
    threads left to interpreter exit can abort a finished rank: a good run, a failed launch)."""
    code = ("import sys, torch.distributed as dist; from cssfe.engine.cli import main; rc = main(sys.argv[1:]); "
            "print('group left:', not dist.is_initialized()); sys.exit(rc)")
    args = [*_tiny(tiny_root), "optim.epochs=1", f"distributed.deepspeed_config={ZERO2}", "distributed.zero_stage=0"]
    proc = subprocess.run([sys.executable, "-c", code, "--output-dir", str(tmp_path / "run"), *args], capture_output=True,
                          text=True, env=_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0 and "group left: True" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]


def test_rank_shards_of_the_sampler_make_up_the_global_batches():
    whole = EpochShuffle(100, seed=3)
    whole.set_epoch(2, start=16)
    ranks = [EpochShuffle(100, seed=3, rank=r, world_size=2, micro_batch=8) for r in range(2)]
    for s in ranks:
        s.set_epoch(2, start=16)
    order = list(whole)
    rank_orders = [list(s) for s in ranks]
    assert all(len(r) == len(s) for r, s in zip(rank_orders, ranks))
    for step in range(len(rank_orders[0]) // 8):
        batch = order[16 * step:16 * (step + 1)]
        assert rank_orders[0][8 * step:8 * (step + 1)] + rank_orders[1][8 * step:8 * (step + 1)] == batch


def test_two_node_run_on_one_machine_matches_two_local_ranks(tiny_root, two_ranks, tmp_path):
    """Two launcher invocations, one CPU rank each, joined through a two-host hostfile."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out, port = tmp_path / "run", _port()
    args = [*_tiny(tiny_root), f"distributed.deepspeed_config={ZERO2}"]
    procs = []
    for node in (0, 1):
        cmd = [*DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1",
               "--master_port", str(port), TRAIN, "--output-dir", str(out), *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                                      start_new_session=True, cwd=ROOT))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    assert _metrics(out)["final"]["mAP"] == _metrics(two_ranks)["final"]["mAP"]


def test_two_tasks_started_like_srun_train_as_two_ranks(tiny_root, two_ranks, tmp_path):
    """``srun -n 2 python launch/train.py`` sets Slurm's variables, not RANK / WORLD_SIZE: the two
    processes must join one run of two ranks (the numbers of the deepspeed-launched run), not each
    train alone into the same folder."""
    out = tmp_path / "run"
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update({"MASTER_PORT": str(_port()), "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
                "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NODELIST": "node1"})
    cmd = [sys.executable, TRAIN, "--output-dir", str(out), *_tiny(tiny_root), f"distributed.deepspeed_config={ZERO2}"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                              start_new_session=True, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
             for r in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    assert sorted(os.listdir(out / "ranks")) == ["rank0.log", "rank1.log"]
    assert _metrics(out)["final"]["mAP"] == _metrics(two_ranks)["final"]["mAP"]


# ------------------------------------------------------------------------------------ resume after SIGKILL
def _killable(out, extra=()):
    # the whole bundled training set (35 steps an epoch), so there is time to kill it mid-epoch
    return ["data.image_size=32", "model.embedding=rie", "model.dim=16", "optim.epochs=2", "progress=false",
            f"distributed.deepspeed_config={ZERO2}", *extra]


def test_sigterm_to_every_process_checkpoints_all_ranks_at_one_step(tmp_path):
    """The whole process group gets SIGTERM (each rank then also gets the launcher's forwarded
    copy): the ranks agree on a step, save one checkpoint there and exit cleanly. The signal is
    sent once the periodic checkpoint of step 10 of the second epoch has started, so the ranks
    are inside that epoch and the stop's tag is a later step of it."""
    out = tmp_path / "run"
    proc = _deepspeed(out, _killable(out, ["checkpoint_every_steps=10"]), wait=False)
    periodic = out / "checkpoints" / "deepspeed" / "epoch0001-step000010"
    start = time.time()
    while not periodic.is_dir():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()[0][-3000:]}")
        assert time.time() - start < 600
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert output.count("stopped by SIGTERM") == 2, output[-3000:]
    tag = (out / "checkpoints" / "deepspeed" / "latest").read_text().strip()
    # the step-10 checkpoint's all-reduce ran before the signal, so the stop comes at a later step
    assert tag.startswith("epoch0001-step") and int(tag.rsplit("step", 1)[1]) > 10, tag
    client = [torch.load(out / "checkpoints" / "deepspeed" / tag / f"cssfe_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert client[0]["run"]["step"] == client[1]["run"]["step"] == int(tag.rsplit("step", 1)[1])
    assert not (out / "metrics.json").exists()


# ------------------------------------------------------------------------------------ bad configs
def test_impossible_batch_arithmetic_fails_before_any_work(tmp_path):
    cfg = load_config(None, ["data.batch_size=10", "distributed.grad_accum=4", f"distributed.deepspeed_config={ZERO2}",
                             "data.name=split_folder", f"data.root={tmp_path / 'missing'}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"data.batch_size.*\(10.*grad_accum \(4\)"):
        train(cfg)  # the data root does not exist: reaching it would raise something else
    assert not (tmp_path / "run").exists()


def test_unknown_zero_stage_fails_before_any_work(tmp_path):
    bad = tmp_path / "zero9.yaml"
    bad.write_text("zero_optimization:\n  stage: 9\n")
    cfg = load_config(None, [f"distributed.deepspeed_config={bad}", "data.name=split_folder",
                             f"data.root={tmp_path / 'missing'}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"zero9.yaml.*stage must be 0, 1, 2 or 3, got 9"):
        train(cfg)
    with pytest.raises(ConfigError, match="distributed.zero_stage"):
        validate(load_config(None, ["distributed.zero_stage=4"]))


def test_deepspeed_file_that_contradicts_the_config_is_refused(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 1}}))
    cfg = load_config(None, [f"distributed.deepspeed_config={bad}", "data.batch_size=32"])
    with pytest.raises(ConfigError, match=r"ds.json: train_batch_size is 64, but the cssfe config gives 32"):
        distributed.deepspeed_config(cfg, world_size=2)
    bf16 = tmp_path / "bf16.yaml"
    bf16.write_text("bf16:\n  enabled: true\n")
    cfg = load_config(None, [f"distributed.deepspeed_config={bf16}"])
    with pytest.raises(ConfigError, match="bf16 is enabled, but distributed.precision is 'fp32'"):
        distributed.deepspeed_config(cfg, world_size=1)
    good = distributed.deepspeed_config(load_config(None, ["data.batch_size=32", "distributed.grad_accum=2",
                                                           "distributed.precision=bf16", "distributed.zero_stage=3"]), 4)
    assert (good["train_micro_batch_size_per_gpu"], good["gradient_accumulation_steps"], good["train_batch_size"]) == (4, 2, 32)
    assert good["bf16"] == {"enabled": True} and good["zero_optimization"]["stage"] == 3


# ------------------------------------------------------------------------------------ another world size
def test_resume_at_another_world_size_after_conversion(tiny_root, tmp_path):
    """A two-rank run's mid-epoch checkpoint, resumed by one process: refused as it is, accepted
    after ``python -m cssfe.engine.reshard``, and it ends where the two-rank run ended."""
    args = [*_tiny(tiny_root), f"distributed.deepspeed_config={ZERO2}", "checkpoint_every_steps=3"]
    whole = tmp_path / "two"
    _deepspeed(whole, args)
    ds_dir = whole / "checkpoints" / "deepspeed"
    assert sorted(t for t in os.listdir(ds_dir) if t.startswith("epoch")) == ["epoch0001-step000003", "epoch0002-step000000"]
    expected = _metrics(whole)["final"]
    os.remove(ds_dir / "epoch0002-step000000" / "cssfe_complete.json")  # as if killed before the last tag was complete
    os.remove(whole / "metrics.json")
    resume = [sys.executable, TRAIN, "--resume", "--output-dir", str(whole), *args]
    proc = subprocess.run(resume, capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert proc.returncode == 2 and "written by 2" in proc.stderr and "cssfe.engine.reshard" in proc.stderr, proc.stderr[-3000:]
    conv = subprocess.run([sys.executable, "-m", "cssfe.engine.reshard", str(whole)], capture_output=True, text=True,
                          env=_env(), cwd=ROOT)
    assert conv.returncode == 0, conv.stderr[-3000:]
    assert (ds_dir / "latest").read_text() == "epoch0001-step000003_universal"
    lines_before = len(_log(whole))
    proc = subprocess.run(resume, capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["epoch"] for r in _log(whole)[lines_before:]] == [2]  # continued inside epoch 2, not restarted
    for group, value in expected["mAP"].items():
        assert _metrics(whole)["final"]["mAP"][group] == pytest.approx(value, abs=1e-6)


def test_rank_zero_alone_writes_tensorboard_events(two_ranks):
    """One event file (rank 0's) whose per-step losses average to log.jsonl's epoch losses."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = os.path.join(two_ranks, "tensorboard")
    assert len(glob.glob(os.path.join(board, "events.out.tfevents.*"))) == 1
    events = EventAccumulator(board, size_guidance={"scalars": 0})
    events.Reload()
    log = _log(two_ranks)
    loss = [e.value for e in events.Scalars("train/loss")]
    steps = len(loss) // len(log)  # 96 images, global batch 16
    assert steps == 6 and [e.step for e in events.Scalars("train/loss")] == list(range(1, len(loss) + 1))
    for i, record in enumerate(log):
        assert np.mean(loss[i * steps:(i + 1) * steps]) == pytest.approx(record["train_loss"], rel=1e-5)
        (total,) = [e.value for e in events.Scalars("mAP/total") if e.step == (i + 1) * steps]
        assert total == pytest.approx(record["mAP"]["total"], rel=1e-6)
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))


# ------------------------------------------------------------------------------------ every stage x precision
STAGES = (0, 1, 2, 3)
# what trains on CPU ranks: fp16 only where oneDNN has fp16 kernels (else it is refused, tested below)
CPU_PRECISIONS = ("fp32", "bf16") + (("fp16",) if torch.ops.mkldnn._is_mkldnn_fp16_supported() else ())


def _stage(stage):
    """Stage 0: plain data parallel, no file; 1-3: the published configs (zero3.yaml gathers on save)."""
    if stage == 0:
        return ["distributed.zero_stage=0"]
    return [f"distributed.deepspeed_config={os.path.join(ROOT, 'configs', 'deepspeed', f'zero{stage}.yaml')}"]


def _case(root, precision):
    # fp32 with group norm: every stage must end where one process does (test above); the low
    # precisions with batch norm, whose fp32 statistics once met bf16 weights and failed
    low = [f"distributed.precision={precision}", "model.backbone=smallcnn"] if precision != "fp32" else []
    return [*_tiny(root), *low]


@pytest.fixture(scope="module")
def low_precision_reference(tiny_root, tmp_path_factory):
    """Uninterrupted runs that the killed and resumed low-precision cases must end with, one per
    stage and precision: each stage takes another path through DeepSpeed and ends slightly
    elsewhere on this tiny run. Stage 0 trains bf16 weights through DeepSpeed's bf16 optimizer with
    gradients accumulated and reduced in bf16; under bf16 stage 1 accumulates gradients in bf16 and
    stages 2 and 3 in fp32; stage 3 gathers the parameters into bf16 for each forward, and its EMA
    averages the fp32 master weights where the others average their bf16 copy."""
    runs = {}

    def run(precision, stage):
        key = (precision, stage)
        if key not in runs:
            out = tmp_path_factory.mktemp(f"reference_{precision}_stage{key[1]}") / "run"
            _deepspeed(out, [*_case(tiny_root, precision), *_stage(key[1])])
            runs[key] = out
        return runs[key]

    return run


def _test_images(trained, n):
    from cssfe.data import build_data

    data = build_data(trained.cfg.data, os.environ["CSSFE_CACHE"], progress=False)
    return [data.test[i][0] for i in range(n)]


def _kill_in_second_epoch(proc, out):
    """SIGKILL the launcher and its ranks once a mid-epoch checkpoint of epoch 2 is complete
    (``latest`` is written last); returns the tag the run is left with."""
    latest = out / "checkpoints" / "deepspeed" / "latest"
    start = time.time()
    while not (latest.exists() and latest.read_text().strip().startswith("epoch0001-step")
               and latest.read_text().strip() != "epoch0001-step000000"):
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()[0][-3000:]}")
        assert time.time() - start < 600, "no mid-epoch checkpoint in the second epoch"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    return latest.read_text().strip()


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
@pytest.mark.parametrize("stage", STAGES)
def test_every_zero_stage_and_precision_trains_resumes_and_converts(stage, precision, tiny_root, two_ranks,
                                                                    low_precision_reference, tmp_path, one_thread):
    """Two CPU ranks through ``deepspeed``: 2 epochs with evaluation and a checkpoint every step,
    SIGKILLed in the second epoch and resumed; the run ends with the uninterrupted reference's
    metrics, and its last checkpoint, converted by DeepSpeed's ``zero_to_fp32`` and scored by
    ``launch/evaluate.py``, gives the run's own final mAP."""
    out = tmp_path / "run"
    args = [*_case(tiny_root, precision), *_stage(stage), "checkpoint_every_steps=1"]
    tag = _kill_in_second_epoch(_deepspeed(out, args, wait=False), out)
    assert tag.startswith("epoch0001-step") and tag != "epoch0001-step000000", tag
    assert not (out / "metrics.json").exists(), "killed after the run had finished"
    _deepspeed(out, args, resume=True)
    assert [r["epoch"] for r in _log(out)] == [1, 2]  # epoch 1 from the killed launch, 2 from the resumed one
    assert all(0 < r["lambda"] < 10 for r in _log(out))  # read from the (under ZeRO-3 gathered) parameter
    reference = two_ranks if precision == "fp32" else low_precision_reference(precision, stage)
    final = _metrics(out)["final"]
    for group, value in _metrics(reference)["final"]["mAP"].items():
        assert final["mAP"][group] == pytest.approx(value, abs=1e-6), (group, final["mAP"], _metrics(reference)["final"]["mAP"])

    from cssfe.engine.consolidate import consolidate
    from cssfe.engine.inference import load_trained
    from cssfe.explain.maps import class_maps

    ds_dir = out / "checkpoints" / "deepspeed"
    tag = (ds_dir / "latest").read_text().strip()
    assert tag == "epoch0002-step000000"
    if stage == 3:  # stage3_gather_16bit_weights_on_model_save: DeepSpeed's gathered model beside the shards
        gathered = torch.load(ds_dir / tag / "consolidated_model.pt", map_location="cpu", weights_only=False)
        ema = torch.load(ds_dir / tag / "cssfe_rank0.pt", map_location="cpu", weights_only=False)["ema"]
        for name, value in gathered.items():  # the stage-3 EMA follows the fp32 master: rounded, the bf16 weights
            assert torch.equal(value, ema[name].to(value.dtype)), name
    # zero_to_fp32, except stage-0 fp32 (nothing sharded); rounded as the EMA saw the weights: stage 3
    # averages the fp32 master weights, the other stages the bf16 copy every rank holds
    checkpoint = consolidate(str(out), precision="fp32" if stage == 3 else precision)
    eval_dir = tmp_path / "eval"
    argv = sys.argv
    sys.argv = [EVALUATE, "--checkpoint", checkpoint, "--output-dir", str(eval_dir)]
    try:
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(EVALUATE, run_name="__main__")
    finally:
        sys.argv = argv
    assert exited.value.code == 0
    with open(eval_dir / "metrics.json") as f:
        evaluated = json.load(f)["mAP"]
    for group, value in final["mAP"].items():
        assert evaluated[group] == pytest.approx(value, abs=1e-6), (group, evaluated, final["mAP"])
    # the converted weights are exactly the trained model's (= the EMA at decay 0), and explain
    trained = load_trained(checkpoint)
    ema = torch.load(ds_dir / tag / "cssfe_rank0.pt", map_location="cpu", weights_only=False)["ema"]
    for name, value in trained.model.state_dict().items():
        assert torch.equal(value, ema[name].to(value.dtype)), name
    images = torch.stack(_test_images(trained, 2))
    maps = class_maps(trained.model, images)
    assert maps["refined_mask"].shape == (2, len(trained.class_names), *images.shape[-2:])
    assert all(torch.isfinite(m).all() for m in maps.values())
    if stage == 3 and precision == "fp32":
        # partitioned weights convert too: the mid-epoch tag, resharded and resumed by one process, ends
        # where the two ranks did (fp32 with group norm only: one process of batch 16 computes what
        # two ranks of 8 do; batch norm's statistics and bf16 rounding follow the split)
        mid = sorted(t for t in os.listdir(ds_dir) if t.startswith("epoch0001-step"))[-1]
        assert mid != "epoch0001-step000000", mid
        os.remove(ds_dir / tag / "cssfe_complete.json")  # as if killed before the last tag was complete
        os.remove(out / "metrics.json")
        conv = subprocess.run([sys.executable, "-m", "cssfe.engine.reshard", str(out)], capture_output=True, text=True,
                              env=_env(), cwd=ROOT)
        assert conv.returncode == 0, conv.stderr[-3000:]
        proc = subprocess.run([sys.executable, TRAIN, "--resume", "--output-dir", str(out), *args], capture_output=True,
                              text=True, env=_env(), cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _metrics(out)["final"]["mAP"] == pytest.approx(final["mAP"], abs=1e-6)


def test_zero3_ema_follows_the_fp32_master_weights(tiny_root, tmp_path):
    """ZeRO-3 bf16 on two ranks, EMA decay 0.5, a checkpoint after every step. Between the last two
    checkpoints lies one optimizer step, in which the EMA must move half-way to the fp32 master
    weights (DeepSpeed's zero_to_fp32 of the last tag), not to their bf16 rounding that the forward
    computes with; each rank averages only its own partition, gathered for the checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = tmp_path / "run"
    _deepspeed(out, [*_case(tiny_root, "bf16"), *_stage(3), "optim.ema_decay=0.5", "optim.epochs=1",
                     "checkpoint_every_steps=1"])
    ds_dir = out / "checkpoints" / "deepspeed"
    before, last = sorted(t for t in os.listdir(ds_dir) if t.startswith("epoch"))
    assert (before, last) == ("epoch0000-step000005", "epoch0001-step000000")
    ema = {t: torch.load(ds_dir / t / "cssfe_rank0.pt", map_location="cpu", weights_only=False)["ema"] for t in (before, last)}
    master = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=last)
    assert set(master) == set(ema[last])
    bf16_would_differ = 0
    for name, value in master.items():
        if not value.is_floating_point():
            continue
        want = ema[before][name].lerp(value.float(), 0.5)
        assert torch.equal(ema[last][name], want), (name, (ema[last][name] - want).abs().max())
        bf16_would_differ += not torch.equal(want, ema[before][name].lerp(value.bfloat16().float(), 0.5))
    assert bf16_would_differ >= 10  # most weights: an EMA of the bf16 weights would fail above


@pytest.mark.skipif(torch.ops.mkldnn._is_mkldnn_fp16_supported(), reason="this CPU has fp16 kernels: fp16 trains")
def test_fp16_on_cpu_ranks_is_refused_before_any_work(tmp_path):
    cfg = load_config(None, [f"distributed.deepspeed_config={ZERO2}", "distributed.precision=fp16", "device=cpu",
                             "data.name=split_folder", f"data.root={tmp_path / 'missing'}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"distributed.precision.*fp16 is not supported on this cpu.*use distributed.precision=bf16"):
        train(cfg)  # the data root does not exist: reaching it would raise something else
    assert not (tmp_path / "run").exists()


def test_deepspeed_file_may_not_contradict_clipping_optimizer_or_precision(tmp_path):
    """What the shipped files' header says: keys cssfe fills in are refused when they disagree,
    naming the file and the key, instead of being overwritten or dropped."""
    def refused(text, match, *overrides):
        path = tmp_path / "ds.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            distributed.deepspeed_config(load_config(None, [f"distributed.deepspeed_config={path}", *overrides]), 1)

    refused("gradient_clipping: 1.0\n", r"ds.yaml: gradient_clipping is 1.0, but optim.grad_clip is 10.0")
    refused("optimizer:\n  type: Adam\n", r"ds.yaml: optimizer is set, but cssfe takes it from optim")
    refused("scheduler:\n  type: WarmupLR\n", r"ds.yaml: scheduler is set")
    refused("amp:\n  enabled: true\n", r"ds.yaml: amp is set, but cssfe takes it from distributed.precision")
    refused("bf16:\n  enabled: false\n", r"ds.yaml: bf16.enabled is false, but distributed.precision is bf16",
            "distributed.precision=bf16")
    same = tmp_path / "same.yaml"
    same.write_text("gradient_clipping: 10.0\nfp16:\n  enabled: true\n  loss_scale_window: 500\n")
    ds = distributed.deepspeed_config(load_config(None, [f"distributed.deepspeed_config={same}",
                                                         "distributed.precision=fp16"]), 1)
    assert ds["gradient_clipping"] == 10.0  # the same value: accepted
    assert ds["fp16"] == {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 500}  # kept, not dropped


def test_bf16_sums_gradients_in_fp32_at_zero_stages_1_to_3(tmp_path):
    """DeepSpeed would accumulate and reduce bf16 gradients in bf16; cssfe asks for fp32 reduction
    at stages 1-3 and fp32 accumulation at stages 2-3 (stage 0's bf16 optimizer accumulates in bf16
    only; at stage 1 it would switch to the BF16_Optimizer, whose checkpoints zero_to_fp32 cannot
    read), unless the file says otherwise."""
    for stage in (1, 2, 3):
        path = os.path.join(ROOT, "configs", "deepspeed", f"zero{stage}.yaml")
        ds = distributed.deepspeed_config(load_config(None, [f"distributed.deepspeed_config={path}",
                                                             "distributed.precision=bf16"]), 2)
        assert ds["communication_data_type"] == "fp32", stage
        assert ds["data_types"].get("grad_accum_dtype") == ("fp32" if stage > 1 else None), stage
    own = tmp_path / "own.yaml"
    own.write_text("communication_data_type: bf16\nzero_optimization:\n  stage: 2\n")
    mine = distributed.deepspeed_config(load_config(None, [f"distributed.deepspeed_config={own}", "distributed.precision=bf16"]), 2)
    assert mine["communication_data_type"] == "bf16"  # the file's choice
    stage0 = distributed.deepspeed_config(load_config(None, ["distributed.zero_stage=0", "distributed.precision=bf16"]), 2)
    assert "communication_data_type" not in stage0 and "grad_accum_dtype" not in stage0["data_types"]
    fp32 = distributed.deepspeed_config(load_config(None, ["distributed.zero_stage=2"]), 2)
    assert "communication_data_type" not in fp32 and "data_types" not in fp32


def test_shipped_zero_files_size_their_buckets_for_the_default_model():
    """DeepSpeed's default buckets (5e8 elements) and stage-3 limits (1e9) exceed the whole
    ResNet50 (23.5 M parameters): one bucket that overlaps nothing, 2-4 GB of memory, and at stage 3
    every weight kept gathered. The shipped files keep each well under the model's size."""
    import torchvision

    params = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    keys = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
            "stage3_max_live_parameters", "stage3_max_reuse_distance")
    for stage in (1, 2, 3):
        path = os.path.join(ROOT, "configs", "deepspeed", f"zero{stage}.yaml")
        zero = distributed.deepspeed_config(load_config(None, [f"distributed.deepspeed_config={path}"]), 2)["zero_optimization"]
        sized = [k for k in keys if k in zero]
        assert "reduce_bucket_size" in sized and "allgather_bucket_size" in sized, (stage, zero)
        if stage == 3:
            assert len(sized) == len(keys), zero
        for key in sized:
            assert isinstance(zero[key], int) and 0 < zero[key] <= params // 2, (stage, key, zero[key])


def test_sync_batchnorm_on_cpu_ranks_is_refused_before_any_work(tmp_path):
    """torch's SyncBatchNorm runs on GPUs only (on CPU it fails at the first forward)."""
    cfg = load_config(None, [f"distributed.deepspeed_config={ZERO2}", "distributed.sync_batchnorm=true", "device=cpu",
                             "data.name=split_folder", f"data.root={tmp_path / 'missing'}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"distributed.sync_batchnorm.*GPU ranks only, not on cpu"):
        train(cfg)  # the data root does not exist: reaching it would raise something else
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SyncBatchNorm runs on GPUs")
def test_sync_batchnorm_on_one_gpu_rank_trains_as_batch_norm(tiny_root, tmp_path):
    """One rank: SyncBatchNorm normalises over the same batch as batch norm, so the run ends with
    the same metrics (with more ranks it normalises over the global batch)."""
    final = []
    for sync in ("false", "true"):
        cfg = load_config(None, [*_tiny(tiny_root), "model.backbone=smallcnn", "device=cuda", f"distributed.deepspeed_config={ZERO2}",
                                 f"distributed.sync_batchnorm={sync}", f"output_dir={tmp_path / sync}"])
        final.append(train(cfg)["final"]["mAP"])
    assert final[0] == pytest.approx(final[1], abs=1e-6)


def test_low_precision_keeps_buffers_in_the_training_dtype(tmp_path):
    """Batch norm's running statistics follow the weights into bf16 (DeepSpeed keeps buffers fp32
    unless told); a DeepSpeed file that says otherwise is refused."""
    cfg = load_config(None, ["distributed.precision=bf16", "distributed.zero_stage=2"])
    assert distributed.deepspeed_config(cfg, 1)["data_types"]["buffer_dtype"] == "bf16"
    assert "data_types" not in distributed.deepspeed_config(load_config(None, ["distributed.zero_stage=2"]), 1)
    bad = tmp_path / "ds.yaml"
    bad.write_text("data_types:\n  buffer_dtype: fp32\n")
    with pytest.raises(ConfigError, match=r"ds.yaml: data_types.buffer_dtype is 'fp32'"):
        distributed.deepspeed_config(load_config(None, [f"distributed.deepspeed_config={bad}", "distributed.precision=bf16"]), 1)
