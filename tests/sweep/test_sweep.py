"""Ray Tune sweeps end to end on the bundled data with tiny trials, on one shared 2-CPU Ray cluster:
the table / CSV / chart of a small grid, a skipped variant, a retried failure, and an interrupted
sweep that resumes without training its finished trials again, runs kept with a report reused
elsewhere."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from cssfe.config import ConfigError

ray = pytest.importorskip("ray")

from cssfe.sweep import SweepOptions, load_study, run_sweep  # noqa: E402
from cssfe.sweep.cli import main as sweep_main  # noqa: E402
from cssfe.sweep.runner import current_records  # noqa: E402
from cssfe.sweep.summary import summary_markdown  # noqa: E402
from cssfe.sweep.trainable import FAIL_ONCE_ENV, trial_dir  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One epoch at 32 px with learnable random label embeddings: a trial takes a few seconds.
TINY = {"optim.epochs": 1, "data.image_size": 32, "model.embedding": "rie", "model.dim": 16}


@pytest.fixture(scope="module")
def cluster(bundled_root):
    """One local Ray cluster for the module (starting one costs seconds); the dataset exists first."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _study_file(tmp_path, variants, seeds=(0, 1), config=None, **overrides):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"title": "Tiny", "config": config, "overrides": {**TINY, **overrides},
                                    "seeds": list(seeds), "variants": variants}, sort_keys=False))
    return str(path)


def _terminated_in_experiment_state(experiment_dir):
    """Whether Tune's experiment state file (what a restored sweep reads) holds a finished trial."""
    for path in experiment_dir.glob("experiment_state*.json"):
        try:
            trials = json.loads(path.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):  # being replaced right now: read it again next time
            continue
        if any(json.loads(trial[0]).get("status") == "TERMINATED" for trial in trials):
            return True
    return False


def _attempts(run_dir):
    with open(os.path.join(run_dir, "attempts.jsonl")) as f:
        return [json.loads(line)["action"] for line in f]


def test_tiny_grid_writes_table_csv_and_chart(cluster, tmp_path, monkeypatch):
    # Relative paths everywhere, as a user types them: the study file, its base config, the storage
    # and the output. Trials run in Tune's own working directories and must still find them.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"tau": 0.2}}))
    study = _study_file(tmp_path, {
        "mask": {},
        "no mask": {"model.mask": False},
        "GloVe": {"model.embedding": "glove", "model.embedding_options": {"path": str(tmp_path / "absent.txt")}},
    }, config="base.yaml")
    out = tmp_path / "report"
    rc = sweep_main(["--study", "custom", "--space", "tiny.yaml", "--storage", "sweeps", "--output", "report",
                     "--paired-against", "mask"])
    assert rc == 0
    paired = [r for r in csv.DictReader(open(out / "tiny_paired.csv")) if r["column"] == "tail"]
    assert [(r["variant"], r["n"]) for r in paired] == [("no mask", "2")]

    rows = {r["variant"]: r for r in csv.DictReader(open(out / "tiny.csv"))}
    assert list(rows) == ["mask", "no mask", "GloVe"]
    assert rows["mask"]["n"] == rows["no mask"]["n"] == "2"
    assert rows["GloVe"]["n"] == "0" and "skipped" in rows["GloVe"]["note"] and "absent.txt" in rows["GloVe"]["note"]
    # The table's mean is the mean of the trials' own metrics.json (final EMA model).
    trials = list(csv.DictReader(open(out / "trials.csv")))
    assert len(trials) == 4 and all(t["status"] == "finished" and t["epochs"] == "1" for t in trials)
    loaded = load_study(study)
    plan = {"trials_dir": str(tmp_path / "sweeps" / "trials")}
    finals = [json.load(open(os.path.join(trial_dir(plan, loaded, "mask", s), "metrics.json")))["final"]["mAP"]["tail"]
              for s in (0, 1)]
    assert float(rows["mask"]["tail_mean"]) == pytest.approx(sum(finals) / 2, abs=1e-3)
    assert finals[0] != finals[1]  # the seeds are really different runs
    # Each trial's TensorBoard event files lie under the storage folder (one --logdir shows the
    # study), in the run folder that trials.csv names.
    # trials.csv names them from the storage folder ("trials/s0-..."), wherever that is mounted.
    storage_root = tmp_path / "sweeps"
    assert {str(storage_root / t["run_dir"]) for t in trials} == {trial_dir(plan, loaded, v, s) for v in ("mask", "no mask")
                                                                  for s in (0, 1)}
    for t in trials:
        assert t["run_dir"].startswith("trials" + os.sep)
        assert any(name.startswith("events.out.tfevents.") for name in os.listdir(storage_root / t["run_dir"] / "tensorboard"))
        # the final report carries the λ of the last epoch (metrics.json holds the evaluation alone)
        last = [json.loads(line) for line in open(storage_root / t["run_dir"] / "log.jsonl")][-1]
        assert float(t["lambda"]) == pytest.approx(last["lambda"])
    saved = yaml.safe_load(open(os.path.join(trial_dir(plan, loaded, "mask", 0), "config.yaml")))
    assert saved["model"]["tau"] == 0.2  # the base config reached the trial
    # Tune's trial folders are named by variant and seed.
    assert sum(name.startswith(("mask_s0_", "no_mask_s1_")) for name in os.listdir(tmp_path / "sweeps" / "tiny")) == 2

    table = (out / "tiny.md").read_text()
    assert "| mask | " in table and "| no mask | " in table and "skipped **GloVe**" in table
    assert (out / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Also written beside the experiment.
    assert (tmp_path / "sweeps" / "tiny" / "report" / "tiny.md").read_text() == table

    # Another sweep with the same trial configs reuses the runs; each sweep accounts for its own starts.
    options = SweepOptions(storage_path=str(tmp_path / "sweeps"), name="again", verbose=0)
    again = run_sweep(load_study(study, variants=["mask"]), options)["records"]
    assert [(r["reused"], r["attempts"]) for r in again] == [(True, 0), (True, 0)]

    # The table comes from what the trials reported to Ray, not from their folders, which a driver
    # on another node may not see.
    shutil.rmtree(tmp_path / "sweeps" / "trials")
    outcome = current_records(SweepOptions(storage_path="sweeps"), loaded)
    assert summary_markdown(outcome["study"], outcome["records"]) == table
    assert {(r["reused"], r["attempts"]) for r in outcome["records"] if r["variant"] == "mask"} == {(False, 1)}


def test_a_trial_that_raises_is_retried_from_its_tune_checkpoint(cluster, tmp_path, monkeypatch):
    """On a URI storage (file:// here; s3:// or gs:// on a cluster) trials train in node-local
    folders and keep their state in Tune's checkpoints only."""
    fail_dir = tmp_path / "fail"
    fail_dir.mkdir()
    # Only this trial fails, once, after its first epoch, and its run folder is emptied first: as if
    # the retry ran on another node. It must continue from Ray's copy of its epoch checkpoint.
    (fail_dir / "mask_s0.fail").write_text("lose-run-folder")
    monkeypatch.setenv(FAIL_ONCE_ENV, str(fail_dir))
    study = load_study(_study_file(tmp_path, {"mask": {}}, **{"optim.epochs": 2}))
    storage = f"file://{tmp_path}/sweeps"
    outcome = run_sweep(study, SweepOptions(storage_path=storage, max_failures=1, verbose=0))

    records = {r["seed"]: r for r in outcome["records"]}
    assert (fail_dir / "mask_s0.failed").exists()
    assert all(r["status"] == "finished" and r["epochs"] == 2 for r in records.values())
    assert _attempts(records[0]["run_dir"]) == ["start", "resume"]  # continued after epoch 1, not from scratch
    assert _attempts(records[1]["run_dir"]) == ["start"]
    assert not os.path.isdir(tmp_path / "sweeps" / "trials") and (tmp_path / "sweeps" / "tiny" / "sweep_plan.json").is_file()
    log = [json.loads(line)["epoch"] for line in open(os.path.join(records[0]["run_dir"], "log.jsonl"))]
    assert log == [1, 2]
    # Result.checkpoint is the complete run.
    for result in outcome["results"]:
        with result.checkpoint.as_directory() as folder:
            assert os.path.isfile(os.path.join(folder, "metrics.json"))
            assert os.path.isfile(os.path.join(folder, "checkpoints", "last.pt"))

    # A restore of this sweep with other seeds would silently run the old ones: refused.
    with pytest.raises(ConfigError, match=r"seeds \[0, 1, 2\] \(the sweep has \[0, 1\]\)"):
        run_sweep(load_study(_study_file(tmp_path, {"mask": {}}, seeds=(0, 1, 2), **{"optim.epochs": 2})),
                  SweepOptions(storage_path=storage, verbose=0))
    for record in records.values():  # the node-local folders
        shutil.rmtree(record["run_dir"])
    shutil.rmtree(os.path.dirname(records[0]["run_dir"]), ignore_errors=True)


def test_asha_with_eval_every_and_fresh_start_over(cluster, tmp_path):
    """ASHA ranks by total mAP, which epochs without evaluation do not have; --fresh trains again."""
    study = load_study(_study_file(tmp_path, {"mask": {}}, seeds=(0,), **{"optim.epochs": 2, "eval_every": 2}))
    options = SweepOptions(storage_path=str(tmp_path / "sweeps"), asha=True, asha_grace_epochs=1, verbose=0)
    (record,) = run_sweep(study, options)["records"]
    assert record["status"] == "finished" and record["epochs"] == 2

    options.restore = False  # --fresh
    (again,) = run_sweep(study, options)["records"]
    assert again["status"] == "finished" and again["attempts"] == 1 and not again["reused"]
    assert _attempts(again["run_dir"]) == ["start"]  # a new run, not a reuse of the finished one


def test_requests_the_cluster_cannot_honour_are_refused(cluster, tmp_path, monkeypatch):
    study = load_study(_study_file(tmp_path, {"mask": {}}, seeds=(0,)))
    options = SweepOptions(storage_path=str(tmp_path / "sweeps"), verbose=0)
    # A cluster with GPUs (faked): a sweep that asks for none would put every trial on cuda:0.
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 4.0, "memory": 1e10})
    with pytest.raises(ConfigError, match=r"the cluster has 4 GPUs but --gpus-per-trial is 0.*device=cpu"):
        run_sweep(study, options)
    monkeypatch.undo()
    options.trial_resources = {"non_preemptible": 0.01}
    with pytest.raises(ConfigError, match=r"no node offers the custom resource 'non_preemptible'"):
        run_sweep(study, options)
    assert not os.path.exists(tmp_path / "sweeps" / "tiny" / "sweep_plan.json")


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(cluster, tmp_path):
    study_path = _study_file(tmp_path, {"mask": {}}, seeds=(0, 1, 2))
    storage = tmp_path / "sweeps"
    study = load_study(study_path)
    plan = {"trials_dir": str(storage / "trials")}
    dirs = [trial_dir(plan, study, "mask", s) for s in (0, 1, 2)]
    # A driver of its own, on the same cluster (--address), one trial at a time, killed after the first.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "launch", "sweep.py"), "--study", study_path, "--storage", str(storage),
         "--address", cluster, "--max-concurrent", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not any(os.path.isfile(os.path.join(d, "metrics.json")) for d in dirs):
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(0.2)
        # kill only once Tune's saved experiment state records a trial as finished
        while not _terminated_in_experiment_state(storage / "tiny"):
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            assert time.time() < deadline, "the experiment state never recorded a finished trial"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    done_before = [d for d in dirs if os.path.isfile(os.path.join(d, "metrics.json"))]
    assert 1 <= len(done_before) < 3
    stamps = {d: os.path.getmtime(os.path.join(d, "metrics.json")) for d in done_before}

    outcome = run_sweep(study, SweepOptions(storage_path=str(storage), verbose=0))
    assert sorted(r["seed"] for r in outcome["records"]) == [0, 1, 2]
    assert all(r["attempts"] == 1 and not r["reused"] for r in outcome["records"])
    assert all(r["status"] == "finished" for r in outcome["records"])
    for d in done_before:  # neither trained nor evaluated again
        assert _attempts(d) == ["start"]
        assert os.path.getmtime(os.path.join(d, "metrics.json")) == stamps[d]


def test_a_distributed_trial_runs_deepspeed_in_ray_train_workers_and_is_retried(cluster, tmp_path, monkeypatch):
    """workers_per_trial=2: one trial is two Ray Train workers running DeepSpeed on CPU (gloo). It
    fails once after its first epoch (rank 0 raises), is retried by Tune, and resumes from the
    DeepSpeed checkpoint of that epoch."""
    fail_dir = tmp_path / "fail"
    fail_dir.mkdir()
    (fail_dir / "mask_s0.fail").touch()
    monkeypatch.setenv(FAIL_ONCE_ENV, str(fail_dir))
    study = load_study(_study_file(tmp_path, {"mask": {}}, seeds=(0,), **{"optim.epochs": 2}))
    outcome = run_sweep(study, SweepOptions(storage_path=str(tmp_path / "sweeps"), workers_per_trial=2,
                                            cpus_per_trial=2, max_failures=1, verbose=0))

    (record,) = outcome["records"]
    assert record["status"] == "finished" and record["epochs"] == 2
    assert (fail_dir / "mask_s0.failed").exists()
    run_dir = record["run_dir"]
    assert run_dir.endswith("-w2")  # not the folder of a one-process trial of the same config
    assert _attempts(run_dir) == ["start", "resume"]
    assert [json.loads(line)["epoch"] for line in open(os.path.join(run_dir, "log.jsonl"))] == [1, 2]
    for rank in (0, 1):  # both processes trained, as ranks of one world of two
        lines = [json.loads(line) for line in open(os.path.join(run_dir, "ranks", f"rank{rank}.log"))]
        assert {(r["rank"], r["world_size"]) for r in lines} == {(rank, 2)}
        assert lines[-1]["epoch"] == 2
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "deepspeed"))
    final = json.load(open(os.path.join(run_dir, "metrics.json")))["final"]["mAP"]
    assert record["total"] == pytest.approx(final["total"])


def test_distributed_batch_arithmetic_is_checked_before_any_trial(tmp_path):
    study = load_study(_study_file(tmp_path, {"mask": {}, "odd batch": {"data.batch_size": 33}}))
    with pytest.raises(ValueError, match=r"variant 'odd batch' with 2 workers.*data\.batch_size.*33"):
        run_sweep(study, SweepOptions(storage_path=str(tmp_path / "sweeps"), workers_per_trial=2, verbose=0))
    assert not (tmp_path / "sweeps").exists()
    with pytest.raises(ValueError, match=r"--gpus-per-trial 1 with 2 worker\(s\) per trial: each process"):
        run_sweep(load_study(_study_file(tmp_path, {"mask": {}})),
                  SweepOptions(storage_path=str(tmp_path / "sweeps"), workers_per_trial=2, gpus_per_trial=1, verbose=0))
    assert not (tmp_path / "sweeps").exists()


def test_the_enhancement_study_runs_as_documented_and_reports_pairs(cluster, tmp_path):
    """``python launch/sweep.py --study enhancement_coco`` (docs/method.md), narrowed to two variants and
    two seeds of tiny trials: the report pairs the form with enhancement off, seed by seed."""
    out = tmp_path / "report"
    rc = sweep_main(["--study", "enhancement_coco", "--variants", "enhancement off,presence", "--seeds", "0,1",
                     "--storage", str(tmp_path / "sweeps"), "--output", str(out), "--with-run-files",
                     *[f"{k}={v}" for k, v in TINY.items()], "data.image_size=16"])
    assert rc == 0
    rows = {r["column"]: r for r in csv.DictReader(open(out / "enhancement_coco_paired.csv")) if r["variant"] == "presence"}
    assert set(rows) == {"total", "head", "medium", "tail", "lambda"} and rows["tail"]["n"] == "2"
    assert "Per-seed paired differences to **enhancement off**" in open(out / "enhancement_coco.md").read()
    assert (out / "enhancement_coco_paired.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --with-run-files: each trial's files beside the tables, its config naming the run folder as trials.csv does
    trials = list(csv.DictReader(open(out / "trials.csv")))
    assert sorted(os.listdir(out / "runs")) == ["enhancement_off_s0", "enhancement_off_s1", "presence_s0", "presence_s1"]
    for t in trials:
        copied = out / "runs" / f"{t['variant'].replace(' ', '_')}_s{t['seed']}"
        run = tmp_path / "sweeps" / t["run_dir"]
        assert (copied / "metrics.json").read_bytes() == (run / "metrics.json").read_bytes()
        assert (copied / "log.jsonl").read_bytes() == (run / "log.jsonl").read_bytes()
        saved, original = (yaml.safe_load(open(d / "config.yaml")) for d in (copied, run))
        assert saved["output_dir"] == t["run_dir"] and original["output_dir"] == str(run)
        assert saved["cache_dir"] is None and original["cache_dir"]  # the sweep's default cache folder: the default
        unset = {"output_dir": None, "cache_dir": None}
        assert {**saved, **unset} == {**original, **unset}  # nothing else changed
    assert not (tmp_path / "sweeps" / "enhancement_coco" / "report" / "runs").exists()  # the trials are beside it


def test_run_files_go_to_an_output_folder_only(capsys):
    assert sweep_main(["--study", "enhancement", "--with-run-files"]) == 2
    assert "give --output DIR" in capsys.readouterr().err


def test_runs_kept_with_a_report_finish_the_study_on_another_storage(cluster, tmp_path, capsys):
    """``--reuse-runs OUTPUT/runs``: the files ``--with-run-files`` keeps stand for their trials in a
    sweep elsewhere (another storage, as on another machine), not retrained; a run whose config no
    longer matches its trial is not taken, and that trial trains."""
    study = _study_file(tmp_path, {"mask": {}, "no mask": {"model.mask": False}})
    first = tmp_path / "first"
    assert sweep_main(["--study", study, "--storage", str(tmp_path / "a"), "--output", str(first), "--with-run-files"]) == 0
    changed = first / "runs" / "no_mask_s1" / "config.yaml"
    cfg = yaml.safe_load(changed.read_text())
    cfg["optim"]["lr"] *= 2
    changed.write_text(yaml.safe_dump(cfg, sort_keys=False))
    capsys.readouterr()

    second = tmp_path / "second"
    assert sweep_main(["--study", study, "--storage", str(tmp_path / "b"), "--output", str(second),
                       "--reuse-runs", str(first / "runs")]) == 0
    assert "--reuse-runs: 3 finished run(s) taken" in capsys.readouterr().out
    before = {(r["variant"], r["seed"]): r for r in csv.DictReader(open(first / "trials.csv"))}
    after = {(r["variant"], r["seed"]): r for r in csv.DictReader(open(second / "trials.csv"))}
    for key in (("mask", "0"), ("mask", "1"), ("no mask", "0")):
        assert (after[key]["reused"], after[key]["attempts"]) == ("True", "0")
        assert [after[key][c] for c in ("total", "tail", "f1_weighted")] == [before[key][c] for c in ("total", "tail", "f1_weighted")]
        assert after[key]["run_dir"] == before[key]["run_dir"]  # the same reuse key, under the other storage
        assert _attempts(tmp_path / "b" / after[key]["run_dir"]) == ["reuse"]
    assert (after[("no mask", "1")]["reused"], after[("no mask", "1")]["attempts"]) == ("False", "1")


def test_parts_of_a_study_under_their_own_names_make_the_whole_without_training(cluster, tmp_path):
    """docs/sweeps.md, "Splitting a study": parts picked by ``--seeds`` / ``--variants`` and kept apart by
    ``--name`` share the storage's run folders, so the whole study afterwards trains nothing."""
    study = _study_file(tmp_path, {"mask": {}, "no mask": {"model.mask": False}})
    storage = str(tmp_path / "sweeps")
    parts = {"part_a": ["--seeds", "0"], "part_b": ["--seeds", "1", "--variants", "no mask"]}
    for name, narrowing in parts.items():
        assert sweep_main(["--study", study, "--storage", storage, "--name", name, *narrowing]) == 0
    whole = tmp_path / "whole"
    assert sweep_main(["--study", study, "--storage", storage, "--name", "whole", "--output", str(whole)]) == 0
    trials = {(r["variant"], r["seed"]): r for r in csv.DictReader(open(whole / "trials.csv"))}
    assert sorted(trials) == [("mask", "0"), ("mask", "1"), ("no mask", "0"), ("no mask", "1")]
    assert all(r["status"] == "finished" for r in trials.values())
    trained_by_parts = [("mask", "0"), ("no mask", "0"), ("no mask", "1")]
    for key in trained_by_parts:
        assert (trials[key]["reused"], trials[key]["attempts"]) == ("True", "0"), key
        assert _attempts(os.path.join(storage, trials[key]["run_dir"])) == ["start", "reuse"]
    # the one trial no part ran trains in the whole
    assert (trials[("mask", "1")]["reused"], trials[("mask", "1")]["attempts"]) == ("False", "1")


def test_reuse_runs_refuses_what_it_cannot_take_before_any_work(tmp_path, capsys):
    study = _study_file(tmp_path, {"mask": {}})
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad" / "mask_s0"
    bad.mkdir(parents=True)
    (bad / "config.yaml").write_text("optim: {epochs: 1, warmup: 3}\n")
    (bad / "metrics.json").write_text("{}")
    for folder, message in ((tmp_path / "missing", "no such folder"), (empty, "no finished run in it"),
                            (tmp_path / "bad", r"mask_s0/config.yaml: unknown config key 'optim.warmup'")):
        rc = sweep_main(["--study", study, "--storage", str(tmp_path / "sweeps"), "--reuse-runs", str(folder)])
        assert rc == 2
        err = capsys.readouterr().err
        assert str(folder) in err and re.search(message, err), err
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("seeds", [(0, 1), (0, 1, 2, 3)], ids=["every-trial-created", "trials-not-created-yet"])
def test_ctrl_c_prints_the_table_of_the_saved_state_and_exits_1(cluster, tmp_path, seeds):
    """Ctrl-C (SIGINT to the driver's process group) while a trial trains: the driver prints the
    table of what finished, lists the interrupted trial as unfinished (not as stopped by a
    scheduler) and those Tune had not created yet as not started (their results carry no config),
    and exits 1, without a traceback."""
    study_path = _study_file(tmp_path, {"mask": {}}, seeds=seeds, **{"optim.epochs": 2})
    storage = tmp_path / "sweeps"
    study = load_study(study_path)
    first, second = (trial_dir({"trials_dir": str(storage / "trials")}, study, "mask", s) for s in (0, 1))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "launch", "sweep.py"), "--study", study_path, "--storage", str(storage),
         "--address", cluster, "--max-concurrent", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        # interrupt once the saved state knows seed 0 as finished and seed 1 has started training
        while not (os.path.isfile(os.path.join(first, "metrics.json")) and _terminated_in_experiment_state(storage / "tiny")
                   and os.path.isfile(os.path.join(second, "attempts.jsonl"))):
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGINT)
        out, err = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 1, err[-2000:]
    # the driver's own output; the stopped trial's worker may log its SIGTERM traceback through it
    driver_err = "\n".join(line for line in err.splitlines() if "(run_trial pid=" not in line)
    assert "Traceback" not in driver_err, driver_err[-2000:]
    assert "### Tiny" in out, out[-2000:]
    table = out[out.index("### Tiny"):]
    status = {int(t["seed"]): t["status"] for t in csv.DictReader(open(storage / "tiny" / "report" / "trials.csv"))}
    assert set(status) == set(seeds) and status[0] == "finished" and status[1] == "unfinished", status
    assert all(status[s] in ("unfinished", "not started") for s in seeds[2:]), status
    if len(seeds) == 4:
        assert status[3] == "not started", status  # Tune creates trials one ahead at most
    assert "| mask | " in table and "- unfinished **mask** seed 1 at epoch" in table and "ASHA" not in table, table
    waiting = ", ".join(str(s) for s in sorted(status) if status[s] == "not started")
    if waiting:
        assert f"- not started **mask**: seed {waiting}\n" in table, table  # trials Tune had not created yet
