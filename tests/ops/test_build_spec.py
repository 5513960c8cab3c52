"""The extension's build identity: the hash covers the sources and the compiler flags, and a build
stamped with another hash is not used; a CUDA build is keyed by the GPU code it carries, and one
without code for the GPU at hand is neither used nor reported available (capabilities mocked)."""
import os
import shutil
import sys
import types

import pytest
import torch

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


# ------------------------------------------------------------------------- GPU code of a CUDA build
def test_arch_lists_name_the_code_a_build_carries():
    assert build_spec.arch_names("8.0;9.0+PTX") == ["sm_80", "sm_90", "compute_90"]
    assert build_spec.arch_names("9.0a 10.0") == ["sm_90a", "sm_100"]
    assert build_spec.gencode_flags("8.0;9.0+PTX") == build_spec.NVCC_ARCH_FLAGS == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]  # wheels: PTX of the newest, for later cards
    assert build_spec.arch_define("8.0;9.0+PTX") == "-DCSSFE_CUDA_ARCHS=sm_80-sm_90-compute_90"
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST: cannot read 'Ampere'"):
        build_spec.arch_names("Ampere")


@pytest.mark.parametrize("archs, capability, runs", [
    ("sm_80-sm_90-compute_90", (8, 0), True),
    ("sm_80-sm_90-compute_90", (8, 6), True),    # sm_80 machine code runs on later 8.x cards
    ("sm_80-sm_90-compute_90", (10, 0), True),   # through the PTX
    ("sm_80-sm_90-compute_90", (7, 5), False),
    ("sm_80-sm_90", (10, 0), False),             # no PTX: "no kernel image" on a newer card
    ("sm_90-compute_90", (8, 0), False),         # a build for an H100 found by an A100
    ("sm_90a", (9, 0), True),
    ("sm_90a", (10, 0), False),
    ("", (9, 0), False),                          # nothing recorded
])
def test_a_build_runs_where_it_has_code_for_the_capability(archs, capability, runs):
    assert build_spec.runs_on(archs, capability) is runs


def test_arch_list_for_the_cards_at_hand():
    assert build_spec.arch_list_for([(9, 0)]) == "9.0+PTX"
    assert build_spec.arch_list_for([(9, 0), (8, 0), (9, 0)]) == "8.0;9.0+PTX"
    assert build_spec.arch_list_for([(12, 0)], newest_supported=(10, 0)) == "10.0+PTX"  # as torch clamps


@pytest.fixture
def gpu(monkeypatch):
    """A machine whose one GPU has the capability set in the returned dict (no GPU is touched)."""
    card = {"capability": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: card["capability"])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90", "sm_100"])
    monkeypatch.setattr(build_spec, "cuda_home", lambda: "/opt/cuda")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    return card


def test_the_just_in_time_build_is_keyed_by_the_cards_capability(gpu, monkeypatch):
    want = native.build_hash()
    names = {}
    for cap in ((9, 0), (8, 0)):
        gpu["capability"] = cap
        with_cuda, names[cap], folder = native.jit_target(want)
        assert with_cuda and os.path.basename(folder) == names[cap]
    assert names[(9, 0)].endswith("_cuda_sm_90_compute_90") and names[(8, 0)].endswith("_cuda_sm_80_compute_80")
    assert native.cuda_build_env()["TORCH_CUDA_ARCH_LIST"] == "8.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # the user's list wins, and keys the build too
    assert native.jit_target(want)[1].endswith("_cuda_sm_80_sm_90")


def _cuda_build(archs):
    mod = types.ModuleType("cssfe._C")
    mod.build_hash, mod.with_cuda, mod.cuda_archs = native.build_hash(), True, archs
    return mod


@pytest.mark.parametrize("capability, available", [((9, 0), True), ((8, 6), True), ((10, 0), False), ((7, 5), False)])
def test_available_backends_asks_whether_the_loaded_build_runs_on_this_gpu(gpu, monkeypatch, capability, available):
    import cssfe.ops as ops

    gpu["capability"] = capability
    monkeypatch.setitem(native._state, "result", (_cuda_build("sm_80-sm_90"), "prebuilt cssfe._C"))
    ok, reason = ops.available_backends()["cuda"]
    assert ok is available
    if not available:
        assert f"compute capability {capability[0]}.{capability[1]}" in reason and "sm_80, sm_90" in reason


def test_a_prebuilt_extension_without_code_for_this_gpu_is_not_used(gpu, monkeypatch):
    gpu["capability"] = (8, 0)
    build = _cuda_build("sm_90-compute_90")
    monkeypatch.setitem(sys.modules, "cssfe._C", build)
    monkeypatch.setattr(cssfe, "_C", build, raising=False)
    with pytest.warns(UserWarning, match="does not run on this GPU"):
        mod, reason = native._try_prebuilt(native.build_hash())
    assert mod is None and "compute capability 8.0" in reason
    gpu["capability"] = (9, 0)
    assert native._try_prebuilt(native.build_hash())[0] is build
