"""Operator registration (opcheck, torch.compile), backend dispatch, and input errors."""
import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import GROUPS, enhance_args, opcheck_samples

import cssfe.ops as ops
from cssfe.ops.backends import native_ops
from cssfe.ops.backends.triton import ops as triton_ops

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck_every_op(backend, request):
    if backend == "cpu":
        request.getfixturevalue("native_backend")
    for op, args in opcheck_samples(backend):
        torch.library.opcheck(op, args)


def test_native_asl_scale_grad_has_a_fake_kernel(native_backend):
    """The eager ASL's backward calls native_asl_scale_grad_ directly, so compiled autograd traces it
    with fake tensors: it needs a fake (meta) kernel of its own; opcheck checks it against the CPU one."""
    grad = torch.randn(5, 7)
    torch.library.opcheck(torch.ops.cssfe.native_asl_scale_grad_, (grad, torch.tensor(1.5)))
    meta = torch.empty(5, 7, device="meta")
    torch.ops.cssfe.native_asl_scale_grad_(meta, torch.empty((), device="meta"))
    assert meta.shape == (5, 7)


def test_native_ops_are_registered(native_backend):
    for name in ("native_asl", "native_asl_scale_grad_", "native_attention_fwd", "native_attention_bwd",
                 "native_enhance_fwd", "native_enhance_bwd"):
        assert hasattr(torch.ops.cssfe, name)


@pytest.mark.parametrize("backend", ["reference", "cpu", None])
def test_torch_compile_traces_ops(backend, request):
    """fullgraph: each op is one opaque node with a fake implementation (aot_eager: no C++ codegen),
    also with the backend chosen at trace time (None: ``auto``); a second batch size recompiles
    with dynamic shapes."""
    if backend == "cpu":
        request.getfixturevalue("native_backend")

    def step(q, k, v, gate, lam, r, y):
        z0 = ops.class_attention(q, k, v, backend=backend)
        z1 = ops.progressive_enhance(z0, r, GROUPS, gate, lam, backend=backend)
        logits = z1.sum(-1)
        return ops.asymmetric_loss(logits, y, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    c = len(GROUPS)
    r = ops.semantic_affinity(torch.randn(c, 4), GROUPS)
    for b in (2, 3):
        q = torch.randn(c, 8, requires_grad=True)
        k, v = torch.randn(b, 8, 6, requires_grad=True), torch.randn(b, 8, 6)
        gate, lam = torch.rand(b, c), torch.tensor(1.0, requires_grad=True)
        y = torch.rand(b, c) > 0.5
        got = compiled(q, k, v, gate, lam, r, y)
        want = step(q, k, v, gate, lam, r, y)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        g1 = torch.autograd.grad(got, (q, k, lam))
        g2 = torch.autograd.grad(want, (q, k, lam))
        for a, b_ in zip(g1, g2):
            assert torch.allclose(a, b_, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- dispatch
def test_available_backends_shape():
    avail = ops.available_backends()
    assert set(avail) == {"reference", "cpu", "cuda", "triton"}
    assert avail["reference"][0] is True
    for ok, reason in avail.values():
        assert isinstance(ok, bool) and isinstance(reason, str) and reason
    if not torch.cuda.is_available():
        assert avail["cuda"][0] is False


def test_backend_selection_order(monkeypatch):
    monkeypatch.delenv("CSSFE_KERNEL_BACKEND", raising=False)
    assert ops.get_default_backend() == "auto"
    monkeypatch.setenv("CSSFE_KERNEL_BACKEND", "reference")
    assert ops.get_default_backend() == "reference"
    ops.set_default_backend("cpu")
    try:
        assert ops.get_default_backend() == "cpu"
        with ops.use_backend("triton"):
            assert ops.get_default_backend() == "triton"
        assert ops.get_default_backend() == "cpu"
    finally:
        ops.set_default_backend(None)
    assert ops.resolve("reference", torch.device("cpu"), "x") == "reference"
    assert ops.resolve("auto", torch.device("cpu"), "x") in ("cpu", "reference")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.set_default_backend("fast")
    # ``auto`` from a config (use_backend / set_default_backend) is no preference: the env var decides
    # (launch/train.py enters use_backend(cfg.kernels), whose default is auto)
    monkeypatch.setenv("CSSFE_KERNEL_BACKEND", "reference")
    with ops.use_backend("auto"):
        assert ops.get_default_backend() == "reference"
    with ops.use_backend("cpu"), ops.use_backend("auto"):
        assert ops.get_default_backend() == "cpu"
    ops.set_default_backend("auto")
    assert ops.get_default_backend() == "reference"
    monkeypatch.setenv("CSSFE_KERNEL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CSSFE_KERNEL_BACKEND"):
        ops.asymmetric_loss(torch.randn(2, 3), torch.zeros(2, 3))


def test_absent_backend_raises_instead_of_falling_back(monkeypatch):
    x, y = torch.randn(2, 3), torch.zeros(2, 3)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda'"):
            ops.asymmetric_loss(x, y, backend="cuda")
        if os.environ.get("TRITON_INTERPRET") != "1":
            with pytest.raises(RuntimeError, match="backend 'triton'"):
                ops.asymmetric_loss(x, y, backend="triton")
    with ops.use_backend("cuda"):
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match="cuda"):
                ops.class_attention(torch.randn(3, 4), torch.randn(1, 4, 5), torch.randn(1, 4, 5))


def test_cpu_backend_unavailable_is_an_error(monkeypatch):
    from cssfe.ops.backends import native

    monkeypatch.setattr(native, "_state", {"result": (None, "simulated: no compiler")})
    with pytest.raises(RuntimeError, match="simulated: no compiler"):
        ops.asymmetric_loss(torch.randn(2, 3), torch.zeros(2, 3), backend="cpu")
    assert ops.resolve("auto", torch.device("cpu"), "x") == "reference"


def test_env_var_selects_backend_in_fresh_process():
    code = ("import torch, cssfe.ops as o\n"
            "try:\n    o.asymmetric_loss(torch.randn(2,3), torch.zeros(2,3))\n"
            "except RuntimeError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, CSSFE_KERNEL_BACKEND="cuda")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if not torch.cuda.is_available():
        assert "ERR" in out.stdout and "backend 'cuda'" in out.stdout, out.stdout + out.stderr


# ------------------------------------------------------------------------- input errors
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_inputs_raise_clear_errors(backend, request):
    if backend == "cpu":
        request.getfixturevalue("native_backend")
    ca = lambda *a, **kw: ops.class_attention(*a, backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"k and v.*\(2, 8, 5\)"):
        ca(torch.randn(4, 8), torch.randn(2, 8, 5), torch.randn(2, 8, 6))
    with pytest.raises(ValueError, match=r"q must be.*\(4, 7\)"):
        ca(torch.randn(4, 7), torch.randn(2, 8, 5), torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match=r"q must be.*\(3, 4, 8\)"):
        ca(torch.randn(3, 4, 8), torch.randn(2, 8, 5), torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="N >= 1"):
        ca(torch.randn(4, 8), torch.randn(2, 8, 0), torch.randn(2, 8, 0))
    with pytest.raises(TypeError, match="share a dtype"):
        ca(torch.randn(4, 8).double(), torch.randn(2, 8, 5), torch.randn(2, 8, 5))
    with pytest.raises(TypeError, match="q must be"):
        ca(torch.ones(4, 8, dtype=torch.long), torch.randn(2, 8, 5), torch.randn(2, 8, 5))
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        ca(torch.randn(4, 8), [1, 2], torch.randn(2, 8, 5))

    pe = lambda *a: ops.progressive_enhance(*a, backend=backend)  # noqa: E731
    z, r, g, gate, lam = (t.detach() for t in enhance_args())
    with pytest.raises(ValueError, match=r"affinity \[C, C\]"):
        pe(z, r[:3], g, gate, lam)
    with pytest.raises(ValueError, match=r"groups must be \[C\]"):
        pe(z, r, g[:3], gate, lam)
    with pytest.raises(TypeError, match="groups must be an integer"):
        pe(z, r, g.float(), gate, lam)
    with pytest.raises(ValueError, match="groups must hold 0"):
        pe(z, r, g + 1, gate, lam)
    with pytest.raises(ValueError, match="lam must be a scalar"):
        pe(z, r, g, gate, torch.ones(2))
    with pytest.raises(ValueError, match=r"gate \[B, C\]"):
        pe(z, r, g, gate[:1], lam)

    asl = lambda *a, **kw: ops.asymmetric_loss(*a, backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"logits must be \[B, C\].*\(6,\)"):
        asl(torch.randn(6), torch.zeros(6))
    with pytest.raises(ValueError, match=r"targets shape \(2, 4\)"):
        asl(torch.randn(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="logits must be"):
        asl(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="targets must be"):
        asl(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="reduction"):
        asl(torch.randn(2, 3), torch.zeros(2, 3), reduction="none")
    with pytest.raises(ValueError, match="gammas"):
        asl(torch.randn(2, 3), torch.zeros(2, 3), gamma_neg=-1.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            asl(torch.randn(2, 3), torch.zeros(2, 3), gamma_pos=bad)
    # soft targets that require grad would silently get none: an error (detached ones, or no grad mode, run)
    soft = torch.rand(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="targets require grad.*detach them"):
        asl(torch.randn(2, 3, requires_grad=True), soft)
    asl(torch.randn(2, 3, requires_grad=True), soft.detach())
    with torch.no_grad():
        asl(torch.randn(2, 3), soft)

    # devices: one input elsewhere (meta: no data, any machine) is named; group values must be readable
    meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731
    q, k = torch.randn(4, 8), torch.randn(2, 8, 5)
    with pytest.raises(ValueError, match="one device.*v on meta"):
        ca(q, k, meta(k))
    with pytest.raises(ValueError, match="one device.*gate on meta"):
        pe(z, r, g, meta(gate), lam)
    with pytest.raises(ValueError, match="one device.*targets on meta"):
        asl(torch.randn(2, 3), meta(torch.zeros(2, 3)))
    with pytest.raises((ValueError, RuntimeError), match="groups must hold values|runs on CPU tensors"):
        pe(meta(z), meta(r), meta(g), meta(gate), meta(lam))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_non_contiguous_inputs_match_contiguous(backend, request):
    if backend == "cpu":
        request.getfixturevalue("native_backend")
    q = torch.randn(8, 5).t()  # [5, 8] non-contiguous
    k = torch.randn(2, 9, 8).transpose(1, 2)
    v = torch.randn(2, 9, 8).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous())
    assert torch.allclose(ops.class_attention(q, k, v, backend=backend),
                          ops.class_attention(q.contiguous(), k.contiguous(), v.contiguous(), backend=backend), atol=1e-6)
    x = torch.randn(7, 5).t()
    y = (torch.rand(7, 5) > 0.5).t()
    assert torch.allclose(ops.asymmetric_loss(x, y, backend=backend), ops.asymmetric_loss(x.contiguous(), y.contiguous(), backend=backend))
    z, r, g, gate, lam = (t.detach() for t in enhance_args())
    zt = z.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.allclose(ops.progressive_enhance(zt, r, g, gate, lam, backend=backend),
                          ops.progressive_enhance(z, r, g, gate, lam, backend=backend), atol=1e-6)


def test_head_callers_keep_working():
    """The call forms cssfe/models/heads.py uses, with grads through lam and a detached gate."""
    c = len(GROUPS)
    q, k, v = torch.randn(c, 8, requires_grad=True), torch.randn(2, 8, 6), torch.randn(2, 8, 6)
    z0 = ops.class_attention(q, k, v)
    z0b, maps = ops.class_attention(q, k, v, return_maps=True)
    assert torch.allclose(z0, z0b, atol=1e-6) and maps.shape == (2, c, 6)
    assert torch.allclose(maps.sum(-1), torch.ones(2, c), atol=1e-5)
    lam_raw = torch.tensor(0.5413, requires_grad=True)
    lam = torch.nn.functional.softplus(lam_raw)
    r = ops.semantic_affinity(torch.randn(c, 8), GROUPS, True, 0.1)
    gate = torch.rand(2, c)
    z1 = ops.progressive_enhance(z0, r, GROUPS, gate, lam)
    refined = ops.progressive_enhance(maps, r, GROUPS, gate, lam)
    (z1.sum() + refined.square().sum()).backward()
    assert lam_raw.grad is not None and torch.isfinite(lam_raw.grad) and q.grad is not None


@pytest.mark.parametrize("built", [True, False])
def test_auto_on_cpu_follows_measured_choice(monkeypatch, built):
    """Every op on the C++ kernels when the extension is built, else eager; fp64 stays eager."""
    from cssfe.ops import dispatch

    monkeypatch.setattr(native_ops, "native_status", lambda build: (built, "simulated", None))
    cpu, fused = torch.device("cpu"), "cpu" if built else "reference"
    assert dispatch.resolve("auto", cpu, "class_attention", torch.float32) == fused
    assert dispatch.resolve("auto", cpu, "class_attention", torch.bfloat16) == fused
    assert dispatch.resolve("auto", cpu, "asymmetric_loss", torch.float32) == fused
    assert dispatch.resolve("auto", cpu, "progressive_enhance", torch.float32) == fused
    assert dispatch.resolve("auto", cpu, "class_attention", torch.float64) == "reference"


@pytest.mark.parametrize("triton_ok, cuda_ok", [(True, True), (True, False), (False, True), (False, False)])
def test_auto_on_cuda_follows_measured_choice(monkeypatch, triton_ok, cuda_ok):
    """Every op: CUDA, then Triton, except class attention in fp32 (eager) and the enhancement above
    AUTO_MAX_CLASSES (Triton)."""
    from cssfe.ops import dispatch

    class Ext:
        with_cuda = cuda_ok

    monkeypatch.setattr(triton_ops, "status", lambda: (triton_ok, "simulated"))
    monkeypatch.setattr(native_ops, "native_status", lambda build: (True, "simulated", Ext()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU, simulated
    cuda = torch.device("cuda")
    second = "triton" if triton_ok else "reference"
    first = "cuda" if cuda_ok else second
    assert dispatch.resolve("auto", cuda, "class_attention", torch.bfloat16) == first
    assert dispatch.resolve("auto", cuda, "class_attention", torch.float16, classes=1000) == first
    assert dispatch.resolve("auto", cuda, "class_attention", torch.float32) == "reference"
    assert dispatch.resolve("auto", cuda, "asymmetric_loss", torch.float32) == first
    limit = dispatch.AUTO_MAX_CLASSES[("progressive_enhance", "cuda")]
    assert dispatch.resolve("auto", cuda, "progressive_enhance", torch.bfloat16, classes=limit) == first
    assert dispatch.resolve("auto", cuda, "progressive_enhance", torch.bfloat16, classes=limit + 1) == second
    assert dispatch.resolve("auto", cuda, "progressive_enhance", torch.float32, classes=limit + 1) == second
    assert dispatch.resolve("auto", cuda, "asymmetric_loss", torch.float64) == "reference"


def test_auto_on_cuda_reads_its_table(monkeypatch):
    """CUDA_AUTO is the whole CUDA choice: its order wins, an op or precision it leaves empty stays eager."""
    from cssfe.ops import dispatch

    class Ext:
        with_cuda = True

    assert set(dispatch.CUDA_AUTO) == {"class_attention", "progressive_enhance", "asymmetric_loss"}
    for per_precision in dispatch.CUDA_AUTO.values():
        assert set(per_precision) == {"half", "float32"}
        assert all(name in ("cuda", "triton") for order in per_precision.values() for name in order)
    monkeypatch.setattr(triton_ops, "status", lambda: (True, "simulated"))
    monkeypatch.setattr(native_ops, "native_status", lambda build: (True, "simulated", Ext()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU, simulated
    monkeypatch.setitem(dispatch.CUDA_AUTO, "asymmetric_loss", {"half": ("triton", "cuda"), "float32": ()})
    cuda = torch.device("cuda")
    assert dispatch.resolve("auto", cuda, "asymmetric_loss", torch.float16) == "triton"
    assert dispatch.resolve("auto", cuda, "asymmetric_loss", torch.float32) == "reference"
    assert dispatch.resolve("auto", cuda, "not_an_op", torch.float32) == "reference"
    # a class-count limit skips a backend above it, for that op only
    monkeypatch.setitem(dispatch.CUDA_AUTO, "progressive_enhance", {"half": ("cuda", "triton"), "float32": ("cuda",)})
    monkeypatch.setitem(dispatch.AUTO_MAX_CLASSES, ("progressive_enhance", "cuda"), 300)
    assert dispatch.resolve("auto", cuda, "progressive_enhance", torch.bfloat16, classes=300) == "cuda"
    assert dispatch.resolve("auto", cuda, "progressive_enhance", torch.bfloat16, classes=301) == "triton"
    assert dispatch.resolve("auto", cuda, "progressive_enhance", torch.float32, classes=301) == "reference"
    assert dispatch.resolve("auto", cuda, "progressive_enhance", torch.bfloat16) == "cuda"  # count unknown
    assert dispatch.resolve("cuda", cuda, "progressive_enhance", torch.bfloat16, classes=5000) == "cuda"  # named
    assert dispatch.resolve("auto", cuda, "asymmetric_loss", torch.float16, classes=5000) == "triton"
    for (op, backend), limit in dispatch.AUTO_MAX_CLASSES.items():
        assert op in dispatch.CUDA_AUTO and backend in ("cuda", "triton") and limit >= 1


def test_triton_flash_refuses_wide_fp32_features_and_wide_features_take_the_gemm_strategy():
    pytest.importorskip("triton")
    from cssfe.ops.backends.triton import attention

    if attention.INTERPRET:
        pytest.skip("the limit concerns on-chip memory, not the interpreter")
    assert attention.strategy_for(attention.FLASH_MAX_D) == "flash"
    assert attention.strategy_for(attention.FLASH_MAX_D + 1) == "gemm"
    attention.check_supported(768, torch.float32)  # the GEMM strategy has no width limit
    with attention.strategy("flash"):
        with pytest.raises(ValueError, match=r"d=768.*bfloat16"):
            attention.check_supported(768, torch.float32)
        attention.check_supported(512, torch.float32)
        attention.check_supported(768, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown triton strategy 'tiled'"):
        with attention.strategy("tiled"):
            pass


def test_eager_asl_path_matches_the_registered_operator():
    """Eager calls skip the Python custom-op layer (host time); the numbers and the gradient must be
    those of the registered operator, which torch.compile uses."""
    from cssfe.ops import library

    x = torch.randn(13, 7, dtype=torch.float64, requires_grad=True)
    y = torch.rand(13, 7) > 0.6
    args = (1.0, 3.0, 0.05, 1e-8, True, True, True, "reference")
    eager = ops.asymmetric_loss(x, y, gamma_pos=1.0, gamma_neg=3.0, disable_torch_grad_focal_loss=False,
                                reduction="mean", backend="reference")
    (g_eager,) = torch.autograd.grad(eager * 2.5, x)
    registered, _ = library.asymmetric_loss_op(x, y, *args)
    (g_op,) = torch.autograd.grad(registered * 2.5, x)
    assert torch.equal(eager, registered) and torch.equal(g_eager, g_op)
    with pytest.raises(RuntimeError, match="need_grad=False"):  # a loss computed without its gradient
        torch.autograd.grad(library.asymmetric_loss_op(x, y, *args[:-2], False, "reference")[0], x)


def test_eager_attention_path_matches_the_registered_operator():
    from cssfe.ops import library

    q = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)  # shared queries
    k = torch.randn(3, 16, 11, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 16, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, 16, dtype=torch.float64)
    z_eager = ops.class_attention(q, k, v, backend="reference")
    g_eager = torch.autograd.grad((z_eager * w).sum(), (q, k, v))
    z_op, _ = library.class_attention_op(q.unsqueeze(0), k, v, "reference")
    g_op = torch.autograd.grad((z_op * w).sum(), (q, k, v))
    assert torch.equal(z_eager, z_op)
    for a, b in zip(g_eager, g_op):
        assert torch.equal(a, b)


def test_eager_enhance_path_matches_the_registered_operator():
    from cssfe.ops import library

    c = len(GROUPS)
    z = torch.randn(2, c, 5, dtype=torch.float64, requires_grad=True)
    r = ops.semantic_affinity(torch.randn(c, 4, dtype=torch.float64), GROUPS).requires_grad_()
    gate = torch.rand(2, c, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, c, 5, dtype=torch.float64)
    out_eager = ops.progressive_enhance(z, r, GROUPS, gate, lam, backend="reference")
    g_eager = torch.autograd.grad((out_eager * w).sum(), (z, r, gate, lam))
    plan = ops.enhance_plan(GROUPS)
    out_op = library.progressive_enhance_op(z, r, GROUPS, gate, lam, plan.order, list(plan.bounds), 0, "reference")
    g_op = torch.autograd.grad((out_op * w).sum(), (z, r, gate, lam))
    assert torch.equal(out_eager, out_op)
    for a, b in zip(g_eager, g_op):
        assert torch.equal(a, b)


def test_enhance_plan_orders_the_classes_by_group_and_checks_their_values():
    groups = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    plan = ops.enhance_plan(groups)
    assert plan.order.tolist() == [1, 3, 6, 2, 5, 0, 4] and plan.bounds == (0, 3, 5, 7)
    for bad in ([0, 3, 1], [-1, 0, 2]):
        with pytest.raises(ValueError, match=r"groups must hold 0 \(head\), 1 \(medium\) or 2 \(tail\), got values in"):
            ops.enhance_plan(torch.tensor(bad))
        with pytest.raises(ValueError, match=r"groups must hold 0 \(head\), 1 \(medium\) or 2 \(tail\), got values in"):
            ops.progressive_enhance(torch.randn(1, 3, 2), torch.zeros(3, 3), torch.tensor(bad), torch.rand(1, 3), 1.0)
