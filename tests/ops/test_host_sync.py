"""The model + loss forward and backward read nothing back from the device (on CPU from the first
step: the head computes the enhancement's plan when it is built; after a move to a GPU, once): no
``.item()``, ``bool(t)``, data-dependent shape (``nonzero``...) or copy to the host, on every
backend that runs here (reference, cpu, and triton in its interpreter, in a subprocess). Such a
read makes the host wait for the device every step, and a CUDA graph (``compile_mode:
reduce-overhead``) cannot hold it. Also counts the ATen calls each op call makes around its kernels.

Run as a script (``python tests/ops/test_host_sync.py BACKEND``) it prints the check's result as
JSON: the triton case runs that way with TRITON_INTERPRET=1.
"""
import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

aten = torch.ops.aten
# Each returns a host value or a shape read from the device's data.
HOST_READS = {
    aten._local_scalar_dense.default,  # .item(), bool(t), int(t), float(t)
    aten.nonzero.default, aten.masked_select.default, aten.equal.default, aten.is_nonzero.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


class HostReadError(AssertionError):
    pass


class NoHostReads(TorchDispatchMode):
    """Fails on a read of a device value by the host; counts every ATen call.

    On CPU every tensor is a host tensor, so a copy to the host is seen where it is asked for: a
    ``_to_copy`` to device cpu, or ``Tensor.cpu()`` / ``tolist()`` / ``numpy()`` (which do not
    dispatch on a CPU tensor). Host-side tensors that the ops keep on purpose (the enhancement plan's
    group bounds, launch parameters) may be read; ``paused()`` covers the Triton interpreter's own
    emulation of a launch (the kernel itself)."""

    def __init__(self, host_tensors=()):
        super().__init__()
        self.host_storages = {t.untyped_storage().data_ptr() for t in host_tensors}
        self.calls = []
        self.reads = []
        self._paused = 0
        self._patches = contextlib.ExitStack()

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _fail(self, what):
        if not self._paused:
            self.reads.append(what)
            raise HostReadError(f"host read of a device value: {what}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused:
            self.calls.append(str(func.overloadpacket.__name__))
            if func in HOST_READS:
                first = args[0] if args else None
                on_host = isinstance(first, torch.Tensor) and first.untyped_storage().data_ptr() in self.host_storages
                if not (func is aten._local_scalar_dense.default and on_host):
                    self._fail(str(func))
            if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
                    isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
                self._fail(f"{func} with a boolean mask (its shape is read from the data)")
            if func is aten._to_copy.default and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu":
                self._fail("copy to the host (_to_copy to cpu)")
        return func(*args, **kwargs)

    def __enter__(self):
        for name in ("cpu", "tolist", "numpy"):
            real = getattr(torch.Tensor, name)

            def guarded(t, *a, _real=real, _name=name, **k):
                self._fail(f"Tensor.{_name}()")
                return _real(t, *a, **k)

            self._patches.enter_context(_patched(torch.Tensor, name, guarded))
        return super().__enter__()

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)


@contextlib.contextmanager
def _patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def _pause_in_triton_launches(mode):
    """The interpreter emulates the device on the host (numpy copies in and out): not our host reads."""
    if not os.environ.get("TRITON_INTERPRET") == "1":
        return contextlib.nullcontext()
    from triton.runtime.interpreter import GridExecutor

    real = GridExecutor.__call__

    def call(self, *args, **kwargs):
        with mode.paused(), torch.utils._python_dispatch._disable_current_modes():
            return real(self, *args, **kwargs)

    return _patched(GridExecutor, "__call__", call)


def _model_and_loss(learnable: bool, classes: int = 6):
    from cssfe.losses import build_loss
    from cssfe.models.backbones import build_backbone
    from cssfe.models.heads import HEADS
    from cssfe.models.model import MultiLabelClassifier

    torch.manual_seed(0)
    groups = np.repeat([0, 1, 2], [2, 2, classes - 4])
    embeddings = torch.nn.functional.normalize(torch.randn(classes, 12), dim=1)
    backbone = build_backbone("smallcnn")
    head = HEADS.build("cssfe", backbone.out_channels, classes, embeddings, groups, dim=16,
                       learnable_embeddings=learnable)
    model = MultiLabelClassifier(backbone, head).train()
    loss_fn = build_loss("asl", np.arange(1, classes + 1), 100, fused=True)
    return model, loss_fn


def _step(model, loss_fn, x, y):
    out = model(x)
    loss = loss_fn(out["logits"].float(), y) + 0.5 * loss_fn(out["logits0"].float(), y)
    loss.backward()
    return loss


def _host_tensors(*plans):
    """The plans' group bounds as the kernels read them: CPU tensors kept on purpose."""
    from cssfe.ops import library

    return [library._bounds_tensor(tuple(plan.bounds)) for plan in plans]


def check_step(backend: str, device: str = "cpu", warm_up: int = 2) -> dict:
    """``warm_up`` steps, then one step under NoHostReads, for the model's fixed affinity and for a
    learnable one. Returns the host reads seen and the ATen calls per step."""
    from cssfe import ops

    result = {}
    with ops.use_backend(backend):
        for learnable in (False, True):
            model, loss_fn = _model_and_loss(learnable)
            model = model.to(device)
            x, y = torch.randn(4, 3, 16, 16, device=device), torch.rand(4, 6, device=device) < 0.3
            for _ in range(warm_up):
                _step(model, loss_fn, x, y)
            mode = NoHostReads(_host_tensors(model.head.enhance_plan(True)))
            try:
                with _pause_in_triton_launches(mode), mode:
                    _step(model, loss_fn, x, y)
            except HostReadError:
                pass
            result["learnable" if learnable else "fixed"] = {"reads": mode.reads, "aten_calls": len(mode.calls)}
    return result


def op_call_counts(backend: str) -> dict:
    """ATen calls of one forward and one backward of each op alone, after warm-up, on CPU tensors
    (the inputs' gradients start at None: no accumulation into .grad is counted)."""
    from cssfe import ops

    torch.manual_seed(0)
    c, b, d, n = 6, 2, 8, 5
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    r = ops.semantic_affinity(torch.randn(c, 4), groups)
    logits, y = torch.randn(b, c, requires_grad=True), torch.rand(b, c) < 0.5
    q, k, v = (torch.randn(c, d, requires_grad=True), torch.randn(b, d, n, requires_grad=True),
               torch.randn(b, d, n, requires_grad=True))
    z, gate, lam = torch.randn(b, c, d, requires_grad=True), torch.rand(b, c), torch.tensor(1.0, requires_grad=True)
    plan = ops.enhance_plan(groups, mask=True)  # as the head passes it
    cases = {
        "asymmetric_loss": (lambda: ops.asymmetric_loss(logits, y, backend=backend), (logits,)),
        "class_attention": (lambda: ops.class_attention(q, k, v, backend=backend), (q, k, v)),
        "progressive_enhance": (lambda: ops.progressive_enhance(z, r, groups, gate, lam, plan=plan, backend=backend),
                                (z, lam)),
    }
    counts = {}
    for name, (call, inputs) in cases.items():
        for _ in range(2):
            call().sum().backward()
        for t in inputs:
            t.grad = None
        mode = NoHostReads(_host_tensors(plan))
        with _pause_in_triton_launches(mode), mode:
            out = call()
        forward = list(mode.calls)
        grad_out = torch.ones_like(out)
        mode.calls.clear()
        with _pause_in_triton_launches(mode), mode:
            out.backward(grad_out)
        counts[name] = {"forward": forward, "backward": list(mode.calls), "reads": mode.reads}
    return counts


# ------------------------------------------------------------------------------------------ tests
def _assert_no_reads(result):
    for case, rec in result.items():
        assert rec["reads"] == [], (case, rec["reads"])
        assert rec["aten_calls"] > 0, case  # the mode saw the step


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_training_step_reads_nothing_back_after_warm_up(backend, request):
    if backend == "cpu":
        request.getfixturevalue("native_backend")
    _assert_no_reads(check_step(backend))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_first_training_step_reads_nothing_back(backend, request):
    """No warm-up: the head's plan was computed when it was built, not found by the first steps."""
    if backend == "cpu":
        request.getfixturevalue("native_backend")
    _assert_no_reads(check_step(backend, warm_up=0))


def test_enhance_without_a_plan_reads_the_groups_back():
    """The documented cost of a direct call without a plan: the plan is computed from the group values."""
    from cssfe import ops

    groups = torch.tensor([0, 1, 2])
    args = (torch.randn(1, 3, 2), torch.zeros(3, 3), groups, torch.rand(1, 3), 1.0)
    with pytest.raises(HostReadError), NoHostReads():
        ops.progressive_enhance(*args, backend="reference")
    plan = ops.enhance_plan(groups)
    with NoHostReads(_host_tensors(plan)) as mode:
        ops.progressive_enhance(*args, plan=plan, backend="reference")
    assert mode.reads == []


def test_the_guard_sees_each_kind_of_host_read():
    """Every kind of read the test above must catch, caught (and a plain computation passes)."""
    t = torch.tensor([1.0, 0.0])
    for read in (lambda: t.sum().item(), lambda: bool(t[0]), lambda: t.nonzero(), lambda: t[t > 0],
                 lambda: t.tolist(), lambda: t.cpu(), lambda: t.numpy(), lambda: t.to("cpu", torch.float64),
                 lambda: float(t.max())):
        with pytest.raises(HostReadError), NoHostReads():
            read()
    bounds = torch.tensor([0, 2])  # a tensor the ops keep on the host on purpose
    with NoHostReads([bounds]) as mode:
        (t * 2).sum()
        int(bounds[1])
    assert mode.reads == [] and "mul" in mode.calls


# ATen calls per op call on the cpu backend, forward / backward: the kernel and what surrounds it
# (views, lam * gate, d lam's sum, autograd's detach of each saved output and of each input's new
# .grad). Where this grows, the host time per call grows with it.
CPU_OP_CALLS = {
    # native_asl / native_asl_scale_grad_, detach (no zeros for the unused gradient output's gradient)
    "asymmetric_loss": (1, 2),
    # unsqueeze, native_attention_fwd, detach / detach, native_attention_bwd, squeeze, 3 x detach (no zeros for lse)
    "class_attention": (3, 6),
    # view, mul (lam * gate), native_enhance_fwd, detach / detach, mul, native_enhance_bwd, mul, sum, view, 2 x detach, view
    "progressive_enhance": (4, 9),
}


def test_aten_calls_per_op_call_on_the_cpu_backend(native_backend):
    counts = op_call_counts("cpu")
    for name, (fwd, bwd) in CPU_OP_CALLS.items():
        rec = counts[name]
        assert rec["reads"] == [], (name, rec)
        assert any(c.startswith("native_") for c in rec["forward"]) and any(c.startswith("native_") for c in rec["backward"])
        assert len(rec["forward"]) <= fwd and len(rec["backward"]) <= bwd, (name, rec)


def test_triton_interpreter_step_reads_nothing_back_after_warm_up():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "triton"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    _assert_no_reads(result["step"])
    for name, rec in result["ops"].items():
        assert rec["reads"] == [], (name, rec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["reference", "cuda", "triton"])
def test_cuda_step_reads_nothing_back_after_warm_up_on_gpu(backend):
    """On a GPU every read of a device value is a real synchronisation (and breaks a CUDA graph)."""
    from cssfe import ops

    ok, reason = ops.backend_status(backend, build=backend == "cuda")
    if not ok:
        pytest.skip(reason)
    _assert_no_reads(check_step(backend, "cuda"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    backend = sys.argv[1]
    print(json.dumps({"step": check_step(backend), "ops": op_call_counts(backend)}))
