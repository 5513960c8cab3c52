"""The extension's build identity: the hash covers the sources and the compiler flags, and a build
stamped with another hash is not used."""
import os
import shutil
import sys
import types

import pytest

import cssfe
from cssfe.ops.backends import build_spec, native


@pytest.fixture
def csrc_copy(tmp_path):
    dst = tmp_path / "csrc"
    shutil.copytree(native.CSRC, dst)
    return str(dst)


def test_hash_is_stable_and_matches_the_package_sources(csrc_copy):
    assert build_spec.build_hash(csrc_copy) == build_spec.build_hash(csrc_copy) == native.build_hash()
    assert build_spec.hash_define(csrc_copy) == f"-DCSSFE_BUILD_HASH={native.build_hash()}"


def test_hash_changes_with_a_source(csrc_copy):
    before = build_spec.build_hash(csrc_copy)
    with open(os.path.join(csrc_copy, "cpu", "asl.cpp"), "a") as fh:
        fh.write("\n// edited\n")
    assert build_spec.build_hash(csrc_copy) != before


@pytest.mark.parametrize("flags", ["CXX_FLAGS", "NVCC_FLAGS", "LINK_FLAGS"])
def test_hash_changes_with_the_compiler_flags(csrc_copy, monkeypatch, flags):
    before = build_spec.build_hash(csrc_copy)
    monkeypatch.setattr(build_spec, flags, getattr(build_spec, flags) + ["-DCSSFE_SOME_FLAG"])
    after = build_spec.build_hash(csrc_copy)
    assert after != before
    # the just-in-time build's folder and module name follow the hash: a cached build with the old
    # flags is not picked up
    assert native.jit_target(after)[2] != native.jit_target(before)[2]


def test_no_sources_no_hash(tmp_path):
    assert build_spec.build_hash(str(tmp_path)) is None


def test_a_prebuilt_extension_with_another_hash_is_not_used(monkeypatch):
    stale = types.ModuleType("cssfe._C")
    stale.build_hash = "h0000000000000000"
    monkeypatch.setitem(sys.modules, "cssfe._C", stale)
    monkeypatch.setattr(cssfe, "_C", stale, raising=False)  # set once the real one was imported
    with pytest.warns(UserWarning, match="other csrc/ sources or compiler flags"):
        mod, reason = native._try_prebuilt(native.build_hash())
    assert mod is None and "stale" in reason
    stale.build_hash = native.build_hash()
    mod, reason = native._try_prebuilt(native.build_hash())
    assert mod is stale


def test_wheel_ships_the_sources_for_the_just_in_time_build(tmp_path):
    """A built package (pip install . / a wheel) without a prebuilt cssfe._C still has the sources the
    cpu backend builds from: the wheel carries csrc/ as cssfe/_csrc, with the checkout's build hash."""
    import subprocess
    import zipfile

    root = os.path.dirname(os.path.dirname(cssfe.__file__))
    project = tmp_path / "project"
    project.mkdir()
    for name in ("setup.py", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(root, name), project / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "_csrc", "*.egg-info")
    shutil.copytree(os.path.join(root, "cssfe"), project / "cssfe", ignore=skip)
    shutil.copytree(os.path.join(root, "csrc"), project / "csrc")
    env = dict(os.environ, CSSFE_NO_EXT="1")  # the Python package only: no compiler needed here
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(project), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, env=env, cwd=tmp_path, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("cssfe-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = [n for n in zf.namelist() if n.startswith("cssfe/_csrc/")]
        zf.extractall(tmp_path / "installed")
    assert "cssfe/_csrc/ops.cpp" in shipped and "cssfe/_csrc/cuda/enhance.cu" in shipped
    assert all(n.endswith(build_spec.SOURCE_SUFFIXES) for n in shipped)
    code = "from cssfe.ops.backends import native; print(native.CSRC); print(native.build_hash())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(tmp_path / "installed")),
                         cwd=tmp_path, capture_output=True, text=True, check=True, timeout=120).stdout.split()
    assert out == [str(tmp_path / "installed" / "cssfe" / "_csrc"), native.build_hash()]


@pytest.mark.parametrize("env, have_torch, cuda_sources, toolkit, torch_cuda, want", [
    ({}, True, True, "/opt/cuda", "12.8", "cuda"),             # nvcc + CUDA torch: both kernels
    ({"CSSFE_NO_CUDA": "1"}, True, True, "/opt/cuda", "12.8", "cpu"),
    ({}, True, True, None, "12.8", "cpu"),                      # no toolkit (no nvcc / headers)
    ({}, True, True, "/opt/cuda", None, "cpu"),                 # CPU-only torch
    ({}, True, False, "/opt/cuda", "12.8", "cpu"),              # sources without csrc/cuda
    ({"CSSFE_NO_EXT": "1"}, True, True, "/opt/cuda", "12.8", None),
    ({}, False, True, "/opt/cuda", "12.8", None),               # isolated build without torch
])
def test_setup_builds_the_cpu_kernels_and_the_cuda_ones_when_it_can(env, have_torch, cuda_sources, toolkit,
                                                                     torch_cuda, want):
    assert build_spec.extension_kind(env, have_torch, cuda_sources, toolkit, torch_cuda) == want
