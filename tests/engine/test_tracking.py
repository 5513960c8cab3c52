"""Experiment tracking (TensorBoard, Weights & Biases), reports without a terminal, and ``key=value``
overrides anywhere among the options of every command-line tool."""
import importlib.machinery
import io
import json
import logging
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from cssfe.config import ConfigError, load_config
from cssfe.engine.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["data.image_size=32", "model.embedding=rie", "model.dim=16"]
STEP_SCALARS = {"train/loss", "train/first_pass_loss", "train/lr", "train/lambda", "train/grad_norm", "train/nonfinite_steps"}
EVAL_SCALARS = ({f"{block}/{g}" for block in ("mAP", "first_pass_mAP") for g in ("total", "head", "medium", "tail")}
                | {f"f1/{k}" for k in ("weighted", "micro", "macro")} | {"speed/train_images_per_second"})


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def cli_run(bundled_root, tmp_path_factory):
    """Two epochs through launch/train.py as a batch job runs it: progress=false, overrides split
    around an option, output captured."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "optim.epochs=2", TINY[0],
                           "--output-dir", str(out), *TINY[1:], "progress=false"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_overrides_around_an_option_and_progress_false_still_reports(cli_run):
    out, proc = cli_run
    cfg = load_config(str(out / "config.yaml"))
    assert (cfg.optim.epochs, cfg.data.image_size, cfg.model.dim, cfg.progress) == (2, 32, 16, False)
    # No progress bar, but every epoch's table and the final table with F1.
    assert "it/s" not in proc.stderr and "s/it" not in proc.stderr
    for line in ("epoch 1/2: loss", "epoch 2/2: loss", "EMA model (1st pass)", "best (epoch", "F1 (final): weighted",
                 f"outputs in {out}"):
        assert line in proc.stdout, (line, proc.stdout)
    assert proc.stdout.count("mAP (%)") == 3


def test_tensorboard_scalars_match_the_log(cli_run):
    out, _ = cli_run
    log = _log(out)
    events = _events(out)
    assert set(events.Tags()["scalars"]) == STEP_SCALARS | EVAL_SCALARS
    loss = events.Scalars("train/loss")
    steps = [e.step for e in loss]
    per_epoch = len(steps) // 2
    assert steps == list(range(1, 2 * per_epoch + 1)) and per_epoch > 1
    cfg = load_config(str(out / "config.yaml"))
    assert events.Scalars("train/lr")[0].value == pytest.approx(cfg.optim.lr / 25, rel=1e-5)  # OneCycle's first step
    for i, record in enumerate(log):
        epoch_losses = [e.value for e in loss[i * per_epoch:(i + 1) * per_epoch]]
        assert np.mean(epoch_losses) == pytest.approx(record["train_loss"], rel=1e-5)
        end = (i + 1) * per_epoch
        assert events.Scalars("train/lambda")[end - 1].value == pytest.approx(record["lambda"], rel=1e-6)
        assert events.Scalars("train/nonfinite_steps")[end - 1].value == record["skipped_steps"]
        for tag in EVAL_SCALARS:
            block, name = tag.split("/")
            want = record["images_per_second"] if block == "speed" else record[block][name]
            (event,) = [e for e in events.Scalars(tag) if e.step == end]
            assert event.value == pytest.approx(want, rel=1e-6), tag
    # The first-pass loss is part of the loss: loss = final + aux_weight * first pass, both > 0.
    first = events.Scalars("train/first_pass_loss")
    assert all(0 < f.value < l.value for f, l in zip(first, loss))
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))
    charts = events.Images("eval/per_class_ap")
    assert [c.step for c in charts] == [per_epoch, 2 * per_epoch]
    with Image.open(io.BytesIO(charts[-1].encoded_image_string)) as img:
        assert img.size[0] > 600 and np.asarray(img.convert("L")).std() > 10


class _FakeWandb(types.ModuleType):
    """Records what a run sends to Weights & Biases through its public API."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.init_kwargs, self.logged, self.finished = None, [], False
        fake = self

        class Run:
            def log(self, data, step=None):
                fake.logged.append((step, dict(data)))

            def finish(self):
                fake.finished = True

        self._run = Run

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self._run()

    class Image:
        def __init__(self, data):
            self.data = data


def test_wandb_gets_the_same_scalars_as_tensorboard(bundled_root, tmp_path, monkeypatch, one_thread):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    train(load_config(None, [f"output_dir={out}", "progress=false", "optim.epochs=1", *TINY, "logging.wandb=true",
                             "logging.wandb_project=tiny", "logging.step_every=2"]))
    assert fake.init_kwargs["project"] == "tiny" and fake.init_kwargs["dir"] == str(out)
    assert "mode" not in fake.init_kwargs  # wandb reads WANDB_MODE itself: offline stays offline
    assert fake.init_kwargs["config"]["logging"]["wandb"] is True and fake.finished
    sent = {}
    for step, data in fake.logged:
        for tag, value in data.items():
            sent.setdefault(tag, {})[step] = value
    events = _events(out)
    assert set(sent) == set(events.Tags()["scalars"]) | {"eval/per_class_ap"}
    for tag in events.Tags()["scalars"]:
        assert {e.step: pytest.approx(e.value, rel=1e-6) for e in events.Scalars(tag)} == sent[tag], tag
    assert all(step % 2 == 0 for step in sent["train/loss"])  # logging.step_every=2
    (chart,) = sent["eval/per_class_ap"].values()
    assert isinstance(chart, fake.Image) and chart.data.dtype == np.uint8 and chart.data.shape[2] == 3


def test_wandb_asked_for_but_missing_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as when it is not installed
    with pytest.raises(ValueError, match="'logging.wandb' is true but the wandb package is not installed"):
        train(load_config(None, [f"output_dir={tmp_path / 'run'}", "logging.wandb=true"]))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="logging.log_level"):
        load_config(None, ["logging.log_level=loud"])


@pytest.fixture
def console():
    """The command-line tools install a console handler on the package logger: removed afterwards."""
    package = logging.getLogger("cssfe")
    handlers, level = list(package.handlers), package.level
    yield
    package.handlers[:] = handlers
    package.setLevel(level)


def test_quiet_and_log_level_set_what_training_prints(monkeypatch, capsys, console):
    from cssfe.engine import cli
    from cssfe.engine import train as train_module

    def fake_train(cfg, resume=False):
        log = logging.getLogger("cssfe.engine.train")
        log.debug("debug detail")
        log.info("epoch table")
        log.warning("something odd")
        fake_train.progress = cfg.progress

    monkeypatch.setattr(train_module, "train", fake_train)
    assert cli.main(["--output-dir", "X", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "epoch table" not in out and "warning: something odd" in out and fake_train.progress is False
    assert cli.main(["logging.log_level=debug", "--output-dir", "X"]) == 0
    out = capsys.readouterr().out
    assert "debug detail" in out and "epoch table" in out and fake_train.progress is True
    assert cli.main(["--log-level", "error", "--output-dir", "X"]) == 0
    assert capsys.readouterr().out == ""


def test_overrides_anywhere_in_every_tool_that_takes_them(monkeypatch, console):
    from cssfe.commands import evaluate, predict
    from cssfe.data import prepare
    from cssfe.engine import cli, evaluation
    from cssfe.sweep import cli as sweep_cli

    args = cli.parse_args(["a=1", "--output-dir", "X", "b=2", "--resume", "c=3"])
    assert (args.overrides, args.output_dir, args.resume) == (["a=1", "b=2", "c=3"], "X", True)

    seen = {}

    def capture(name, result=None):
        def record(*a, **kw):
            seen[name] = (a, kw)
            if isinstance(result, Exception):
                raise result
            return result
        return record

    monkeypatch.setattr(evaluation, "evaluate_checkpoint", capture("evaluate", {}))
    assert evaluate.main(["a=1", "--output-dir", "X", "b=2", "--checkpoint", "C"]) == 0
    a, kw = seen["evaluate"]
    assert a[:3] == ("C", "X", ["a=1", "b=2"])

    monkeypatch.setattr(prepare, "load_config", capture("prepare", ConfigError("stop here")))
    assert prepare.main(["data.a=1", "--dataset", "lt-voc", "--root", "R", "data.b=2"]) == 2
    assert seen["prepare"][0][1] == ["data.name=lt_voc", "data.root=R", "data.a=1", "data.b=2"]

    monkeypatch.setattr(sweep_cli, "load_study", capture("sweep", ConfigError("stop here")))
    assert sweep_cli.main(["a=1", "--study", "mask", "b=2"]) == 2
    assert seen["sweep"][1]["overrides"] == ["a=1", "b=2"]

    # Tools with other positional arguments take them anywhere too.
    args = predict.parse_args(["one.png", "--checkpoint", "C", "two.png", "--threshold", "0.3", "three.png"])
    assert (args.inputs, args.threshold) == (["one.png", "two.png", "three.png"], 0.3)


def test_logged_loss_is_the_mean_since_the_last_logged_step(bundled_root, tmp_path, one_thread):
    """logging.step_every=N logs at every N-th optimizer step the mean loss of the N steps since the
    last log (summed on the device, read once), not the loss of that one step."""
    losses = {}
    for every in (1, 3):
        out = tmp_path / f"every{every}"
        train(load_config(None, [f"output_dir={out}", "progress=false", "optim.epochs=1", *TINY,
                                 f"logging.step_every={every}"]))
        losses[every] = {e.step: e.value for e in _events(out).Scalars("train/loss")}
    per_step = losses[1]
    assert sorted(losses[3]) == [s for s in sorted(per_step) if s % 3 == 0] and len(losses[3]) >= 5
    for step, value in losses[3].items():
        assert value == pytest.approx(np.mean([per_step[s] for s in (step - 2, step - 1, step)]), rel=1e-5), step
