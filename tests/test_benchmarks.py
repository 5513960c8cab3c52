"""The benchmarks run in smoke mode so they cannot rot; nothing here asserts a time."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "img/s" in line]
    assert len(lines) == 2 and "cssfe" in lines[1]


def test_kernels_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "kernels.py"), "--smoke"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " p50 " in line]
    assert any(line.startswith("asl") for line in lines) and any(line.startswith("class_attention") for line in lines)
