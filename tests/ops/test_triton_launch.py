"""Every Triton kernel of the package launches under its tensors' device (cssfe/ops/backends/triton/_common.launch).

Triton launches on the current device and its current stream, so without the guard tensors on
cuda:1 while cuda:0 is current are read on the wrong device. No GPU is needed here: the host
functions run on fake tensors placed on cuda:1, with launches recorded instead of run; each launch
must find the guard entered for cuda:1. (tests/ops/test_triton.py runs them on a second GPU where
there is one.)"""
import contextlib
import importlib
import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the kernels are interpreter functions under TRITON_INTERPRET=1", allow_module_level=True)

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from cssfe.ops.backends.triton import _common, attention, attention_gemm  # noqa: E402

MODULES = [importlib.import_module(f"cssfe.ops.backends.triton.{name}") for name in ("asl", "attention", "attention_gemm",
                                                                             "enhance")]
DEVICE = torch.device("cuda", 1)


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, device of the innermost torch.cuda.device block or None, its tensors' devices)
    per launch; nothing runs."""
    active, recorded = [], []

    @contextlib.contextmanager
    def device(d):
        active.append(torch.device(d))
        try:
            yield
        finally:
            active.pop()

    def run(self, *args, grid, warmup, **kwargs):
        devices = {a.device for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)}
        recorded.append((self.fn.__name__, active[-1] if active else None, devices))

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", run)
    return recorded


def _run_every_host_function():
    """Each op's forward and backward host function on cuda:1 tensors (fake: shapes only)."""
    asl, enhance = importlib.import_module("cssfe.ops.backends.triton.asl"), importlib.import_module("cssfe.ops.backends.triton.enhance")
    b, c, d, n, length = 2, 6, 16, 9, 5
    order = torch.tensor([0, 3, 1, 4, 2, 5])
    bounds = (0, 2, 4, 6)  # read with int() by the host code: values, which fake tensors do not hold
    with FakeTensorMode(allow_non_fake_inputs=True):
        cuda = dict(device=DEVICE)
        q, k, v = torch.randn(1, c, d, **cuda), torch.randn(b, d, n, **cuda), torch.randn(b, d, n, **cuda)
        for strategy in attention.STRATEGIES:
            with attention.strategy(strategy):
                z, lse = attention.attention_fwd(q, k, v)
                attention.attention_bwd(torch.randn_like(z), q, k, v, z, lse)
        z, r, w = torch.randn(b, c, length, **cuda), torch.rand(c, c, **cuda), torch.rand(b, c, **cuda)
        out = enhance.enhance_fwd(z, r, order, bounds, w)
        enhance.enhance_bwd(torch.randn_like(z), z, r, order, bounds, w, out)
        x = torch.randn(b, c, **cuda)
        _, grad = asl.asl(x, torch.rand(b, c, **cuda) > 0.5, 0.0, 4.0, 0.05, 1e-8, False, False, True)
        asl.asl_scale_grad_(grad, torch.tensor(2.0, **cuda))


def _launched_kernels():
    """The package's kernels that the host code launches: every @triton.jit function that no other
    kernel calls (the rest are device helpers)."""
    jitted = {name: obj for mod in MODULES for name, obj in vars(mod).items()
              if isinstance(obj, triton.runtime.jit.JITFunction)}
    called = {name for name in jitted for other_name, other in jitted.items()
              if other_name != name and re.search(rf"\b{name}\(", other.src)}
    return set(jitted) - called


def test_every_triton_launch_runs_under_its_tensors_device(launches):
    _run_every_host_function()
    assert {name for name, _, _ in launches} == _launched_kernels()
    for name, guard, devices in launches:
        assert devices == {DEVICE}, f"{name}: tensors on {devices}"
        assert guard == DEVICE, f"{name} launched under {guard}, not under its tensors' device {DEVICE}"
    assert attention_gemm.launch is _common.launch  # the one helper, not a copy


def test_launch_refuses_tensors_on_two_devices():
    with pytest.raises(ValueError, match=r"one device, got \['cpu', 'meta'\]"):
        _common.launch_device([torch.empty(1), 3, torch.empty(1, device="meta")])
