"""Shared cases for the kernel tests: float64 ground truth (autograd through cssfe.ops.reference and
cssfe.losses.AsymmetricLoss), awkward shapes, tolerances per dtype. Used in-process for the
reference and cpu backends and, in a TRITON_INTERPRET=1 subprocess, for triton."""
import math

import torch

import cssfe.ops as ops
from cssfe.losses import AsymmetricLoss
from cssfe.ops import library, reference

GROUPS = torch.tensor([2, 0, 1, 2, 0, 1, 1, 2, 0, 2, 1, 0, 2, 1, 0, 2, 2, 1, 0, 1])  # 20 classes

# (B, C, d, N): awkward sizes, subsampled from C in {1,7,20,80}, N in {1,49,196,197}, d in {8,64,96}, B in {1,3}.
ATTENTION_SHAPES = [(1, 1, 8, 1), (3, 7, 64, 49), (1, 20, 96, 197), (3, 80, 8, 196), (3, 20, 64, 1)]
# (B, C, L)
ENHANCE_SHAPES = [(1, 1, 8), (3, 7, 49), (3, 20, 197), (1, 80, 96)]
# (B, C)
ASL_SHAPES = [(1, 1), (3, 7), (37, 20), (5, 80)]

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 6e-2), torch.float64: (1e-7, 1e-7)}


DEVICE = "cpu"  # triton_cases.py sets "cuda" on a GPU


def enhance_args(dtype=torch.float32, device="cpu"):
    """(z, affinity, groups, gate, lam) of the enhancement over GROUPS, all differentiable."""
    c = len(GROUPS)
    z = torch.randn(2, c, 5, dtype=dtype, device=device, requires_grad=True)
    r = ops.semantic_affinity(torch.randn(c, 8), GROUPS).to(device).requires_grad_()
    gate = torch.rand(2, c, dtype=dtype, device=device, requires_grad=True)
    lam = torch.tensor(0.9, device=device, requires_grad=True)
    return z, r, GROUPS.to(device), gate, lam


def opcheck_samples(backend, device="cpu"):
    """(registered operator, args) covering every cssfe operator, forward and backward, for
    torch.library.opcheck: shared and batched q, half-precision logits with uint8 targets."""
    q, k, v = (torch.randn(*s, device=device) for s in ((1, 7, 16), (3, 16, 9), (3, 16, 9)))
    z, lse = library.class_attention_op(q, k, v, backend)
    e = enhance_args(device=device)
    out = library.progressive_enhance_op(*[t.detach() for t in e[:2]], e[2], e[3].detach(), e[4].detach(), backend)
    x, y = torch.randn(5, 7, device=device, requires_grad=True), torch.rand(5, 7, device=device) > 0.5
    return [
        (library.asymmetric_loss_op, (x, y, 0.0, 4.0, 0.05, 1e-8, False, False, True, backend)),
        (library.asymmetric_loss_op, (x.detach().half(), y.to(torch.uint8), 1.0, 2.0, 0.0, 1e-8, True, True, False, backend)),
        (library.class_attention_op, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), backend)),
        (library.class_attention_op, (torch.randn(3, 7, 16, device=device, requires_grad=True), k, v, backend)),
        (library.class_attention_backward_op, (torch.randn_like(z), q.detach(), k.detach(), v.detach(), z.detach(), lse,
                                               backend)),
        (library.progressive_enhance_op, (*e, backend)),
        (library.progressive_enhance_backward_op, (torch.randn_like(out), *[t.detach() for t in e], out, backend)),
    ]


def tol_dtype(backend, dtype):
    """The fused backends compute in fp32 (accumulation included), even for fp64 inputs."""
    return torch.float32 if dtype == torch.float64 and backend != "reference" else dtype


def close(got, want, dtype, what, scale=1.0):
    rtol, atol = TOL[dtype]
    got = got.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten output?)"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    bound = atol * scale + rtol * want.abs().max().item() if want.numel() else 0.0
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def groups_for(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GROUPS[torch.randint(len(GROUPS), (c,), generator=g)] if c > len(GROUPS) else GROUPS[:c].clone()


# ------------------------------------------------------------------------- class attention
def check_attention(backend, shape, dtype, batched_q=False, seed=0):
    torch.manual_seed(seed)
    b, c, d, n = shape
    q64 = torch.randn(b, c, d, dtype=torch.float64) if batched_q else torch.randn(c, d, dtype=torch.float64)
    k64 = torch.randn(b, d, n, dtype=torch.float64)
    v64 = torch.randn(b, d, n, dtype=torch.float64)
    gz = torch.randn(b, c, d, dtype=torch.float64)
    # ground truth on the rounded inputs
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    z_ref = reference.class_attention(qr, kr, vr)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(z_ref, (qr, kr, vr), gz)
    qd, kd, vd = (t.detach().to(DEVICE).requires_grad_() for t in (q, k, v))
    z = ops.class_attention(qd, kd, vd, backend=backend)
    assert z.dtype == dtype
    dq, dk, dv = torch.autograd.grad(z, (qd, kd, vd), gz.to(dtype).to(DEVICE))
    dtype = tol_dtype(backend, dtype)
    close(z, z_ref, dtype, f"{backend} class_attention z {shape} {dtype}")
    scale = math.sqrt(c * n)
    close(dq, dq_ref, dtype, f"{backend} class_attention dq", scale)
    close(dk, dk_ref, dtype, f"{backend} class_attention dk", scale)
    close(dv, dv_ref, dtype, f"{backend} class_attention dv", scale)


# ------------------------------------------------------------------------- progressive enhance
def check_enhance(backend, shape, dtype, mask=True, seed=0, groups=None):
    torch.manual_seed(seed)
    b, c, length = shape
    groups = groups_for(c, seed) if groups is None else torch.as_tensor(groups)
    z64 = torch.randn(b, c, length, dtype=torch.float64)
    with torch.autocast("cpu", enabled=False):  # the inputs in full precision, also under the caller's autocast
        r = reference.semantic_affinity(torch.randn(c, 8), groups, mask=mask, tau=0.2)
    gate64 = torch.rand(b, c, dtype=torch.float64)
    lam64 = torch.tensor(0.8, dtype=torch.float64)
    gout = torch.randn(b, c, length, dtype=torch.float64)
    z, gate = z64.to(dtype).requires_grad_(), gate64.to(dtype).requires_grad_()
    aff = r.clone().requires_grad_()
    lam = torch.tensor(0.8, dtype=torch.float32, requires_grad=True)
    zr, gr, ar = z.detach().double().requires_grad_(), gate.detach().double().requires_grad_(), r.double().requires_grad_()
    lr = lam64.clone().requires_grad_()
    out_ref = reference.progressive_enhance(zr, ar, groups, gr, lr)
    want = torch.autograd.grad(out_ref, (zr, ar, gr, lr), gout)
    # The same affinity and groups tensors twice: the second call runs with each stage's sources
    # known from the first (library._earlier_only), as the model's fixed affinity does in training.
    aff_leaf, groups_dev = aff.detach().to(DEVICE).requires_grad_(), groups.to(DEVICE)
    tol = tol_dtype(backend, dtype)
    scale = math.sqrt(b * length * c)
    for call in range(2):
        leaves = [t.detach().to(DEVICE).requires_grad_() for t in (z, gate, lam)]
        leaves.insert(1, aff_leaf)
        out = ops.progressive_enhance(leaves[0], aff_leaf, groups_dev, leaves[2], leaves[3], backend=backend)
        assert out.dtype == dtype
        got = torch.autograd.grad(out, leaves, gout.to(dtype).to(DEVICE))
        what = f"{backend} progressive_enhance {shape} {dtype} call {call + 1}"
        close(out, out_ref, tol, f"{what} out")
        for name, g, w in zip(("dz", "daffinity", "dgate", "dlam"), got, want):
            close(g, w, tol if name == "dz" else (torch.float32 if tol == torch.float64 else tol), f"{what} {name}", scale)
    if mask and backend != "reference":  # the second call had the mask's flags: no stage has later sources
        order, bounds = library._enhance_plan(groups_dev)
        assert library._earlier_only(aff_leaf, groups_dev, order, bounds, forward=False) == 0b111


# ------------------------------------------------------------------------- ASL
def _at_offset(t, offset):
    """A copy of t that starts ``offset`` elements into its buffer (contiguous, but not aligned for
    the kernels' vector loads)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


def check_asl(backend, shape, dtype, target_dtype=torch.bool, reduction="sum", focal_grad=False,
              gammas=(0.0, 4.0), clip=0.05, soft_from=None, offset=0, seed=0):
    """soft_from: flat index from which targets are soft (in (0, 1)); the elements before stay 0/1,
    so kernels with a binary fast path are checked on both sides of the switch. offset: logits and
    targets are views that start that many elements into their buffers."""
    torch.manual_seed(seed)
    b, c = shape
    x64 = torch.randn(b, c, dtype=torch.float64) * 4
    inf = float("inf")  # saturated sigmoids, then infinite logits with a 1 and a 0 target each
    edge = torch.tensor([30.0, -30.0, 0.0, inf, -inf, inf, -inf], dtype=torch.float64)[: x64.numel()]
    x64.view(-1)[: len(edge)] = edge
    y = (torch.rand(b, c) > 0.7).double()
    y.view(-1)[3:7] = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)[: max(0, y.numel() - 3)]
    if soft_from is not None:
        y.view(-1)[soft_from:] = torch.rand(y.numel() - min(soft_from, y.numel()), dtype=torch.float64)
    else:
        y = y.bool()
    targets = y.to(target_dtype)
    x = x64.to(dtype).requires_grad_()
    xr = x.detach().double().requires_grad_()
    gp, gn = gammas
    ref = AsymmetricLoss(gamma_neg=gn, gamma_pos=gp, clip=clip, eps=1e-8,
                         disable_torch_grad_focal_loss=not focal_grad, reduction=reduction)
    loss_ref = ref(xr, targets.double())
    (g_ref,) = torch.autograd.grad(loss_ref, xr)
    x, targets = x.detach().to(DEVICE), targets.to(DEVICE)
    if offset:
        x, targets = _at_offset(x, offset), _at_offset(targets, offset)
        assert x.storage_offset() == targets.storage_offset() == offset
    x.requires_grad_()
    loss = ops.asymmetric_loss(x, targets, gamma_pos=gp, gamma_neg=gn, clip=clip,
                               disable_torch_grad_focal_loss=not focal_grad, reduction=reduction, backend=backend)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.dim() == 0
    (g,) = torch.autograd.grad(loss * 1.5, x)
    assert g.dtype == dtype
    n = b * c
    dtype = tol_dtype(backend, dtype)
    close(loss, loss_ref, torch.float32 if dtype == torch.float64 else dtype,
          f"{backend} asl loss {shape} {dtype}", math.sqrt(n))
    close(g, 1.5 * g_ref, dtype, f"{backend} asl grad {shape} {dtype}")
    # the loss as the last op: an incoming gradient of exactly 1 (which fused backends skip on the device)
    loss1 = ops.asymmetric_loss(x, targets, gamma_pos=gp, gamma_neg=gn, clip=clip,
                                disable_torch_grad_focal_loss=not focal_grad, reduction=reduction, backend=backend)
    (g1,) = torch.autograd.grad(loss1, x)
    close(g1, g_ref, dtype, f"{backend} asl grad (incoming 1) {shape} {dtype}")
    # evaluation mode: no gradient requested, same value
    with torch.no_grad():
        loss2 = ops.asymmetric_loss(x, targets, gamma_pos=gp, gamma_neg=gn, clip=clip,
                                    disable_torch_grad_focal_loss=not focal_grad, reduction=reduction, backend=backend)
    close(loss2, loss_ref, torch.float32 if dtype == torch.float64 else dtype, f"{backend} asl no-grad loss", math.sqrt(n))


def check_asl_nan(backend, dtype=torch.float32, soft=False, seed=0):
    """NaN logits make the loss NaN and keep NaN gradients, as in the reference: NaNs with 1 targets
    only, then with 0 targets only (a NaN elsewhere must not hide a finite sum), with and without the
    focusing weight and its gradient (the default parameters' kernels and the run-time ones); the
    other gradients stay finite. soft: float targets, 0.5 beside each NaN (the same CUDA pack) and
    as a third case, so the per-element form runs instead of the binary one."""
    torch.manual_seed(seed)
    x = torch.randn(4, 40, dtype=torch.float64)
    y0 = (torch.rand(4, 40) > 0.5).float()
    x[1, 3] = x[2, 7] = float("nan")
    nan = torch.isnan(x)
    if soft:
        y0[1, 2] = y0[2, 6] = 0.5
    for target in (1.0, 0.0) + ((0.5,) if soft else ()):
        y = y0.clone()
        y[nan] = target
        for gammas in ((0.0, 4.0), (0.0, 0.0)):
            for focal_grad in (False, True):
                xd = x.to(dtype).to(DEVICE).requires_grad_()
                loss = ops.asymmetric_loss(xd, (y if soft else y.bool()).to(DEVICE), gamma_pos=gammas[0],
                                           gamma_neg=gammas[1], disable_torch_grad_focal_loss=not focal_grad,
                                           backend=backend)
                (g,) = torch.autograd.grad(loss, xd)
                g = g.cpu()
                what = f"{backend} asl NaN logits, target {target}, {dtype} gammas={gammas} focal_grad={focal_grad}"
                assert torch.isnan(loss).item(), f"{what}: loss {loss.item()}"
                assert torch.isnan(g[nan]).all(), f"{what}: gradient {g[nan].tolist()} where the logit is NaN"
                assert torch.isfinite(g[~nan]).all(), f"{what}: non-finite gradient elsewhere"


def check_asl_scale(backend, n, offset, dtype, scale, seed=0):
    """The ASL backward's in-place scaling (library._asl_scale_grad_) of n elements starting
    ``offset`` elements into their buffer (an unaligned start takes the CUDA kernel's scalar loop),
    against float64; a scale of exactly 1 must leave every bit as it was, and the elements around
    the view must stay untouched."""
    from cssfe.ops import library

    torch.manual_seed(seed)
    base = (torch.randn(offset + n + 5, dtype=torch.float64) * 3).to(dtype).to(DEVICE)
    grad = base[offset:offset + n]
    before = base.clone()
    s = torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    library._asl_scale_grad_(grad, s, backend)
    what = f"{backend} asl scale x{scale} n={n} offset={offset} {dtype}"
    if scale == 1.0:
        assert torch.equal(grad, before[offset:offset + n]), f"{what}: changed the gradient"
    else:
        close(grad, before[offset:offset + n].double().cpu() * s.item(), tol_dtype(backend, dtype), what)
    outside = torch.ones(base.numel(), dtype=torch.bool, device=DEVICE)
    outside[offset:offset + n] = False
    assert torch.equal(base[outside], before[outside]), f"{what}: wrote outside the gradient"


ASL_SCALES = [1.0, 1.5, -0.25, 0.0, 1.0 / 3.0]
ASL_SCALE_SIZES = [(1, 0), (7, 1), (4099, 0), (4099, 3)]

ASL_VARIANTS = [
    dict(),
    dict(target_dtype=torch.uint8, reduction="mean"),
    dict(target_dtype=torch.float32, focal_grad=True),
    dict(gammas=(1.0, 2.0), clip=0.0),
    dict(gammas=(0.0, 0.0)),
    dict(gammas=(1.0, 3.0), focal_grad=True),
    dict(gammas=(1.5, 2.5), target_dtype=torch.float32, soft_from=2, focal_grad=True),
    dict(gammas=(1.0, 4.0), target_dtype=torch.float32, soft_from=7, focal_grad=True),  # binary form + soft ones
    dict(target_dtype=torch.float32),  # what training runs: float 0/1 targets, the default parameters
    dict(target_dtype=torch.float32, soft_from=0),  # soft targets everywhere, the default parameters
    dict(target_dtype=torch.float32, offset=1),  # unaligned views: the kernels' scalar paths
    dict(target_dtype=torch.uint8, offset=3, reduction="mean"),
]


# ------------------------------------------------------------------------- GPU only
def check_enhance_reproducible(backend, shape=(8, 300, 1024), seed=0):
    """Forward and backward twice on the same inputs give the same bits (no atomics whose order
    changes from run to run): out, dz, and the gate, lambda and affinity gradients."""
    torch.manual_seed(seed)
    b, c, length = shape
    groups = groups_for(c, seed).to(DEVICE)
    with torch.autocast("cpu", enabled=False):
        r = reference.semantic_affinity(torch.randn(c, 8), groups.cpu(), mask=False, tau=0.2).to(DEVICE)
    z = torch.randn(b, c, length, device=DEVICE)
    gate, lam = torch.rand(b, c, device=DEVICE), torch.tensor(0.8, device=DEVICE)
    gout = torch.randn(b, c, length, device=DEVICE)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (z, r, gate, lam)]
        out = ops.progressive_enhance(leaves[0], leaves[1], groups, leaves[2], leaves[3], backend=backend)
        runs.append([out] + list(torch.autograd.grad(out, leaves, gout)))
    for name, first, second in zip(("out", "dz", "daffinity", "dgate", "dlam"), *runs):
        assert torch.equal(first, second), f"{backend} progressive_enhance {shape}: {name} differs between two runs"


def check_cuda_graph(backend, seed=0):
    """Class attention -> enhancement -> ASL, forward and backward, captured in a CUDA graph after
    warm-up (which also settles the enhancement's plan and stage flags, read back once), then
    replayed on new inputs copied into the captured ones: the same numbers as eager on those inputs."""
    torch.manual_seed(seed)
    dev = torch.device(DEVICE)
    b, c, d, n = 4, len(GROUPS), 64, 49
    groups = GROUPS.to(dev)
    with torch.autocast("cpu", enabled=False):
        r = ops.semantic_affinity(torch.randn(c, 8), GROUPS).to(dev)  # fixed, as the model's buffer
    q = torch.randn(c, d, device=dev, requires_grad=True)
    gate = torch.rand(b, c, device=dev, requires_grad=True)
    lam = torch.tensor(0.9, device=dev, requires_grad=True)
    k = torch.randn(b, d, n, device=dev, requires_grad=True)
    v = torch.randn(b, d, n, device=dev, requires_grad=True)
    y = (torch.rand(b, c, device=dev) > 0.7).float()
    leaves = (q, k, v, gate, lam)

    def step():
        z0 = ops.class_attention(q, k, v, backend=backend)
        z1 = ops.progressive_enhance(z0, r, groups, gate, lam, backend=backend)
        loss = ops.asymmetric_loss(z1.mean(-1), y, backend=backend)
        return (loss,) + torch.autograd.grad(loss, leaves)

    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in (k, v):
            t.copy_(torch.randn_like(t))
        y.copy_((torch.rand_like(y) > 0.5).float())
    graph.replay()
    torch.cuda.synchronize(dev)
    eager = step()
    for name, got, want in zip(("loss", "dq", "dk", "dv", "dgate", "dlam"), captured, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{backend} CUDA graph {name}: {m}")
    assert not torch.equal(captured[2], torch.zeros_like(captured[2])), f"{backend} CUDA graph: dk is all zero"


def check_other_device(backend, device="cuda:1"):
    """The checks above on tensors of another GPU than the current one: a kernel launched on the
    current device (or its stream) would read the wrong memory or race with the work queued for it."""
    global DEVICE
    old, DEVICE = DEVICE, device
    try:
        with torch.cuda.device(0):
            check_attention(backend, (3, 7, 64, 49), torch.float32, batched_q=True)
            check_attention(backend, (2, 7, 160, 49), torch.bfloat16)
            check_enhance(backend, (3, 20, 49), torch.float32)
            check_asl(backend, (37, 20), torch.float32, target_dtype=torch.float32)
            check_asl_scale(backend, 4099, 3, torch.float32, 1.5)
            assert torch.cuda.current_device() == 0
    finally:
        DEVICE = old
