"""The benchmarks run in smoke mode so they cannot rot; nothing here asserts a time."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _run(script, *args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(BENCH, script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_train_step_benchmark_smoke():
    proc = _run("train_step.py", "--smoke", timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "img/s" in line]
    assert len(lines) == 2 and "cssfe" in lines[1]


def test_kernels_benchmark_smoke_appends_nothing():
    results = os.path.join(BENCH, "results", "kernels_cpu.jsonl")
    before = os.path.getsize(results) if os.path.exists(results) else None
    proc = _run("kernels.py", "--smoke", timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " p50 " in line or " FAILED " in line]
    assert any(line.startswith("asl") for line in lines) and any(line.startswith("class_attention") for line in lines)
    assert (os.path.getsize(results) if os.path.exists(results) else None) == before


def test_kernels_benchmark_rows_carry_versions_percentiles_memory_and_compile(tmp_path):
    proc = _run("kernels.py", "--smoke", "--out", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in open(tmp_path / "kernels_cpu.jsonl")]
    for kernel in ("asl", "class_attention"):
        providers = {row["provider"] for row in rows if row["kernel"] == kernel}
        assert {"compile", "ops reference"} <= providers, providers
    for row in rows:
        assert row["machine"]["device"] and row["torch"] and row["commit"] and row["date"]
        assert "triton" in row  # None when triton is not installed
        if "error" in row:  # a provider may fail on a machine, but only with its error recorded
            assert row["error"] and "p50_ms" not in row
            continue
        assert row["p20_ms"] <= row["p50_ms"] <= row["p80_ms"]
        assert row["peak_method"] and (row["peak_bytes"] is None or row["peak_bytes"] >= 0)
    compiled = [row for row in rows if row["provider"] == "compile"]
    assert all(row["compile_backend"] == "aot_eager" for row in compiled)
