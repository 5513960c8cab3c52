"""Triton kernels. Without a GPU they run in Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton defines them: so they run in a subprocess, leaving this test
session untouched. fp32 only in the interpreter (bf16 is broken there); half precision on a GPU."""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# A loop with a run-time bound, nothing of ours: Triton 3.6's interpreter turns the bound into a
# one-element array and int() of it is an error from numpy 2.4 on (fixed in later Triton releases).
_INTERPRETER_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def count(out, n):
    acc = 0
    for i in range(0, n, 1):
        acc += 1
    tl.store(out, acc)

out = torch.zeros(1, dtype=torch.int32)
count[(1,)](out, 3)
assert out.item() == 3, out.item()
"""


def _interpreter_defect(env) -> str:
    """Why this triton + numpy cannot interpret any kernel with a loop, or '' when they can."""
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_PROBE], check=False, env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    if proc.returncode == 0:
        return ""
    import numpy
    import triton

    return (f"Triton {triton.__version__}'s interpreter cannot run a loop with a run-time bound under numpy "
            f"{numpy.__version__} (install numpy<2.4, or a newer Triton):\n" + proc.stderr[-1000:])


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([HERE, os.environ["PYTHONPATH"]]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_cases.py")], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0:
        defect = _interpreter_defect(env)
        if defect:  # the interpreter, not the kernels: the same kernels run compiled on a GPU
            pytest.skip(defect)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "ALL OK" in proc.stdout, proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_triton_kernels_on_gpu():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ["PYTHONPATH"]]))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_cases.py"), "--device", "cuda"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-5000:] + proc.stderr[-5000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_kernels_on_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: every launch must go to the tensors' device."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ["PYTHONPATH"]]))
    env.pop("TRITON_INTERPRET", None)
    code = ("import kernel_cases as kc\nfrom cssfe.ops.backends.triton import attention\n"
            "for strategy in attention.STRATEGIES:\n"
            "    with attention.strategy(strategy): kc.check_other_device('triton')\n"
            "print('ALL OK')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert "ALL OK" in proc.stdout, proc.stdout[-5000:] + proc.stderr[-5000:]
