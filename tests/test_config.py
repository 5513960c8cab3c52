"""Configuration: defaults, YAML, overrides, and clear errors before any work."""
import os
import subprocess
import sys

import pytest

from cssfe.config import ConfigError, TrainConfig, load_config, parse_override, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_yaml_equals_builtin_defaults():
    assert to_dict(load_config(os.path.join(ROOT, "configs", "default.yaml"))) == to_dict(TrainConfig())


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["optim.epochs=3", "model.head=baseline", "optim.lr=1e-3", "loss.params={gamma_neg: 2}"])
    assert cfg.optim.epochs == 3 and cfg.model.head == "baseline"
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.loss.params == {"gamma_neg": 2}
    assert parse_override("a.b=null") == {"a": {"b": None}}


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.backbone=resnet5", "model.backbone"),
        ("loss.name=nope", "loss.name"),
        ("model.embedding=word2vecc", "model.embedding"),
        ("model.head=mlp", "model.head"),
        ("data.name=imagenet", "data.name"),
        ("optim.learning_rate=0.1", "optim.learning_rate"),
        ("modle.dim=3", "modle"),
        ("optim.epochs=three", "optim.epochs"),
        ("optim.epochs=0", "optim.epochs"),
        ("model.gate=always", "model.gate"),
        ("optim.pct_start=1.5", "optim.pct_start"),
        ("model.enhance=1", "model.enhance"),
        ("model.prompt=a photo", "model.prompt"),
        ("model.weights_path=/nonexistent/weights.pth", "model.weights_path"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  backbon: resnet50\n")
    with pytest.raises(ConfigError, match="bad.yaml.*model.backbon"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    """Exit code 2 naming the key, before any work: no run folder, no cache (no dataset generated, no
    embeddings computed)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--output-dir", str(tmp_path / "run"), "model.backbone=resnet5"],
        capture_output=True,
        text=True,
        env={**os.environ, "CSSFE_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 2
    assert "model.backbone" in proc.stderr and "resnet50" in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_on_off_values_reach_string_keys():
    """``optim.amp=on`` as documented: YAML 1.1 reads on/off as booleans, which a string key takes back
    as the word (before, the override was refused: 'expects str, got True')."""
    assert load_config(None, ["optim.amp=on"]).optim.amp == "on"
    assert load_config(None, ["optim.amp=off"]).optim.amp == "off"
    with pytest.raises(ConfigError, match="optim.amp"):
        load_config(None, ["optim.amp=yes please"])
