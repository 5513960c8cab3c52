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
import re
import shutil
from typing import List, Optional, Tuple

# -fno-trapping-math: FP exceptions never trap in torch, and without it GCC will not if-convert the
# kernels' guarded divisions and selects for AVX2 (AVX-512 masks them): the C++ ASL ran as branchy
# scalar code on AVX2 machines, 9x slower. Each operation's result is unchanged (unlike -ffast-math);
# loops that now vectorize may add in another order (last-bit changes).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "--use_fast_math"]
LINK_FLAGS = ["-fopenmp"]
# The GPU code of a CUDA build, as a TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX": machine code for each
# capability, and "+PTX" also the portable code that the driver compiles for later GPUs). Wheels
# (setup.py) carry sm_80 and sm_90 machine code and sm_90 PTX, so a newer card runs them too. The
# just-in-time build targets the cards at hand (native.jit_arch_list: their capabilities, PTX for
# the newest; sm_80 and sm_90 without a GPU), and its cache folder is keyed by that list: a build for
# one card is not loaded on another that it has no code for.
WHEEL_ARCH_LIST = "8.0;9.0+PTX"
DEFAULT_ARCH_LIST = WHEEL_ARCH_LIST
CUDA_DEFINE = "-DCSSFE_WITH_CUDA"


def parse_arch_list(arch_list: str) -> List[Tuple[int, int, str, bool]]:
    """(major, minor, suffix, ptx) per entry of a TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "9.0a";
    ";" or spaces between entries); torch's family names ("Ampere") are not read here."""
    entries = []
    for item in arch_list.replace(";", " ").split():
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", item.strip())
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot read {item!r} in {arch_list!r}; write capabilities "
                             "like 8.0;9.0+PTX")
        entries.append((int(m.group(1)), int(m.group(2)), m.group(3), m.group(4) is not None))
    if not entries:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST: no capability in {arch_list!r}")
    return entries


def arch_names(arch_list: str) -> List[str]:
    """The code a build for this list carries: sm_XY (machine code) and compute_XY (PTX) names."""
    names = []
    for major, minor, suffix, ptx in parse_arch_list(arch_list):
        cc = f"{major}{minor}{suffix}"
        names += [f"sm_{cc}"] + ([f"compute_{cc}"] if ptx else [])
    return names


def gencode_flags(arch_list: str) -> List[str]:
    flags = []
    for major, minor, suffix, ptx in parse_arch_list(arch_list):
        cc = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


NVCC_ARCH_FLAGS = gencode_flags(WHEEL_ARCH_LIST)


def arch_define(arch_list: str) -> str:
    """The define that stamps the build with its GPU code (``cssfe._C.cuda_archs``, csrc/ops.cpp):
    the names joined by "-" (no quotes, commas or spaces, which do not survive ninja)."""
    return "-DCSSFE_CUDA_ARCHS=" + "-".join(arch_names(arch_list))


def runs_on(cuda_archs: str, capability: Tuple[int, int]) -> bool:
    """Whether a build stamped with ``cuda_archs`` ("sm_80-sm_90-compute_90") has code for a GPU of
    this compute capability: machine code of the same major version and a minor one at most the
    device's (sm_XYa only on X.Y itself), or PTX of a capability at most the device's."""
    cap = tuple(capability)
    for name in filter(None, (cuda_archs or "").split("-")):
        m = re.fullmatch(r"(sm|compute)_(\d+?)(\d)([af]?)", name)
        if m is None:
            continue
        kind, arch, suffix = m.group(1), (int(m.group(2)), int(m.group(3))), m.group(4)
        if suffix:
            if arch == cap:
                return True
        elif kind == "sm" and arch[0] == cap[0] and arch[1] <= cap[1]:
            return True
        elif kind == "compute" and arch <= cap:
            return True
    return False


def arch_list_for(capabilities: List[Tuple[int, int]], newest_supported: Optional[Tuple[int, int]] = None) -> str:
    """TORCH_CUDA_ARCH_LIST for these cards: each capability once (clamped to the newest that this
    torch supports, as torch does, since its nvcc may not know a later one), PTX for the newest."""
    caps = sorted({min(tuple(c), newest_supported) if newest_supported else tuple(c) for c in capabilities})
    if not caps:
        return DEFAULT_ARCH_LIST
    items = [f"{major}.{minor}" for major, minor in caps]
    items[-1] += "+PTX"
    return ";".join(items)


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
