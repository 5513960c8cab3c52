"""DeepSpeed checkpoints: completion markers, ZeRO stage 0 at any world size, accumulation windows,
the EMA written once, storage every rank must share, ``--resume auto``.

Two CPU ranks through the launcher where ranks matter (the machinery of test_distributed.py),
DeepSpeed in this process as a world of one where they do not.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from test_distributed import DEEPSPEED, ROOT, TRAIN, ZERO2, _deepspeed, _env, _log, _port, _remove_shared_memory_buffers, _tiny, tiny_root  # noqa: F401

from cssfe.config import ConfigError, load_config, validate
from cssfe.engine import ds_checkpoint
from cssfe.engine import steps as steps_module
from cssfe.engine import train as train_module
from cssfe.engine.signals import TrainingInterrupted
from cssfe.engine.train import train

STAGE0 = [f"distributed.deepspeed_config={ZERO2}", "distributed.zero_stage=0"]


def _ds_dir(out):
    return out / "checkpoints" / "deepspeed"


def _one_process(out, args, *options):
    """``launch/train.py`` without a launcher: DeepSpeed as a world of one (deepspeed_config is set)."""
    proc = subprocess.run([sys.executable, TRAIN, "--output-dir", str(out), *options, *args], capture_output=True,
                          text=True, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _interrupt_before_marker(out):
    """As if the run were killed after DeepSpeed's shards and ``latest`` of its last tag, before the
    completion marker; returns the tag that resume must fall back to."""
    ds_dir = _ds_dir(out)
    newest = ds_checkpoint.newest_complete_tag(str(ds_dir))
    os.remove(ds_dir / newest / ds_checkpoint.COMPLETE)
    (ds_dir / "latest").write_text(newest)
    os.remove(out / "metrics.json")
    return ds_checkpoint.newest_complete_tag(str(ds_dir))


def _weights(out):
    """DeepSpeed's model file of the newest complete tag (the weights, its step counters)."""
    tag = ds_checkpoint.newest_complete_tag(str(_ds_dir(out)))
    return torch.load(_ds_dir(out) / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def _assert_same_weights(got, expected):
    """Rounding differs between one process and two ranks (1e-7 here): weights, not mAP, which a
    flipped near-tie in the ranking moves. The key bias has no gradient but rounding noise, which
    Adam turns into full steps (see test_distributed.py)."""
    for name, value in expected.items():
        if name != "head.key.bias":
            assert torch.allclose(got[name], value, rtol=1e-4, atol=1e-5), (name, (got[name] - value).abs().max())


def test_stage0_tags_resume_at_any_world_size_from_the_newest_complete_tag(tiny_root, tmp_path):
    """ZeRO stage 0 (one mp_rank_00 file): a two-rank tag resumed by one process, then a tag that
    process wrote resumed by two ranks, each after an interruption between DeepSpeed's files and
    the completion marker: each ends with the uninterrupted run's weights (fp32, group norm).
    Rank 0 alone stores the EMA weights. ``--resume auto`` starts a run that has no checkpoint and
    continues one that has; a bare ``--resume`` continues one."""
    args = [*_tiny(tiny_root), *STAGE0, "checkpoint_every_steps=3"]
    out = tmp_path / "run"
    _deepspeed(out, ["--resume", "auto", *args])  # nothing to resume: a fresh run
    ds_dir = _ds_dir(out)
    tags = ["epoch0001-step000003", "epoch0002-step000000"]
    assert ds_checkpoint.complete_tags(str(ds_dir)) == tags and (ds_dir / "latest").read_text() == tags[-1]
    assert json.loads((ds_dir / tags[-1] / ds_checkpoint.COMPLETE).read_text())["world_size"] == 2
    rank0, rank1 = (torch.load(ds_dir / tags[-1] / f"cssfe_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert "ema" in rank0 and "ema" not in rank1 and rank1["run"]["step"] == rank0["run"]["step"]
    expected = _weights(out)["module"]

    assert _interrupt_before_marker(out) == "epoch0001-step000003"
    conv = subprocess.run([sys.executable, "-m", "cssfe.engine.reshard", str(out)], capture_output=True, text=True,
                          env=_env(), cwd=ROOT)
    assert conv.returncode == 0 and "epoch0001-step000003;" in conv.stdout, conv.stderr[-3000:]
    assert not [t for t in os.listdir(ds_dir) if t.endswith(ds_checkpoint.UNIVERSAL_SUFFIX)]  # kept as it is
    _one_process(out, [*args, "checkpoint_every_steps=2"], "--resume", "auto")  # a tag after micro-batch 4 of epoch 2
    assert [r["epoch"] for r in _log(out)] == [1, 2, 2]  # the resumed run continued inside epoch 2
    _assert_same_weights(_weights(out)["module"], expected)

    assert _interrupt_before_marker(out) == "epoch0001-step000004"
    _deepspeed(out, [*args, "checkpoint_every_steps=2"], resume=True)  # bare --resume, then key=value overrides
    assert [r["epoch"] for r in _log(out)] == [1, 2, 2, 2]
    _assert_same_weights(_weights(out)["module"], expected)


def test_ranks_that_see_different_output_folders_are_refused(tiny_root, tmp_path):
    """Two "nodes" whose --output-dir resolves to different folders (each its own working
    directory), as node-local disks would: every rank stops before any work, naming the rank."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = _port()
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        cmd = [*DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
               "127.0.0.1", "--master_port", str(port), TRAIN, "--output-dir", "run", *_tiny(tiny_root), *STAGE0]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                                      start_new_session=True, cwd=cwd))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    assert all("is not shared by every rank: rank 1 on" in o for o in outputs), "\n".join(o[-3000:] for o in outputs)
    assert not (tmp_path / "node0" / "run" / "log.jsonl").exists()


# ------------------------------------------------------------------------------------ one process
@pytest.fixture
def world_of_one(monkeypatch, one_thread):
    """DeepSpeed in this process as a world of one: the variables a launcher sets, undone after (the
    process group stays: DeepSpeed keeps its groups for the process's lifetime)."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_port()), "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)


def _accum2(root, out, *extra):
    # global batch 16 in two micro-batches of 8: 6 optimizer steps, 12 micro-batches an epoch
    return load_config(None, [*_tiny(root), f"distributed.deepspeed_config={ZERO2}", "distributed.grad_accum=2",
                              f"output_dir={out}", *extra])


def _stop_at_micro_batch(monkeypatch, n):
    """A stop signal seen from the n-th micro-batch on (1-based, counted over the run)."""
    real, calls = steps_module._ds_step, []

    def step(engine, loss, loss_scale, run, signum, *rest):
        calls.append(1)
        return real(engine, loss, loss_scale, run, signal.SIGTERM if len(calls) >= n else signum, *rest)

    monkeypatch.setattr(steps_module, "_ds_step", step)


def test_a_stop_inside_an_accumulation_window_checkpoints_at_its_end(tiny_root, tmp_path, monkeypatch, world_of_one):
    """grad_accum 2: a stop signal after micro-batch 3 of epoch 2 checkpoints after micro-batch 4
    (the window's end), and the resumed run ends with the uninterrupted run's weights."""
    whole = tmp_path / "whole"
    train(_accum2(tiny_root, whole))
    cut = tmp_path / "cut"
    with monkeypatch.context() as patch:
        _stop_at_micro_batch(patch, 12 + 3)
        with pytest.raises(TrainingInterrupted):
            train(_accum2(tiny_root, cut))
    assert ds_checkpoint.newest_complete_tag(str(_ds_dir(cut))) == "epoch0001-step000004"
    train(_accum2(tiny_root, cut), resume=True)
    expected, got = _weights(whole), _weights(cut)
    assert got["global_steps"] == expected["global_steps"] == 12
    for name, value in expected["module"].items():
        assert torch.allclose(got["module"][name], value, rtol=1e-5, atol=1e-7), name
    assert [r["train_loss"] for r in _log(cut)] == pytest.approx([r["train_loss"] for r in _log(whole)], rel=1e-6)


def _poison_micro_batches(monkeypatch, factor, micro_batches):
    """Multiply the loss of the given (0-based) micro-batches by ``factor``."""
    real = train_module.build_loss

    def build(*args, **kwargs):
        loss, calls = real(*args, **kwargs), {"n": -1}

        def poisoned(logits, targets):
            calls["n"] += 1
            value = loss(logits, targets)
            return value * factor if calls["n"] // 2 in micro_batches else value  # two calls a micro-batch (aux loss)

        return poisoned

    monkeypatch.setattr(train_module, "build_loss", build)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_skipped_micro_batch_does_not_shift_the_accumulation_windows(stage, tiny_root, tmp_path, monkeypatch,
                                                                        world_of_one):
    """Non-finite losses on micro-batch 1 (opening a window) and 6 (closing one): both are skipped,
    every window still ends on an even micro-batch, so the epoch makes its 6 optimizer steps, and
    the weights are those of a run in which the two micro-batches had a loss of zero."""
    runs = {}
    for name, factor in (("skipped", float("nan")), ("zero", 0.0)):
        with monkeypatch.context() as patch:
            _poison_micro_batches(patch, factor, (0, 5))
            out = tmp_path / name
            result = train(_accum2(tiny_root, out, "optim.epochs=1", f"distributed.zero_stage={stage}"))
        folder = _ds_dir(out) / ds_checkpoint.newest_complete_tag(str(_ds_dir(out)))
        (model_file,) = folder.glob("*mp_rank_00_model_states.pt")  # ZeRO-3: zero_pp_rank_0_mp_rank_00_...
        assert torch.load(model_file, map_location="cpu", weights_only=False)["global_steps"] == 6
        runs[name] = torch.load(folder / "cssfe_rank0.pt", weights_only=True)["ema"]  # decay 0: the trained weights
        assert result["skipped_steps"] == (2 if name == "skipped" else 0)
    for name, value in runs["zero"].items():
        assert torch.allclose(runs["skipped"][name], value, rtol=1e-6, atol=1e-8), name


# ------------------------------------------------------------------------------------ refused before any work
def test_checkpoint_interval_inside_an_accumulation_window_is_refused():
    with pytest.raises(ConfigError, match=r"checkpoint_every_steps' \(3.*multiple of distributed.grad_accum \(2\)"):
        validate(load_config(None, ["checkpoint_every_steps=3", "distributed.grad_accum=2"]))
    validate(load_config(None, ["checkpoint_every_steps=4", "distributed.grad_accum=2"]))


def test_node_local_checkpoint_storage_is_refused_before_any_work(tmp_path):
    local = tmp_path / "local.yaml"
    local.write_text("checkpoint:\n  use_node_local_storage: true\n")
    cfg = load_config(None, [f"distributed.deepspeed_config={local}", "data.name=split_folder",
                             f"data.root={tmp_path / 'missing'}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"local.yaml: checkpoint.use_node_local_storage is not supported"):
        train(cfg)  # the data root does not exist: reaching it would raise something else
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ --resume auto
def test_resume_auto_starts_a_run_without_a_checkpoint_and_continues_one_with_it(tiny_root, tmp_path, one_thread):
    """One process: ``resume="auto"`` (``--resume auto``) starts a run that has no checkpoint and
    continues one that has (a finished run: nothing is trained again); ``--resume`` without a
    value still needs a checkpoint, and the override after it stays an override."""
    from cssfe.engine.cli import parse_args

    small = [*_tiny(tiny_root), "optim.epochs=1"]
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(load_config(None, [*small, f"output_dir={out}"]), resume=True)
    first = train(load_config(None, [*small, f"output_dir={out}"]), resume="auto")
    again = train(load_config(None, [*small, f"output_dir={out}"]), resume="auto")
    assert again["final"]["mAP"] == first["final"]["mAP"] and len(_log(out)) == 1
    assert parse_args(["--resume", "auto", "seed=1"]).resume == "auto"
    assert parse_args(["--resume", "seed=1"]).resume is True and parse_args(["seed=1"]).resume is False
    assert parse_args(["--resume", "seed=1"]).overrides == ["seed=1"]
