"""Studies as data (no Ray needed): the shipped studies load, grids expand, mistakes are named, and
the summary lists what did not finish."""
import pytest
import yaml

from cssfe.config import ConfigError
from cssfe.sweep.studies import available_studies, config_hash, load_study, trial_key
from cssfe.sweep.summary import summary_markdown, write_summary


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
