"""What the C++/CUDA extension is built from and with: its sources, compiler flags, build hash, and
the CUDA toolkit it compiles against.

Standard library only: ``setup.py`` loads this file by its path (the package, and maybe torch, are
not importable yet), and the just-in-time build in ``native.py`` imports it; both therefore compile
the same sources with the same flags and stamp the same build hash.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
from typing import List, Optional

# -fno-trapping-math: FP exceptions never trap in torch, and without it GCC will not if-convert the
# kernels' guarded divisions and selects for AVX2 (AVX-512 masks them): the C++ ASL ran as branchy
# scalar code on AVX2 machines, 9x slower. Each operation's result is unchanged (unlike -ffast-math);
# loops that now vectorize may add in another order (last-bit changes).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "--use_fast_math"]
LINK_FLAGS = ["-fopenmp"]
# Wheels (setup.py) are built for both. The just-in-time build leaves the targets to torch
# (TORCH_CUDA_ARCH_LIST, else the card at hand; sm_80 and sm_90 without a GPU): one target on a GPU
# machine, where naming both here made it two (torch adds none when the flags name one) and the
# build on an H200 outlasted a 95 s cap.
NVCC_ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
DEFAULT_ARCH_LIST = "8.0;9.0"
CUDA_DEFINE = "-DCSSFE_WITH_CUDA"


def cpu_sources(csrc: str) -> List[str]:
    """The sources of every build: the operators' registration and device-independent kernels
    (``csrc/*.cpp``) and the CPU kernels (``csrc/cpu/*.cpp``)."""
    return sorted(glob.glob(os.path.join(csrc, "*.cpp"))) + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))


def cuda_sources(csrc: str) -> List[str]:
    return sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))


SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")  # what the build reads, hashes and a wheel ships


def build_hash(csrc: str) -> Optional[str]:
    """Hash of every source under ``csrc`` and of the compiler flags above (None when the sources
    are not shipped). A build stamped with another hash is stale: edited sources or changed flags."""
    files = sorted(glob.glob(os.path.join(csrc, "**", "*.*"), recursive=True))
    files = [f for f in files if f.endswith(SOURCE_SUFFIXES)]
    if not files:
        return None
    h = hashlib.sha1()
    for f in files:
        h.update(os.path.relpath(f, csrc).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    h.update("\0".join(CXX_FLAGS + NVCC_FLAGS + LINK_FLAGS).encode())
    return "h" + h.hexdigest()[:16]


def hash_define(csrc: str) -> str:
    # unquoted: quotes do not survive ninja; csrc/ops.cpp stringifies it
    return f"-DCSSFE_BUILD_HASH={build_hash(csrc)}"


def extension_kind(env, have_torch: bool, have_cuda_sources: bool, cuda_toolkit: Optional[str],
                   torch_cuda: Optional[str]) -> Optional[str]:
    """What ``setup.py`` builds: None (no extension: ``CSSFE_NO_EXT=1``, or torch is not importable
    at build time), ``"cpu"`` (the C++ kernels) or ``"cuda"`` (plus the CUDA kernels: CUDA sources,
    a toolkit with its headers, a CUDA build of torch, and no ``CSSFE_NO_CUDA=1``)."""
    if env.get("CSSFE_NO_EXT") == "1" or not have_torch:
        return None
    if have_cuda_sources and cuda_toolkit is not None and torch_cuda is not None and env.get("CSSFE_NO_CUDA") != "1":
        return "cuda"
    return "cpu"


def cuda_home() -> Optional[str]:
    """The CUDA toolkit root (the folder whose include/ holds cuda_runtime.h), or None.

    The ``nvcc`` on PATH may be a wrapper script, so torch's guess can be wrong: check the headers.
    """
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        cands.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper like `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(real, "r", errors="ignore") as fh:
                text = fh.read(4096)
            for tok in text.split():
                if tok.endswith("/bin/nvcc"):
                    cands.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    cands += ["/usr/local/cuda"]
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(c, "bin", "nvcc")
        ):
            return c
    return None


def cuda_include_dir(torch_dir: str) -> Optional[str]:
    """The CUDA headers pip's nvidia wheels install beside torch (ATen's CUDAContext includes
    cusparse.h, which a bare toolkit may lack), or None."""
    inc = os.path.join(os.path.dirname(torch_dir), "nvidia", "cu13", "include")
    return inc if os.path.isdir(inc) else None
