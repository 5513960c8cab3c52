"""CUDA sources: a compile-only check (needs nvcc, not a GPU) and, on a GPU, the numerical cases."""
import concurrent.futures
import os
import shutil
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _nvcc_command(src, obj):
    from torch.utils import cpp_extension

    from cssfe.ops.backends import native

    home = native.cuda_home()
    cmd = [os.path.join(home, "bin", "nvcc"), "-c", src, "-o", obj, "-std=c++20", "-DCSSFE_WITH_CUDA",
           "-DTORCH_EXTENSION_NAME=cssfe_cuda_check", "-DTORCH_API_INCLUDE_EXTENSION_H", "--expt-relaxed-constexpr",
           "-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cmd += [f for f in native.NVCC_FLAGS if f != "--use_fast_math"]
    for inc in cpp_extension.include_paths(device_type="cuda") + [os.path.join(home, "include")]:
        cmd += ["-isystem", inc]
    import sysconfig

    cmd += ["-isystem", sysconfig.get_paths()["include"]]
    return cmd


@pytest.mark.slow
def test_cuda_sources_compile(tmp_path):
    """Compiles every csrc/cuda/*.cu for sm_80 and sm_90 with nvcc (no GPU needed)."""
    from cssfe.ops.backends import native

    if shutil.which("nvcc") is None or native.cuda_home() is None:
        pytest.skip("nvcc (CUDA toolkit) not found")
    env = dict(os.environ, **native.cuda_build_env())
    sources = native.cuda_sources()
    assert sources, "no CUDA sources under csrc/cuda"

    def compile_one(src):
        obj = str(tmp_path / (os.path.basename(src) + ".o"))
        proc = subprocess.run(_nvcc_command(src, obj), env=env, capture_output=True, text=True, timeout=900)
        return src, obj, proc

    # one nvcc per core: each is single-threaded, and the files are independent
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        for src, obj, proc in pool.map(compile_one, sources):
            assert proc.returncode == 0, f"{src}:\n{proc.stderr[-6000:]}"
            assert os.path.getsize(obj) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_backend_on_gpu():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ["PYTHONPATH"]]))
    # poisoned outputs (unwritten elements fail); shared and per-image queries; wide features; and
    # C x N large enough that the attention runs in several chunks of images (2, 2, 1 in backward)
    code = ("import torch, kernel_cases as kc\nkc.DEVICE='cuda'\n"
            "torch.use_deterministic_algorithms(True, warn_only=True)\n"
            "torch.utils.deterministic.fill_uninitialized_memory = True\n"
            "wide = [(2, 20, 256, 197), (2, 7, 512, 49), (1, 5, 768, 196), (5, 1000, 64, 1024)]\n"
            "for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
            "    for i, s in enumerate(kc.ATTENTION_SHAPES + wide):\n"
            "        kc.check_attention('cuda', s, dt, batched_q=i % 2 == 1, seed=i)\n"
            "    if dt == torch.float32:  # the products keep fp32 under the caller's autocast\n"
            "        with torch.autocast('cuda', dtype=torch.bfloat16):\n"
            "            kc.check_attention('cuda', (2, 7, 64, 49), dt, seed=50)\n"
            "    for s in kc.ENHANCE_SHAPES: kc.check_enhance('cuda', s, dt)\n"
            "    for s in kc.ASL_SHAPES: kc.check_asl('cuda', s, dt)\nprint('ALL OK')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert "ALL OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
