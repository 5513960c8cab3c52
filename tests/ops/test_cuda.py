"""CUDA sources: a compile-only check (needs nvcc, not a GPU), the enhancement's block program run on
the host, and, on a GPU, the numerical cases (parity with float64, opcheck with both enhancement
strategies, run-to-run reproducibility, a CUDA-graph capture of the three operators forward and
backward) and, on two GPUs, the device guards."""
import concurrent.futures
import ctypes
import math
import os
import shutil
import subprocess
import sys

import kernel_cases as kc
import pytest
import torch

from cssfe import ops
from cssfe.ops import reference
from cssfe.ops.backends import build_spec

HERE = os.path.dirname(os.path.abspath(__file__))


def _nvcc_command(src, obj):
    from torch.utils import cpp_extension

    home = build_spec.cuda_home()
    cmd = [os.path.join(home, "bin", "nvcc"), "-c", src, "-o", obj, "-std=c++20", build_spec.CUDA_DEFINE,
           "-DTORCH_EXTENSION_NAME=cssfe_cuda_check", "-DTORCH_API_INCLUDE_EXTENSION_H", "--expt-relaxed-constexpr",
           "-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cmd += [f for f in build_spec.NVCC_FLAGS + build_spec.NVCC_ARCH_FLAGS if f != "--use_fast_math"]
    for inc in cpp_extension.include_paths(device_type="cuda") + [os.path.join(home, "include")]:
        cmd += ["-isystem", inc]
    import sysconfig

    cmd += ["-isystem", sysconfig.get_paths()["include"]]
    return cmd


@pytest.mark.slow
def test_cuda_sources_compile(tmp_path):
    """Compiles every csrc/cuda/*.cu for sm_80 and sm_90 with nvcc (no GPU needed)."""
    from cssfe.ops.backends import native

    if shutil.which("nvcc") is None or build_spec.cuda_home() is None:
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


@pytest.fixture(scope="module")
def enhance_block_host(tmp_path_factory):
    """csrc/cuda/enhance_block.h built for the host by tests/ops/enhance_block_host.cpp."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    lib = str(tmp_path_factory.mktemp("enhance_block") / "enhance_block_host.so")
    proc = subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", os.path.join(HERE, "enhance_block_host.cpp"),
                           "-o", lib], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return ctypes.CDLL(lib)


def _run_block_program(lib, z, r, groups, w, grad, width, reverse, earlier_only=0):
    """The CUDA enhancement's forward and backward, block program on the host: (out, dz, dm, dw)."""
    b, c, length = z.shape
    order, bounds, _ = ops.enhance_plan(groups)
    # what enhance.cu hands the block program: R, w and R's row sums in group order
    rp = r.index_select(0, order).index_select(1, order).contiguous()
    wp = w.index_select(1, order).contiguous()
    rsp = rp.sum(1).contiguous()
    per_image = -(-length // width)
    nan = float("nan")
    out, dz, dm = (torch.full_like(z, nan) for _ in range(3))
    dw_part = torch.full((b, per_image, c), nan)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    dims = [ctypes.c_int64(v) for v in (b, c, length, int(bounds[1]), int(bounds[2]), width, earlier_only)]
    common = [ptr(z), ptr(rp), ptr(wp), ptr(rsp), ptr(order)] + dims + [ctypes.c_int(int(reverse))]
    lib.enhance_fwd_host(*common, ptr(out))
    lib.enhance_bwd_host(*common, ptr(grad), ptr(out), ptr(dz), ptr(dm), ptr(dw_part))
    return out, dz, dm, dw_part.sum(1)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 8), (2, 5, 3), (3, 7, 49), (3, 20, 197), (1, 80, 96)])
@pytest.mark.parametrize("mask", [True, False])
def test_cuda_enhance_block_program_on_host(enhance_block_host, shape, mask):
    """The block program of the CUDA enhancement (csrc/cuda/enhance_block.h) against the float64
    reference, forward and backward, for tiles narrower than, equal to and wider than L, with its
    phases' items run forwards and backwards: the items of a phase must not depend on each other,
    so both orders give the same bits. Each stage's check of R runs, or is skipped where the caller
    knows (earlier_only, as the head's plan passes it); forcing the skip on an affinity that has
    sources there must change the result."""
    b, c, length = shape
    seed = sum(shape) + mask
    torch.manual_seed(seed)
    groups = kc.groups_for(c, seed)
    z = torch.randn(b, c, length)
    r = reference.semantic_affinity(torch.randn(c, 8), groups, mask=mask, tau=0.2).float()
    w = 0.8 * torch.rand(b, c)
    grad = torch.randn(b, c, length)
    z64, r64, w64, g64 = (t.double() for t in (z, r, w, grad))
    out_ref = reference.enhance_fwd(z64, r64, groups, w64)
    want = (out_ref,) + tuple(reference.enhance_bwd(g64, z64, r64, groups, w64, out_ref))
    scale = math.sqrt(b * c * length)
    known = ops.enhance_plan(groups, mask).earlier_only
    if mask:
        assert known == 0b111
    for width in sorted({1, 4, 64, length}):
        for earlier_only in sorted({0, known}):
            runs = [_run_block_program(enhance_block_host, z, r, groups, w, grad, width, reverse, earlier_only)
                    for reverse in (0, 1)]
            for name, got, again, ref in zip(("out", "dz", "dm", "dw"), *runs, want):
                what = f"block program {name} {shape} mask={mask} width={width} earlier_only={earlier_only}"
                kc.close(got, ref, torch.float32, what, 1.0 if name == "out" else scale)
                assert torch.equal(got, again), f"{what}: items of a phase depend on their order"
        if known != 0b111:  # some stage has sources in its own or a later group: skipping them is wrong
            forced = _run_block_program(enhance_block_host, z, r, groups, w, grad, width, 0, 0b111)
            assert not torch.allclose(forced[0], out_ref.float(), atol=1e-3), f"{shape} width={width}: skip unused"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_backend_on_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current (both enhancement strategies)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ["PYTHONPATH"]]))
    code = ("import kernel_cases as kc\nfrom cssfe.ops.backends import native_ops\n"
            "for strategy in native_ops.NATIVE_ENHANCE_STRATEGIES:\n"
            "    with native_ops.native_enhance_strategy(strategy): kc.check_other_device('cuda')\n"
            "print('ALL OK')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert "ALL OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_backend_on_gpu():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ["PYTHONPATH"]]))
    # poisoned outputs (unwritten elements fail); shared and per-image queries; wide features; and
    # C x N large enough that the attention runs in several chunks of images (2, 2, 1 in backward)
    code = ("import torch, kernel_cases as kc\nfrom cssfe.ops.backends import native_ops\nkc.DEVICE='cuda'\n"
            "torch.use_deterministic_algorithms(True, warn_only=True)\n"
            "torch.utils.deterministic.fill_uninitialized_memory = True\n"
            "wide = [(2, 20, 256, 197), (2, 7, 512, 49), (1, 5, 768, 196), (5, 1000, 64, 1024)]\n"
            "# narrow shared tiles; the backward's rows in global scratch (the forward's go there from\n"
            "# 6,145 classes: not run, its float64 reference alone takes seconds per case)\n"
            "enhance_large = [(2, 1000, 33), (2, 2100, 3)]\n"
            "for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
            "    for i, s in enumerate(kc.ATTENTION_SHAPES + wide):\n"
            "        kc.check_attention('cuda', s, dt, batched_q=i % 2 == 1, seed=i)\n"
            "    if dt == torch.float32:  # the products keep fp32 under the caller's autocast\n"
            "        with torch.autocast('cuda', dtype=torch.bfloat16):\n"
            "            kc.check_attention('cuda', (2, 7, 64, 49), dt, seed=50)\n"
            "    for s in kc.ENHANCE_SHAPES + enhance_large:\n"
            "        for mask in (True, False):\n"
            "            for strategy in native_ops.NATIVE_ENHANCE_STRATEGIES:  # block program and staged GEMMs\n"
            "                with native_ops.native_enhance_strategy(strategy):\n"
            "                    kc.check_enhance('cuda', s, dt, mask=mask)\n"
            "    for i, s in enumerate(kc.ASL_SHAPES + [(257, 1001)]):  # default-parameter and run-time kernels\n"
            "        for j, variant in enumerate(kc.ASL_VARIANTS): kc.check_asl('cuda', s, dt, **variant, seed=i + j)\n"
            "    for soft in (False, True): kc.check_asl_nan('cuda', dt, soft)\n"
            "for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):\n"
            "    for size in kc.ASL_SCALE_SIZES + [(1 << 20, 0), (1 << 20, 1)]:\n"
            "        for i, scale in enumerate(kc.ASL_SCALES): kc.check_asl_scale('cuda', *size, dt, scale, seed=i)\n"
            "for i, s in enumerate([(37, 20), (257, 1001)]):  # fp64 logits: every variant, the unaligned ones too\n"
            "    for j, variant in enumerate(kc.ASL_VARIANTS):\n"
            "        kc.check_asl('cuda', s, torch.float64, **variant, seed=i + j)\n"
            "torch.use_deterministic_algorithms(False)  # opcheck and graph capture as in training\n"
            "for strategy in native_ops.NATIVE_ENHANCE_STRATEGIES:\n"
            "    with native_ops.native_enhance_strategy(strategy):\n"
            "        for op, args in kc.opcheck_samples('cuda', 'cuda'): torch.library.opcheck(op, args)\n"
            "        kc.check_enhance_reproducible('cuda')\n"
            "        kc.check_cuda_graph('cuda')\n"
            "print('ALL OK')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert "ALL OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
