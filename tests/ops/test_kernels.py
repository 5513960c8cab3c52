"""Every in-process backend (reference, cpu) against float64 autograd ground truth: forward and every
gradient, awkward shapes, fp32 everywhere and half precision on a subset. Outputs are poisoned
(NaN-filled allocations) so unwritten elements fail. Triton: test_triton.py; CUDA: test_cuda.py."""
import pytest
import torch
from kernel_cases import (
    ASL_SCALE_SIZES,
    ASL_SCALES,
    ASL_SHAPES,
    ASL_VARIANTS,
    ATTENTION_SHAPES,
    ENHANCE_SHAPES,
    MUTATION_CASES,
    MUTATIONS,
    check_asl,
    check_asl_nan,
    check_asl_scale,
    check_attention,
    check_enhance,
    mutated,
)

import cssfe.ops as ops
from cssfe.ops.backends import native_ops

HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(params=["reference", "cpu"])
def backend(request):
    if request.param == "cpu":
        request.getfixturevalue("native_backend")
    return request.param


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_class_attention_fp32(backend, shape, poison):
    check_attention(backend, shape, torch.float32, batched_q=shape[0] == 3 and shape[1] == 7)


@pytest.mark.parametrize("dtype", HALF + [torch.float64])
def test_class_attention_other_dtypes(backend, dtype, poison):
    check_attention(backend, (3, 20, 64, 49), dtype, batched_q=True, seed=1)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", MUTATION_CASES, ids=lambda c: c[0])
def test_half_precision_checks_reject_wrong_gradients(backend, dtype, case):
    """The half-precision checks can fail: each output and each gradient of each op, negated, zeroed
    or doubled after the backend computed it (a backward with a sign error, a forgotten input, a
    factor of 2), must fail its check, naming it. (The bound of fp16 at 2e-2 and bf16 at 6e-2 times
    sqrt(C*N) that these checks replaced let -dq, a zero dk and 2*dv pass in bf16.)"""
    op, check, names, kwargs = case
    for name in names:
        for mutation in MUTATIONS:
            with pytest.raises(AssertionError, match=rf" {name}\b"):
                check(backend, dtype=dtype, mutate=mutated(name, mutation), **kwargs)
    check(backend, dtype=dtype, **kwargs)  # and the same case passes unmutated


@pytest.mark.parametrize("gemm", ["blas", "aten"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_class_attention_gemm_paths_and_thread_splits(native_backend, monkeypatch, poison, gemm, threads, dtype):
    """The C++ kernel with its direct BLAS calls and with ATen's GEMMs (the path of a torch whose BLAS
    symbols are not visible), images split over 1-3 threads: 5 images over 2 or 3 threads leave
    uneven runs, and shared queries then sum one dQ partial per run."""
    if gemm == "aten":
        monkeypatch.setenv("CSSFE_CPU_GEMM", "aten")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_attention("cpu", (5, 7, 64, 197), dtype, batched_q=False, seed=threads)
        check_attention("cpu", (5, 20, 96, 49), dtype, batched_q=True, seed=threads + 1)
        check_attention("cpu", (1, 3, 8, 5), dtype, batched_q=False, seed=threads + 2)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("gemm", ["blas", "aten"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("mask", [True, False])
def test_cpu_progressive_enhance_gemm_paths_and_thread_splits(native_backend, monkeypatch, poison, gemm, threads, mask):
    """The C++ enhancement's stage GEMMs with direct BLAS calls and through ATen, 5 images over 1-3
    threads, with and without the mask (without it, the stages also read later groups' z)."""
    if gemm == "aten":
        monkeypatch.setenv("CSSFE_CPU_GEMM", "aten")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_enhance("cpu", (5, 20, 49), torch.float32, mask=mask, seed=threads)
        check_enhance("cpu", (5, 7, 3), torch.float64, mask=mask, seed=threads + 1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("batched_q", [False, True])
def test_cpu_class_attention_empty_batch(native_backend, poison, batched_q):
    """No images: empty outputs, and zero gradients shaped like the inputs (dQ [1, C, d] for shared
    queries, as autograd expects)."""
    q = torch.randn(0 if batched_q else 1, 4, 8)
    k, v = torch.randn(0, 8, 5), torch.randn(0, 8, 5)
    z, lse = torch.ops.cssfe.native_attention_fwd(q, k, v)
    assert z.shape == (0, 4, 8) and lse.shape == (0, 4)
    dq, dk, dv = torch.ops.cssfe.native_attention_bwd(torch.randn(0, 4, 8), q, k, v, z, lse)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert torch.equal(dq, torch.zeros_like(q))


@pytest.mark.parametrize("shape", ENHANCE_SHAPES)
@pytest.mark.parametrize("mask", [True, False])
def test_progressive_enhance_fp32(backend, shape, mask, poison):
    check_enhance(backend, shape, torch.float32, mask=mask)


@pytest.mark.parametrize("dtype", HALF + [torch.float64])
def test_progressive_enhance_other_dtypes(backend, dtype, poison):
    check_enhance(backend, (3, 20, 49), dtype, seed=2)


# The staged strategy is ATen operators only (csrc/enhance_staged.cpp): on CPU these run the code the
# cuda backend runs from native_ops.STAGED_MIN_CLASSES classes on, where its products go to cuBLAS.
@pytest.mark.parametrize("shape", ENHANCE_SHAPES + [(2, 300, 13)])
@pytest.mark.parametrize("mask", [True, False])
def test_native_enhance_staged_fp32(native_backend, poison, shape, mask):
    with native_ops.native_enhance_strategy("staged"):
        check_enhance("cpu", shape, torch.float32, mask=mask)


@pytest.mark.parametrize("dtype", HALF + [torch.float64])
def test_native_enhance_staged_other_dtypes(native_backend, poison, dtype):
    with native_ops.native_enhance_strategy("staged"):
        check_enhance("cpu", (3, 20, 49), dtype, seed=2)


@pytest.mark.parametrize("strategy,gemm", [("block", "blas"), ("block", "aten"), ("staged", "aten")])
def test_native_kernels_keep_their_precision_under_cpu_autocast(native_backend, monkeypatch, poison, strategy, gemm):
    """The caller's autocast does not reach inside the native operators: the staged enhancement's
    first product would run in bf16 (and, on a GPU, its next one fail on mixed dtypes), so fp32
    inputs must still match the float64 reference to fp32 accuracy, forward and backward."""
    if gemm == "aten":
        monkeypatch.setenv("CSSFE_CPU_GEMM", "aten")
    with native_ops.native_enhance_strategy(strategy), torch.autocast("cpu", dtype=torch.bfloat16):
        check_enhance("cpu", (3, 20, 33), torch.float32, seed=6)
        check_attention("cpu", (2, 7, 64, 49), torch.float32, seed=6)


@pytest.mark.parametrize("strategy", native_ops.NATIVE_ENHANCE_STRATEGIES)
@pytest.mark.parametrize("groups", [[2, 2, 2, 2, 2], [0, 0, 0], [0, 2, 0, 2, 2, 0, 2], [1, 1, 0, 1, 0]],
                         ids=["tail-only", "head-only", "no-medium", "no-tail"])
@pytest.mark.parametrize("mask", [True, False])
def test_native_enhance_with_empty_stages(native_backend, poison, strategy, groups, mask):
    with native_ops.native_enhance_strategy(strategy):
        check_enhance("cpu", (3, len(groups), 11), torch.float32, mask=mask, groups=groups)


class _NativeSpy:
    """torch.ops.cssfe, recording which native operators are called."""

    def __init__(self):
        self.calls, self.last_args = [], []

    def __getattr__(self, name):
        op = getattr(torch.ops.cssfe, name)

        def call(*args):
            self.calls.append(name)
            self.last_args.append(args[-1])
            return op(*args)
        return call


@pytest.mark.parametrize("strategy", [None, "block", "staged"])
def test_native_enhance_strategy_reaches_both_directions(native_backend, monkeypatch, strategy):
    spy = _NativeSpy()
    monkeypatch.setattr(native_ops, "_ops", lambda: spy)
    z = torch.randn(2, 5, 3, requires_grad=True)
    groups = torch.tensor([0, 1, 2, 1, 0])
    run = lambda: ops.progressive_enhance(z, torch.rand(5, 5), groups, torch.rand(2, 5), 0.5,  # noqa: E731
                                          backend="cpu").sum().backward()
    if strategy is None:
        run()
    else:
        with native_ops.native_enhance_strategy(strategy):
            run()
    prefix = "native_enhance_staged" if strategy == "staged" else "native_enhance"
    assert spy.calls == [prefix + "_fwd", prefix + "_bwd"]


def test_native_enhance_strategy_choice():
    assert native_ops.native_enhance_strategy_for("cpu", 10_000) == "block"  # the CPU kernel scales with C
    threshold = native_ops.STAGED_MIN_CLASSES["cuda"]
    assert native_ops.native_enhance_strategy_for("cuda", threshold - 1) == "block"
    assert native_ops.native_enhance_strategy_for("cuda", threshold) == "staged"
    with native_ops.native_enhance_strategy("block"):
        assert native_ops.native_enhance_strategy_for("cuda", 10_000) == "block"
    assert native_ops.native_enhance_strategy_for("cuda", 10_000) == "staged"  # restored after the block
    with pytest.raises(ValueError, match="unknown native strategy 'gemm'"):
        native_ops.native_enhance_strategy("gemm")


def _enhance_inputs(c=9, b=2, length=5, mask=True, seed=0):
    torch.manual_seed(seed)
    groups = torch.tensor([0, 1, 2] * (c // 3) + [2] * (c % 3))
    r = ops.semantic_affinity(torch.randn(c, 8), groups, mask=mask, tau=0.2)
    return torch.randn(b, c, length), r, groups, torch.rand(b, c), torch.tensor(0.7)


def _stages_without_later_sources(r, groups) -> int:
    """The stage flags read from R's values: bit g set when no row of group g has a nonzero source in
    its own group or a later one (what the kernels may skip)."""
    later = [bool(((r[groups == g] != 0) & (groups >= g)[None, :]).any()) for g in range(3)]
    return sum(1 << g for g in range(3) if not later[g])


@pytest.mark.parametrize("groups", [[0, 1, 2, 1, 0, 2], [2, 2, 2], [0, 0, 0], [0, 2, 0, 2], [1, 1, 0, 1, 0], [0, 1, 2],
                                    [0, 0, 1, 2], [2, 0], [1]])
@pytest.mark.parametrize("mask", [True, False])
def test_enhance_plan_marks_exactly_the_stages_the_affinity_leaves_empty(groups, mask):
    """The plan the head passes says from the mask alone what the affinity's values say."""
    groups = torch.tensor(groups)
    r = ops.semantic_affinity(torch.randn(len(groups), 8), groups, mask=mask, tau=0.2)
    plan = ops.enhance_plan(groups, mask)
    assert plan.earlier_only == _stages_without_later_sources(r, groups), (groups.tolist(), mask)
    assert plan.order.tolist() == torch.sort(groups, stable=True).indices.tolist()
    assert list(plan.bounds) == [0] + torch.cumsum(torch.bincount(groups, minlength=3), 0).tolist()
    assert ops.enhance_plan(groups).earlier_only == 0  # structure unknown: nothing marked


@pytest.mark.parametrize("strategy", native_ops.NATIVE_ENHANCE_STRATEGIES)
def test_enhance_stage_flags_reach_forward_and_backward(native_backend, monkeypatch, strategy):
    """The plan's flags reach both directions from the first call; a call without a plan marks none."""
    spy = _NativeSpy()
    monkeypatch.setattr(native_ops, "_ops", lambda: spy)
    z, r, groups, gate, lam = _enhance_inputs()
    z.requires_grad_()
    plan = ops.enhance_plan(groups, mask=True)
    with native_ops.native_enhance_strategy(strategy):
        for _ in range(2):
            ops.progressive_enhance(z, r, groups, gate, lam, plan=plan, backend="cpu").sum().backward()
        ops.progressive_enhance(z, r, groups, gate, lam, backend="cpu").sum().backward()
    assert spy.last_args == [0b111, 0b111, 0b111, 0b111, 0, 0]  # fwd, bwd per call


def test_enhance_rejects_a_plan_that_cannot_fit(native_backend):
    z, r, groups, gate, lam = _enhance_inputs()
    plan = ops.enhance_plan(groups, mask=True)
    bad = {
        "plan must be a cssfe.ops.EnhancePlan": tuple(plan),
        r"plan.order must be an int64 tensor \[C\] with C=9": plan._replace(order=plan.order[:4]),
        "plan.bounds must be 4 ints rising from 0 to C=9": plan._replace(bounds=(0, 3, 2, 9)),
        r"plan.earlier_only must be an int in \[0, 7\]": plan._replace(earlier_only=8),
    }
    for message, wrong in bad.items():
        with pytest.raises((TypeError, ValueError), match=message):
            ops.progressive_enhance(z, r, groups, gate, lam, plan=wrong, backend="cpu")


@pytest.mark.parametrize("strategy", native_ops.NATIVE_ENHANCE_STRATEGIES)
def test_native_enhance_honours_earlier_only(native_backend, strategy):
    """The flags are used, not just passed: forced on a dense affinity they drop its own- and
    later-group sources (a different result); on the masked one they change nothing."""
    prefix = "native_enhance_staged" if strategy == "staged" else "native_enhance"
    fwd, bwd = getattr(torch.ops.cssfe, prefix + "_fwd"), getattr(torch.ops.cssfe, prefix + "_bwd")
    for mask in (True, False):
        z, r, groups, gate, lam = _enhance_inputs(mask=mask)
        order, bounds, _ = ops.enhance_plan(groups)
        bounds = torch.tensor(bounds)
        w = (lam * gate).contiguous()
        grad = torch.randn_like(z)
        runs = []
        for flags in (0, 0b111):
            out = fwd(z, r, order, bounds, w, flags)
            runs.append((out,) + tuple(bwd(grad, z, r, order, bounds, w, out, flags)))
        same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*runs))
        assert same == mask, f"{strategy} mask={mask}"


@pytest.mark.parametrize("shape", ASL_SHAPES)
@pytest.mark.parametrize("variant", range(len(ASL_VARIANTS)))
def test_asymmetric_loss_fp32(backend, shape, variant, poison):
    check_asl(backend, shape, torch.float32, **ASL_VARIANTS[variant])


@pytest.mark.parametrize("dtype", HALF + [torch.float64])
def test_asymmetric_loss_other_dtypes(backend, dtype, poison):
    check_asl(backend, (37, 20), dtype, seed=3)


@pytest.mark.parametrize("variant", range(len(ASL_VARIANTS)))
def test_asymmetric_loss_fp64(backend, variant, poison):
    check_asl(backend, (5, 80), torch.float64, **ASL_VARIANTS[variant], seed=variant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
def test_asl_nan_logit(backend, dtype, soft):
    check_asl_nan(backend, dtype, soft)


def test_asl_large_parallel(backend):
    """Big enough for the OpenMP path (> 16k elements)."""
    check_asl(backend, (256, 100), torch.float32, seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_asl_soft_targets_in_some_blocks(backend, dtype, poison):
    """Soft targets from the middle of a large input on: blocks of 0/1 targets and blocks of soft
    ones (the C++ kernel vectorizes the former and goes element by element in the latter)."""
    check_asl(backend, (61, 100), dtype, target_dtype=dtype, soft_from=3000, gammas=(1.0, 4.0), seed=5)


@pytest.mark.parametrize("dtype", HALF + [torch.float32, torch.float64])
@pytest.mark.parametrize("size", ASL_SCALE_SIZES)
def test_cpu_asl_scales_its_gradient_in_place(native_backend, dtype, size):
    for i, scale in enumerate(ASL_SCALES):
        check_asl_scale("cpu", *size, dtype, scale, seed=i)


def _asl_graph(backend):
    torch.manual_seed(0)
    x = (torch.randn(9, 13) * 3).requires_grad_()
    y = torch.rand(9, 13) < 0.3
    return x, ops.asymmetric_loss(x, y, backend=backend)


def test_asl_backward_twice_only_on_the_reference(backend):
    """A fused backend's backward scales the forward's saved gradient in place, so a second pass
    through the same graph must fail clearly instead of returning a gradient scaled twice."""
    x, loss = _asl_graph(backend)
    (g1,) = torch.autograd.grad(loss * 2.0, x, retain_graph=True)
    if backend == "reference":
        (g2,) = torch.autograd.grad(loss * 2.0, x)
        assert torch.equal(g1, g2)
    else:
        with pytest.raises(RuntimeError, match="backpropagated only once.*backend='reference'"):
            torch.autograd.grad(loss * 2.0, x)


def test_asl_backward_with_create_graph(backend):
    """With create_graph the gradient stays a function of the incoming one (no in-place scaling)."""
    x, loss = _asl_graph(backend)
    x_ref, loss_ref = _asl_graph("reference")
    s = torch.tensor(0.75, requires_grad=True)
    (g,) = torch.autograd.grad(loss * s, x, create_graph=True)
    (ds,) = torch.autograd.grad(g.square().sum(), s)
    (g_unit,) = torch.autograd.grad(loss_ref, x_ref)
    assert torch.allclose(g, 0.75 * g_unit, rtol=1e-4, atol=1e-5)
    assert torch.allclose(ds, 2 * 0.75 * g_unit.square().sum(), rtol=1e-4)


@pytest.mark.parametrize("rows", [(16, 8), (13, 5), (300, 123)])
def test_cpu_asl_gradient_does_not_depend_on_the_batch_split(native_backend, rows):
    """The C++ ASL gives each element the same gradient whether its row is scored in one batch or in
    a data-parallel shard: its vector body and scalar remainder agree bit for bit. (Eager PyTorch's
    vectorized elementwise kernels do not promise this: the reference fails the 300-row case.)"""
    backend = "cpu"

    b, first = rows
    torch.manual_seed(b)
    x = torch.randn(b, 20) * 4
    y = (torch.rand(b, 20) < 0.3).float()

    def grad(xs, ys):
        xs = xs.clone().requires_grad_()
        (g,) = torch.autograd.grad(ops.asymmetric_loss(xs, ys, backend=backend) * 2.0, xs)
        return g

    whole = grad(x, y)
    split = torch.cat([grad(x[:first], y[:first]), grad(x[first:], y[first:])])
    assert torch.equal(whole, split)
