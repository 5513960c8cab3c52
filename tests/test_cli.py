"""The ``cssfe`` command (``cssfe/cli.py``): every command's help through it, its own help and
errors, the ``launch/`` scripts as thin wrappers of the same functions, the console scripts that
setup.py installs, and a tiny training through ``python -m cssfe``."""
import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from cssfe import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
TINY = ["data.image_size=32", "model.embedding=rie", "model.dim=16", "optim.epochs=1", "progress=false"]


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_shows_its_help_through_cssfe(name, capsys):
    argv = list(sys.argv)
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: cssfe {name} ")
    assert sys.argv == argv  # restored for whatever runs next in this process


def test_cssfe_lists_its_commands_and_refuses_an_unknown_one(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cssfe COMMAND")
    for name, command in cli.COMMANDS.items():
        assert f"  {name} " in out and command.help in out
    assert cli.main([]) == 2 and capsys.readouterr().err.startswith("usage: cssfe COMMAND")
    assert cli.main(["trian", "--help"]) == 2
    assert "unknown command 'trian'; choose one of: train, evaluate" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.split() == ["cssfe", __import__("cssfe").__version__]


def test_cssfe_returns_the_exit_code_of_the_command(capsys):
    assert cli.main(["reshard", os.path.join(ROOT, "no-such-run")]) == 1
    assert "no complete DeepSpeed checkpoint in" in capsys.readouterr().err


def _launch_script(path):
    spec = importlib.util.spec_from_file_location(f"launch_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(LAUNCH) if f.endswith(".py")))
def test_launch_scripts_call_the_command_of_their_name_and_touch_no_sys_path(script):
    path = os.path.join(LAUNCH, script)
    with open(path) as f:
        tree = ast.parse(f.read())
    edits = [node.lineno for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys"]
    assert not edits, f"launch/{script} uses sys.path on line(s) {edits}: the installed package is imported"
    name = script[:-3].replace("_", "-")
    assert name in cli.COMMANDS, f"launch/{script} has no 'cssfe {name}' command"
    assert _launch_script(path).main is cli.resolve(name)


def test_setup_py_installs_cssfe_and_cssfe_train():
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    (entry_points,) = [kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                       for kw in node.keywords if kw.arg == "entry_points"]
    scripts = dict(line.replace(" ", "").split("=") for line in ast.literal_eval(entry_points)["console_scripts"])
    assert scripts == {"cssfe": "cssfe.cli:main", "cssfe-train": "cssfe.engine.cli:main"}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_the_installed_console_script_runs():
    script = os.path.join(os.path.dirname(sys.executable), "cssfe")
    if not os.path.isfile(script):
        pytest.skip("the cssfe console script is not installed next to this interpreter (pip install -e .)")
    proc = subprocess.run([script, "evaluate", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: cssfe evaluate ")


def test_python_m_cssfe_trains_a_tiny_model(bundled_root, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cssfe", "train", "--output-dir", str(out), *TINY],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final"]["mAP"]) == {"total", "head", "medium", "tail"}
    assert "epoch 1/1: loss" in proc.stdout


def test_a_benchmark_command_outside_a_checkout_says_where_to_run_it(monkeypatch):
    def missing(module):
        raise ModuleNotFoundError(f"No module named {module.split('.')[0]!r}", name=module.split(".")[0])

    monkeypatch.setattr(cli.importlib, "import_module", missing)
    with pytest.raises(SystemExit, match=r"cssfe bench-kernels: the benchmark suite runs from a checkout.*"
                                         r"python -m cssfe bench-kernels"):
        cli.main(["bench-kernels", "--help"])
    with pytest.raises(ModuleNotFoundError):  # a package's own missing module is not hidden
        cli.main(["evaluate", "--help"])
