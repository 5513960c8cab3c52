"""Studies as data (no Ray needed): the shipped studies load, grids expand, mistakes are named, and
the summary lists what did not finish."""
import csv
import os

import pytest
import yaml

import cssfe
from cssfe.config import ConfigError
from cssfe.sweep.studies import available_studies, config_hash, load_study, trial_key
from cssfe.sweep.summary import summary_markdown, write_summary

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_shipped_studies_load_with_the_supplement_variants():
    assert {"losses", "backbones", "embeddings", "mask"} <= set(available_studies())
    assert list(load_study("losses").variants) == ["ASL", "DB-Focal", "CB-Focal", "PG", "BCE"]
    assert list(load_study("backbones").variants) == ["VGG16", "ResNet50", "ViT-B/16"]
    assert list(load_study("embeddings").variants) == ["RIE", "Word2Vec", "GloVe", "BERT", "CLIP", "MiniLM"]
    assert len(load_study("mask").variants) == 4
    assert all(load_study(n).seeds == [0, 1, 2] for n in ("losses", "embeddings", "mask"))
    # The default row of each study is the default run: trained once, shared between the studies.
    default = config_hash(load_study("mask").trial_config("mask + enhancement (CSSFE)", 0))
    assert config_hash(load_study("losses").trial_config("ASL", 0)) == default
    assert config_hash(load_study("embeddings").trial_config("MiniLM", 0)) == default
    assert config_hash(load_study("losses").trial_config("ASL", 1)) != default


def _write(tmp_path, study):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return str(path)


def test_grid_env_vars_and_command_line_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("VECTORS", "/data/glove.txt")
    path = _write(tmp_path, {"overrides": {"optim.epochs": 3}, "seeds": [4],
                             "variants": {"glove": {"model.embedding": "glove", "model.embedding_options": {"path": "$VECTORS"}}},
                             "grid": {"model.dim": [16, 32], "loss.name": ["asl", "bce"]}})
    study = load_study(path, overrides=["optim.lr=0.01"], seeds=[1, 2])
    assert list(study.variants)[1:] == ["model.dim=16, loss.name=asl", "model.dim=16, loss.name=bce",
                                        "model.dim=32, loss.name=asl", "model.dim=32, loss.name=bce"]
    assert study.seeds == [1, 2]
    cfg = study.trial_config("model.dim=32, loss.name=bce", 2)
    assert (cfg.model.dim, cfg.loss.name, cfg.optim.epochs, cfg.optim.lr, cfg.seed) == (32, "bce", 3, 0.01, 2)
    assert study.trial_config("glove", 1).model.embedding_options == {"path": "/data/glove.txt"}
    assert trial_key("ViT-B/16", 2) == "ViT-B_16_s2"


@pytest.mark.parametrize("study, message", [
    ({"variants": {"a": {"model.dimm": 3}}}, "model.dimm"),
    ({"variants": {"a": {}, "b": {"model.dim": 128}}}, "same config"),
    ({"variants": {"a": {}}, "seed": [1]}, "unknown study key 'seed'"),
    ({"seeds": [0]}, "'variants' or 'grid'"),
])
def test_mistakes_are_named_before_anything_runs(tmp_path, study, message):
    with pytest.raises(ConfigError, match=message):
        load_study(_write(tmp_path, study))


def test_summary_lists_skipped_failed_and_retried_trials(tmp_path):
    study = load_study(_write(tmp_path, {"title": "T", "variants": {"a": {}, "b": {"model.mask": False}, "c": {"model.enhance": False}}}))
    study.skipped = {"c": "RuntimeError: no weights"}
    row = dict(epochs=40, total=50.0, head=70.0, medium=50.0, tail=30.0, error=None, attempts=1)
    records = [
        {**row, "variant": "a", "seed": 0, "status": "finished"},
        {**row, "variant": "a", "seed": 1, "status": "finished", "total": 52.0, "attempts": 2},
        {**row, "variant": "a", "seed": 2, "status": "finished", "total": 51.0, "attempts": 0, "reused": True},
        {**row, "variant": "b", "seed": 0, "status": "failed", "error": "ValueError: boom", "attempts": 2},
    ]
    text = summary_markdown(study, records)
    assert "| a | 51.00 ± 1.00 |" in text
    assert "| b |" not in text
    assert "skipped **c**: RuntimeError: no weights" in text
    assert "failed **b** seed 0 at epoch 40, after 2 start(s): ValueError: boom" in text
    assert "restarted **a** seed 1: finished after 2 starts" in text
    assert "reused, trained by another sweep with the same trial config: a seed 2" in text
    assert "restarted **a** seed 2" not in text
    paths = write_summary(study, records, str(tmp_path / "out"))
    assert set(paths) == {"markdown", "csv", "trials", "png"}
    csv_text = open(paths["csv"]).read()
    assert "b,0," in csv_text and "no finished trial" in csv_text and "skipped: RuntimeError" in csv_text


def test_the_reuse_key_changes_with_device_and_precision(tmp_path):
    """A GPU sweep on shared storage must not reuse CPU runs of the same config, nor bf16 runs fp32 ones."""
    from cssfe.sweep.trainable import trial_dir

    study = load_study(_write(tmp_path, {"variants": {"a": {}, "no amp": {"optim.amp": "off"},
                                                      "bf16": {"distributed.precision": "bf16"}}}))
    on_cpu = load_study(_write(tmp_path, {"variants": {"cpu": {"device": "cpu"}}}))
    base = {"trials_dir": str(tmp_path / "trials")}
    cpu, gpu = dict(base), {**base, "gpus_per_trial": 1}
    assert trial_dir(cpu, study, "a", 0) != trial_dir(gpu, study, "a", 0)  # device (and amp "auto" with it)
    assert trial_dir(gpu, study, "a", 0) != trial_dir(gpu, study, "no amp", 0)  # amp on CUDA vs fp32
    assert trial_dir(gpu, on_cpu, "cpu", 0) == trial_dir(cpu, study, "a", 0)  # device=cpu trains on CPU anyway
    ds, ds_gpu = {**base, "workers_per_trial": 2}, {**base, "workers_per_trial": 2, "gpus_per_trial": 2}
    assert trial_dir(ds, study, "a", 0) != trial_dir(ds, study, "bf16", 0)  # DeepSpeed precision
    assert trial_dir(ds, study, "a", 0) != trial_dir(ds_gpu, study, "a", 0)


def test_relative_paths_and_variables_are_pinned_in_the_driver(tmp_path, monkeypatch):
    from cssfe.sweep.paths import pin_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text("optim: {epochs: 2}\n")
    (tmp_path / "w.pt").write_bytes(b"")
    (tmp_path / "vectors.txt").write_text("")
    monkeypatch.setenv("VECTORS", "vectors.txt")
    study = load_study(_write(tmp_path, {"config": "base.yaml", "overrides": {"data.root": "data/voc"}, "variants": {
        "glove": {"model.embedding": "glove", "model.embedding_options": {"path": "$VECTORS"}},
        "clip": {"model.embedding": "clip", "model.embedding_options": {"pretrained": "openai"}, "model.weights_path": "w.pt",
                 "cache_dir": "~/c"},
    }}))
    pin_paths(study)
    monkeypatch.chdir("/")  # a trial's working directory
    monkeypatch.delenv("VECTORS")  # and environment
    glove, clip = study.trial_config("glove", 0), study.trial_config("clip", 0)
    assert study.config == str(tmp_path / "base.yaml") and glove.optim.epochs == 2
    assert glove.data.root == clip.data.root == str(tmp_path / "data" / "voc")
    assert glove.model.embedding_options == {"path": str(tmp_path / "vectors.txt")}
    assert clip.model.embedding_options == {"pretrained": "openai"}  # a name, not a file here
    assert clip.model.weights_path == str(tmp_path / "w.pt")
    assert clip.cache_dir.startswith(os.path.expanduser("~"))


def test_storage_uris_stay_uris_and_a_cluster_needs_shared_storage(tmp_path, capsys):
    from cssfe.sweep.cli import main as sweep_main
    from cssfe.sweep.runner import SweepOptions, experiment_dir, make_plan
    from cssfe.sweep.storage import check_cluster_storage

    study = load_study(_write(tmp_path, {"variants": {"a": {}}}))
    exp_dir = experiment_dir(SweepOptions(storage_path="s3://bucket/sweeps/"), study)
    assert exp_dir == "s3://bucket/sweeps/study"
    plan = make_plan(study, SweepOptions(storage_path="s3://bucket/sweeps/"), exp_dir)
    assert plan["trials_dir"] is None and plan["train_storage"] == "s3://bucket/sweeps/study/train"
    assert plan["experiment"] == "study" and set(plan["trial_dirs"].values()) == {None}
    check_cluster_storage("gs://bucket/sweeps", "auto")  # a URI every node reaches
    check_cluster_storage(str(tmp_path), "auto")  # absolute: then asked of every node, once Ray runs
    rc = sweep_main(["--study", _write(tmp_path, {"variants": {"a": {}}}), "--address", "10.0.0.1:6379", "--storage", "runs/sweeps"])
    assert rc == 2
    assert "--storage 'runs/sweeps' is a relative path; with --address" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs")


def test_a_restore_says_what_it_would_not_honour(tmp_path):
    from cssfe.sweep.runner import restore_conflicts

    path = _write(tmp_path, {"seeds": [0, 1], "variants": {"a": {}, "b": {"model.mask": False}}})
    planned = load_study(path)
    assert restore_conflicts(planned, load_study(path)) == []
    assert restore_conflicts(planned, load_study(path, seeds=[0, 1, 2])) == ["seeds [0, 1, 2] (the sweep has [0, 1])"]
    assert restore_conflicts(planned, load_study(path, variants=["a"])) == ["variants ['a'] (the sweep has ['a', 'b'])"]
    assert restore_conflicts(planned, load_study(path, overrides=["optim.lr=0.1"])) == [
        "other overrides (optim.lr) for every trial"]


def test_summary_says_how_many_seeds_asha_kept(tmp_path):
    study = load_study(_write(tmp_path, {"title": "T", "variants": {"a": {}, "b": {"model.mask": False}}}))
    row = dict(epochs=4, total=50.0, head=70.0, medium=50.0, tail=30.0, error=None, attempts=1)
    records = [{**row, "variant": "a", "seed": s, "status": "finished"} for s in (0, 1, 2)]
    records += [{**row, "variant": "b", "seed": 0, "status": "finished"},
                {**row, "variant": "b", "seed": 1, "status": "stopped early", "epochs": 1},
                {**row, "variant": "b", "seed": 2, "status": "stopped early", "epochs": 1}]
    text = summary_markdown(study, records)
    assert "ASHA kept 1 of 3 seeds of **b** (stopped early: seed 1, 2)" in text
    assert "seeds of **a**" not in text
    rows = {r[0]: r for r in csv.reader(open(write_summary(study, records, str(tmp_path / "out"))["csv"]))}
    assert rows["b"][1] == "1" and rows["b"][-1].startswith("ASHA kept 1 of 3 seeds of b")


def test_trials_get_the_driver_environment_and_their_resources(monkeypatch):
    from cssfe.sweep.resources import runtime_env, trial_actor_resources
    from cssfe.sweep.runner import SweepOptions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CSSFE_CACHE", "/shared/cache")
    env = runtime_env(SweepOptions(ship_code=True))
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"]["CSSFE_CACHE"] == "/shared/cache"
    assert env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    assert env["py_modules"] == [os.path.dirname(os.path.abspath(cssfe.__file__))]
    assert "py_modules" not in runtime_env(SweepOptions())
    pinned = SweepOptions(trial_resources={"non_preemptible": 0.01}, workers_per_trial=2, cpus_per_trial=4)
    assert trial_actor_resources(pinned) == {"cpu": 0, "gpu": 0, "memory": 1, "non_preemptible": 0.01}
    assert trial_actor_resources(SweepOptions(gpus_per_trial=1)) == {"cpu": 1.0, "gpu": 1}


def test_fresh_keeps_the_run_folders_another_study_started(tmp_path):
    """--fresh deletes a trial's run folder only when no other study's sweep has used it (run
    folders are shared by trial config). Wrong implementation it catches: deleting every folder."""
    import json

    from cssfe.sweep.runner import _used_by_others

    own, shared, new = tmp_path / "own", tmp_path / "shared", tmp_path / "new"
    for folder, experiments in ((own, ["mask", "mask"]), (shared, ["mask", "losses"]), (new, [])):
        folder.mkdir()
        if experiments:
            (folder / "attempts.jsonl").write_text("".join(json.dumps({"action": "start", "experiment": e}) + "\n"
                                                           for e in experiments))
    assert not _used_by_others(str(own), "mask")
    assert _used_by_others(str(shared), "mask")
    assert not _used_by_others(str(new), "mask")


def test_the_enhancement_studies_pair_every_form_with_enhancement_off():
    """Both datasets, 5 seeds, every form of model.enhance_form, paired with "enhancement off"; the
    published form is the default run (trained once, shared with the other studies)."""
    from cssfe.models.enhance_forms import ENHANCE_FORMS

    for name, dataset in (("enhancement", "bundled"), ("enhancement_coco", "bundled_coco")):
        study = load_study(name)
        assert study.seeds == [0, 1, 2, 3, 4] and study.paired_against == "enhancement off"
        configs = {label: study.trial_config(label, 0) for label in study.variants}
        assert {c.data.name for c in configs.values()} == {dataset}
        assert not configs["enhancement off"].model.enhance
        assert sorted(c.model.enhance_form for label, c in configs.items() if c.model.enhance) == ENHANCE_FORMS.names()
    default = config_hash(load_study("mask").trial_config("mask + enhancement (CSSFE)", 0))
    assert config_hash(load_study("enhancement").trial_config("published", 0)) == default


def test_the_bundled_coco_studies_remeasure_mask_embeddings_and_losses():
    pairs = {"mask_coco": ("mask + enhancement (CSSFE)", {"model.mask": False}), "embeddings_coco": ("MiniLM", {"model.embedding": "rie"}),
             "losses_coco": ("ASL", {"loss.name": "pg"})}
    digests = set()
    for name, (baseline, other) in pairs.items():
        study = load_study(name)
        assert study.seeds == [0, 1, 2, 3, 4] and study.paired_against == baseline and len(study.variants) == 2
        assert study.trial_config(baseline, 0).data.name == "bundled_coco"
        assert other in [v for label, v in study.variants.items() if label != baseline]
        digests.add(config_hash(study.trial_config(baseline, 0)))
    # the baselines are one model, the default on bundled_coco, which the enhancement study's published row trains too
    assert digests == {config_hash(load_study("enhancement_coco").trial_config("published", 0))}


def _paired_records():
    base = dict(epochs=4, head=60.0, medium=40.0, error=None, attempts=1, status="finished")
    records = [{**base, "variant": "off", "seed": s, "total": 50.0, "tail": 30.0, "lambda": 1.0} for s in range(5)]
    # tail differences 1, 2, 3, 4, -1 (seed 4 negative); total +0.5 in every seed; seed 3 of "b" failed
    records += [{**base, "variant": "a", "seed": s, "total": 50.5, "tail": 30.0 + d, "lambda": lam}
                for s, d, lam in zip(range(5), (1, 2, 3, 4, -1), (0.5, 0.6, 0.7, 0.8, 0.9))]
    records += [{**base, "variant": "b", "seed": s, "total": 49.0, "tail": 30.0, "lambda": 1.0,
                 "status": "failed" if s == 3 else "finished"} for s in range(5)]
    return records


def test_paired_differences_with_a_t_interval(tmp_path):
    """Against numbers worked by hand: tail differences 1, 2, 3, 4, -1 have mean 1.8, sample std
    sqrt(14.8 / 4) = 1.9235, 4 of 5 positive, and the 95 % interval 1.8 ± t(0.975, 4) 1.9235 / sqrt(5)
    with t(0.975, 4) = 2.776 (the t table) = [-0.588, 4.188]."""
    from cssfe.sweep.summary import paired_differences, paired_stats

    study = load_study(_write(tmp_path, {"title": "T", "paired_against": "off", "variants": {
        "off": {"model.enhance": False}, "a": {}, "b": {"model.mask": False}}}))
    paired = paired_differences(study, _paired_records(), "off")
    assert list(paired) == ["a", "b"] and paired["b"]["seeds"] == [0, 1, 2, 4]  # b's failed seed is left out
    st = paired_stats(paired["a"]["diffs"])
    tail = 3  # total, head, medium, tail
    assert st["n"] == 5 and st["positive"][tail] == 4 and st["positive"][0] == 5 and st["positive"][1] == 0
    assert st["mean"][tail] == pytest.approx(1.8) and st["std"][tail] == pytest.approx((14.8 / 4) ** 0.5)
    half = 2.776 * (14.8 / 4) ** 0.5 / 5 ** 0.5
    assert st["low"][tail] == pytest.approx(1.8 - half, abs=2e-3) and st["high"][tail] == pytest.approx(1.8 + half, abs=2e-3)
    assert st["low"][0] == st["high"][0] == pytest.approx(0.5)  # no spread: the interval is the point
    text = summary_markdown(study, _paired_records())
    assert "Per-seed paired differences to **off**" in text
    row = next(line for line in text.splitlines() if line.startswith("| a | +0.50"))
    assert "+1.80 ± 1.92 (4/5 > 0) [-0.59, +4.19]" in row and "0.700 ± 0.158" in row and row.endswith("| 5 |")
    paths = write_summary(study, _paired_records(), str(tmp_path / "out"))
    rows = list(csv.DictReader(open(paths["paired_csv"])))
    tail_a = next(r for r in rows if r["variant"] == "a" and r["column"] == "tail")
    assert (tail_a["n"], tail_a["positive"], float(tail_a["mean"])) == ("5", "4", pytest.approx(1.8))
    assert float(tail_a["ci95_low"]) == pytest.approx(1.8 - half, abs=2e-3)
    assert [r["n"] for r in rows if r["variant"] == "b"][0] == "4"
    assert open(paths["paired_png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_paired_against_names_a_variant_and_the_command_line_chooses_it(tmp_path):
    path = _write(tmp_path, {"variants": {"off": {"model.enhance": False}, "a": {}}, "paired_against": "of"})
    with pytest.raises(ConfigError, match="paired_against 'of' is not a variant.*off, a"):
        load_study(path)
    assert load_study(path, paired_against="a").paired_against == "a"
    plain = load_study(_write(tmp_path, {"variants": {"off": {"model.enhance": False}, "a": {}}}))
    assert plain.paired_against is None and "paired" not in summary_markdown(plain, _paired_records())
    assert not {"paired_csv", "paired_png"} & set(write_summary(plain, _paired_records(), str(tmp_path / "plain")))


def test_run_files_keep_the_settings_and_drop_the_machine_paths(tmp_path, monkeypatch):
    """Finished trials only; output_dir relative to the storage; the sweep's default cache folder
    written as the default (null), another one kept."""
    from cssfe.sweep.summary import copy_run_files

    monkeypatch.setenv("CSSFE_CACHE", str(tmp_path / "cache"))
    storage = tmp_path / "sweeps"
    records = []
    for i, (status, cache) in enumerate([("finished", str(tmp_path / "cache")), ("finished", "/elsewhere"), ("failed", None)]):
        run = storage / "trials" / f"s{i}-key"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(run), "cache_dir": cache, "seed": i}))
        (run / "log.jsonl").write_text(f'{{"epoch": {i}}}\n')
        (run / "metrics.json").write_text(f'{{"seed": {i}}}')
        records.append({"variant": "a (b)", "seed": i, "status": status, "run_dir": str(run)})
    written = copy_run_files(records, str(tmp_path / "out"), str(storage))
    assert [os.path.basename(w) for w in written] == ["a_b_s0", "a_b_s1"]
    first, second = (yaml.safe_load(open(os.path.join(w, "config.yaml"))) for w in written)
    assert first == {"output_dir": os.path.join("trials", "s0-key"), "cache_dir": None, "seed": 0}
    assert second["cache_dir"] == "/elsewhere"
    assert open(os.path.join(written[1], "metrics.json")).read() == '{"seed": 1}'


@pytest.mark.parametrize("key", ["model.enhance_form", "distributed.sync_batchnorm", "model.head_options",
                                 "distributed.timeout_s"])
def test_a_key_added_later_at_its_default_leaves_the_digests_of_older_runs(monkeypatch, key):
    """Trials trained before the key existed keep their run folders (digest) and are reused."""
    import cssfe.config as config
    from cssfe.config import ADDED_KEYS, load_config
    from cssfe.engine.train import RESUMABLE_CHANGES

    cfg = load_config(None, [])
    digest = config_hash(cfg)
    real = config.to_dict
    section, name = key.split(".")

    def before_the_key(c):
        d = real(c)
        del d[section][name]
        return d

    monkeypatch.setattr(config, "to_dict", before_the_key)
    assert config_hash(cfg) == digest
    monkeypatch.undo()
    assert key in ADDED_KEYS or key in RESUMABLE_CHANGES  # at its default / never part of the digest
    assert config_hash(load_config(None, ["model.enhance_form=presence"])) != digest


def test_the_committed_coco_runs_stand_for_the_default_row_of_the_coco_studies(tmp_path):
    """docs/sweeps.md's ``--study mask_coco --reuse-runs docs/results/sweeps/methods_coco/runs``: the
    committed CSSFE runs match that study's default trials (folder key and config digest), so a
    change of defaults that would make them stale fails here; no other committed run is taken."""
    from cssfe.sweep.reuse import import_runs, read_runs
    from cssfe.sweep.runner import SweepOptions, make_plan

    runs_dir = os.path.join(REPO, "docs", "results", "sweeps", "methods_coco", "runs")
    study = load_study("mask_coco")
    plan = make_plan(study, SweepOptions(storage_path=str(tmp_path)), str(tmp_path / "mask_coco"))
    copied = import_runs(read_runs([runs_dir]), study, plan)
    assert copied == [f"mask + enhancement (CSSFE) seed {s} <- {os.path.join(runs_dir, f'CSSFE_s{s}')}" for s in (0, 1, 2)]
    for s in (0, 1, 2):
        target = plan["trial_dirs"][f"mask + enhancement (CSSFE)|{s}"]
        kept = os.path.join(runs_dir, f"CSSFE_s{s}", "metrics.json")
        assert open(os.path.join(target, "metrics.json")).read() == open(kept).read()
    assert import_runs(read_runs([runs_dir]), study, plan) == []  # the trials' own runs come first now
