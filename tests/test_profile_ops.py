"""benchmarks/profile_ops.py on CPU with tiny shapes: the per-backend profile tables and JSON are
written, a failing backend is recorded without stopping the others, bad shapes are refused; the
documented command runs."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import profile_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    return profile_ops


@pytest.mark.parametrize("op,shape", [("enhance", "2,5,7"), ("attention", "2,5,9,8"), ("asl", "3,11")])
def test_profile_writes_tables_and_json(tmp_path, op, shape, capsys):
    prof = _load()
    args = ["--op", op, "--shape", shape, "--backends", "reference,no_such_backend", "--dtype", "float32",
            "--device", "cpu", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]
    assert prof.main(args + (["--affinity-grad"] if op == "enhance" else [])) == 0
    data = json.loads((tmp_path / f"profile_{op}.json").read_text())
    assert data["op"] == op and list(data["shape"].values()) == [int(s) for s in shape.split(",")]
    ref = data["backends"]["reference"]
    assert ref["wall_ms_per_step"] > 0 and ref["rows"], ref
    assert any(r["name"].startswith("aten::") and r["self_cpu_us_per_step"] > 0 for r in ref["rows"]), ref["rows"]
    assert "unknown kernel backend 'no_such_backend'" in data["backends"]["no_such_backend"]["error"]
    assert (tmp_path / f"profile_{op}_reference_float32.txt").read_text().strip()
    assert not (tmp_path / f"profile_{op}_no_such_backend_float32.txt").exists()
    assert f"== {op} reference float32" in capsys.readouterr().out


def test_profile_refuses_bad_shapes(capsys):
    prof = _load()
    with pytest.raises(SystemExit):
        prof.main(["--op", "attention", "--shape", "2,5,9", "--device", "cpu"])
    assert "expected 4 positive sizes (B,C,N,d)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prof.main(["--op", "asl", "--shape", "3,x", "--device", "cpu"])
    assert "expected integers separated by commas" in capsys.readouterr().err


def test_documented_command_on_cpu(tmp_path):
    """The page's CPU example: ``python -m benchmarks.profile_ops --op attention --shape 2,8,16,32
    --backends reference,cpu --dtype float32`` (here with --steps 1 and --out)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.profile_ops", "--op", "attention", "--shape", "2,8,16,32",
                           "--backends", "reference,cpu", "--dtype", "float32", "--device", "cpu", "--steps", "1",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "profile_attention.json").read_text())
    assert set(data["backends"]) == {"reference", "cpu"} and all("rows" in b for b in data["backends"].values())
