"""Shared cases for the kernel tests: float64 ground truth (autograd through cssfe.ops.reference and
cssfe.losses.AsymmetricLoss), awkward shapes, tolerances per dtype. Used in-process for the
reference and cpu backends and, in a TRITON_INTERPRET=1 subprocess, for triton.

Half precision (fp16, bf16) is held to the error half precision itself makes on each case: the
float64 ground truth is evaluated on the half-rounded inputs, the eager PyTorch op (cssfe.ops.reference,
cssfe.losses.AsymmetricLoss) is run in the half dtype on the same inputs, and every output and every
gradient of a backend may be at most HALF_FACTOR times as far from the truth as the eager op's, by
relative L2 norm and by largest element (close_half). Each check takes a ``mutate`` hook so the
suite can prove that a wrong gradient (negated, zeroed, doubled) fails it (test_kernels.py,
triton_cases.py)."""
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

TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-7, 1e-7)}  # fp32 and fp64: close()

HALF = (torch.float16, torch.bfloat16)
# Unit roundoff: rounding a value to the dtype moves it by at most this fraction of itself.
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# How much further from the float64 truth than the eager half-precision op a backend may land. The
# fused backends compute in fp32 and round once, so they land near the eager op's error or the floor
# of one rounding (UNIT_ROUNDOFF). Largest ratio measured over every half-precision case (max of the
# elementwise and the norm ratio): 1.58 on the reference and cpu backends, 2.66 in the Triton
# interpreter (asl bf16 gradient; triton_cases.py prints it). 4 leaves room above that and stays far
# below what a wrong gradient costs: negated (relative error 2), zeroed or doubled (1), against
# allowed relative errors of 4 x the eager op's (or 4 x 2^-8 = 1.6 % in bf16), a few percent at most.
HALF_FACTOR = 4.0


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
    plan = ops.enhance_plan(e[2], mask=True)
    p = (plan.order, list(plan.bounds), plan.earlier_only)
    out = library.progressive_enhance_op(*[t.detach() for t in e[:2]], e[2], e[3].detach(), e[4].detach(), *p, backend)
    x, y = torch.randn(5, 7, device=device, requires_grad=True), torch.rand(5, 7, device=device) > 0.5
    return [
        (library.asymmetric_loss_op, (x, y, 0.0, 4.0, 0.05, 1e-8, False, False, True, backend)),
        (library.asymmetric_loss_op, (x.detach().half(), y.to(torch.uint8), 1.0, 2.0, 0.0, 1e-8, True, True, False, backend)),
        (library.class_attention_op, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), backend)),
        (library.class_attention_op, (torch.randn(3, 7, 16, device=device, requires_grad=True), k, v, backend)),
        (library.class_attention_backward_op, (torch.randn_like(z), q.detach(), k.detach(), v.detach(), z.detach(), lse,
                                               backend)),
        (library.progressive_enhance_op, (*e, *p, backend)),
        (library.progressive_enhance_backward_op, (torch.randn_like(out), *[t.detach() for t in e], out, *p, backend)),
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


def close_half(got, want, eager, dtype, what, scale=0.0):
    """got (a backend) against want (float64 on the half-rounded inputs), bounded by eager (the plain
    PyTorch op in ``dtype`` on the same inputs): relative L2 error and largest elementwise error each
    at most HALF_FACTOR times the eager op's, or than one rounding to ``dtype`` where the eager op is
    exact. Bounds scale with the values, never with the problem size. scale: the magnitude of the
    terms a value is summed from, where it can be far below them: the rounding floor of a gradient
    that is zero in exact arithmetic (dq and dk over one position, where fp32 cancellation leaves a
    remainder; scale = the output's largest value), or of a sum whose terms cancel (dlam)."""
    got, eager = got.detach().double().cpu(), eager.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten output?)"
    if not want.numel():
        return
    finite = torch.isfinite(want)  # infinite logits have infinite losses; their gradients are finite
    assert torch.equal(finite, torch.isfinite(eager)), f"{what}: eager op not finite where the truth is"
    got, want, eager = got[finite], want[finite], eager[finite]
    u = UNIT_ROUNDOFF[dtype]
    err_max, eager_max = (got - want).abs().max().item(), (eager - want).abs().max().item()
    largest = want.abs().max().item()
    floor = u * max(largest, scale)
    bound_max = HALF_FACTOR * max(eager_max, floor)
    assert err_max <= bound_max, (f"{what}: largest error {err_max:.3g} > {bound_max:.3g} ({HALF_FACTOR:g} x max of "
                                  f"the eager {dtype} op's {eager_max:.3g} and one rounding)")
    norm = want.norm().item()
    if norm > 0:
        rel, eager_rel = (got - want).norm().item() / norm, (eager - want).norm().item() / norm
        bound_rel = HALF_FACTOR * max(eager_rel, floor / largest)
        assert rel <= bound_rel, (f"{what}: relative error {rel:.3g} > {bound_rel:.3g} ({HALF_FACTOR:g} x max of the "
                                  f"eager {dtype} op's {eager_rel:.3g} and one rounding)")
    if RECORD is not None:
        RECORD.append((what, err_max / max(eager_max, floor, 1e-300),
                       rel / max(eager_rel, floor / largest) if norm > 0 else 0.0))


RECORD = None  # a list to collect (what, max-error ratio, relative-error ratio) of every close_half


def _identity(name, t):
    return t


def groups_for(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GROUPS[torch.randint(len(GROUPS), (c,), generator=g)] if c > len(GROUPS) else GROUPS[:c].clone()


# ------------------------------------------------------------------------- class attention
def check_attention(backend, shape, dtype, batched_q=False, seed=0, mutate=_identity):
    """mutate(name, tensor): applied to the backend's z, dq, dk, dv before they are compared."""
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
    want = (z_ref,) + torch.autograd.grad(z_ref, (qr, kr, vr), gz)
    qd, kd, vd = (t.detach().to(DEVICE).requires_grad_() for t in (q, k, v))
    z = ops.class_attention(qd, kd, vd, backend=backend)
    assert z.dtype == dtype
    got = (z,) + torch.autograd.grad(z, (qd, kd, vd), gz.to(dtype).to(DEVICE))
    names = ("z", "dq", "dk", "dv")
    got = [mutate(name, g) for name, g in zip(names, got)]
    what = f"{backend} class_attention {shape} {dtype}"
    if dtype in HALF:  # the eager op in this dtype on the same inputs sets the bound
        z_eager = reference.class_attention(q, k, v)
        eager = (z_eager,) + torch.autograd.grad(z_eager, (q, k, v), gz.to(dtype))
        for name, g, w, e in zip(names, got, want, eager):
            close_half(g, w, e, dtype, f"{what} {name}", scale=z_ref.abs().max().item() if name in ("dq", "dk") else 0.0)
        return
    dtype = tol_dtype(backend, dtype)
    close(got[0], want[0], dtype, f"{what} z")
    scale = math.sqrt(c * n)
    for name, g, w in zip(names[1:], got[1:], want[1:]):
        close(g, w, dtype, f"{what} {name}", scale)


# ------------------------------------------------------------------------- progressive enhance
def check_enhance(backend, shape, dtype, mask=True, seed=0, groups=None, mutate=_identity):
    """mutate(name, tensor): applied to the backend's out, dz, daffinity, dgate, dlam before they are compared."""
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
    # Twice: without a plan (computed in the call, no stage marked: the kernels look at R), then with
    # the plan that the head passes (each stage's sources known from the mask).
    aff_leaf, groups_dev = aff.detach().to(DEVICE).requires_grad_(), groups.to(DEVICE)
    tol = tol_dtype(backend, dtype)
    scale = math.sqrt(b * length * c)
    names = ("out", "dz", "daffinity", "dgate", "dlam")
    if dtype in HALF:  # the eager op in this dtype on the same inputs (affinity and lam in fp32) sets the bound
        # dlam sums dw * gate over images and classes, terms that cancel: its floor is one rounding of each
        # (dgate = dw * lam)
        dlam_terms = (want[2] * gr.detach()).abs().sum().item() / lam64.item()
        eager_leaves = (z, aff, gate, lam)
        out_eager = reference.progressive_enhance(z, aff, groups, gate, lam)
        eager = (out_eager,) + torch.autograd.grad(out_eager, eager_leaves, gout.to(dtype))
    for call in range(2):
        leaves = [t.detach().to(DEVICE).requires_grad_() for t in (z, gate, lam)]
        leaves.insert(1, aff_leaf)
        plan = ops.enhance_plan(groups_dev, mask) if call else None
        out = ops.progressive_enhance(leaves[0], aff_leaf, groups_dev, leaves[2], leaves[3], plan=plan, backend=backend)
        assert out.dtype == dtype
        got = (out,) + torch.autograd.grad(out, leaves, gout.to(dtype).to(DEVICE))
        got = [mutate(name, g) for name, g in zip(names, got)]
        what = f"{backend} progressive_enhance {shape} {dtype} call {call + 1}"
        if dtype in HALF:
            for name, g, w, e in zip(names, got, (out_ref,) + want, eager):
                close_half(g, w, e, dtype, f"{what} {name}", scale=dlam_terms if name == "dlam" else 0.0)
            continue
        close(got[0], out_ref, tol, f"{what} out")
        for name, g, w in zip(names[1:], got[1:], want):
            close(g, w, tol if name == "dz" else (torch.float32 if tol == torch.float64 else tol), f"{what} {name}", scale)


# ------------------------------------------------------------------------- ASL
def _at_offset(t, offset):
    """A copy of t that starts ``offset`` elements into its buffer (contiguous, but not aligned for
    the kernels' vector loads)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


def check_asl(backend, shape, dtype, target_dtype=torch.bool, reduction="sum", focal_grad=False,
              gammas=(0.0, 4.0), clip=0.05, soft_from=None, offset=0, seed=0, mutate=_identity):
    """soft_from: flat index from which targets are soft (in (0, 1)); the elements before stay 0/1,
    so kernels with a binary fast path are checked on both sides of the switch. offset: logits and
    targets are views that start that many elements into their buffers. mutate(name, tensor):
    applied to the backend's every loss ("loss") and gradient ("grad") before they are compared."""
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
    if dtype in HALF:  # the eager loss on the half logits (computed in fp32, its gradient rounded back) sets the bound
        loss_eager = ref(x, targets.to(dtype))
        (g_eager,) = torch.autograd.grad(loss_eager, x, retain_graph=True)
        (g_eager_scaled,) = torch.autograd.grad(loss_eager * 1.5, x)
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
    what = f"{backend} asl {shape} {dtype}"
    if dtype in HALF:
        def compare(got, want, eager, name):
            close_half(mutate(name.split()[0], got), want, eager, dtype, f"{what} {name}")
    else:
        def compare(got, want, eager, name):
            tol = tol_dtype(backend, dtype)
            if name.startswith("loss"):
                close(mutate("loss", got), want, torch.float32 if tol == torch.float64 else tol, f"{what} {name}",
                      math.sqrt(n))
            else:
                close(mutate("grad", got), want, tol, f"{what} {name}")
        loss_eager = g_eager = g_eager_scaled = None
    compare(loss, loss_ref, loss_eager, "loss")
    compare(g, 1.5 * g_ref, g_eager_scaled, "grad")
    # the loss as the last op: an incoming gradient of exactly 1 (which fused backends skip on the device)
    loss1 = ops.asymmetric_loss(x, targets, gamma_pos=gp, gamma_neg=gn, clip=clip,
                                disable_torch_grad_focal_loss=not focal_grad, reduction=reduction, backend=backend)
    (g1,) = torch.autograd.grad(loss1, x)
    compare(g1, g_ref, g_eager, "grad (incoming 1)")
    # evaluation mode: no gradient requested, same value
    with torch.no_grad():
        loss2 = ops.asymmetric_loss(x, targets, gamma_pos=gp, gamma_neg=gn, clip=clip,
                                    disable_torch_grad_focal_loss=not focal_grad, reduction=reduction, backend=backend)
    compare(loss2, loss_ref, loss_eager, "loss (no grad)")


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
    elif dtype in HALF:  # eager: the same product in this dtype (computed in fp32 and rounded once)
        eager = before[offset:offset + n].cpu() * s.cpu()
        close_half(grad, before[offset:offset + n].double().cpu() * s.item(), eager, dtype, what)
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


# Wrong gradients every half-precision check must reject (test_kernels.py, triton_cases.py): a sign
# error, an input forgotten by the backward, a factor of 2.
MUTATIONS = {"negated": torch.neg, "zeroed": torch.zeros_like, "doubled": lambda t: 2 * t}


def mutated(target, mutation):
    """A ``mutate`` hook for the checks: ``MUTATIONS[mutation]`` applied to the tensor named target."""
    fn = MUTATIONS[mutation]
    return lambda name, t: fn(t) if name == target else t


def _attention_case(backend, dtype, mutate=_identity):
    check_attention(backend, (2, 7, 16, 9), dtype, batched_q=True, seed=7, mutate=mutate)


def _enhance_case(backend, dtype, mutate=_identity):
    check_enhance(backend, (2, 9, 7), dtype, seed=2, mutate=mutate)


def _asl_case(backend, dtype, mutate=_identity):
    check_asl(backend, (9, 20), dtype, gammas=(1.0, 3.0), focal_grad=True, seed=3, mutate=mutate)


# (op, check(backend, dtype=, mutate=), the names its mutate hook sees, kwargs)
MUTATION_CASES = [
    ("class_attention", _attention_case, ("z", "dq", "dk", "dv"), {}),
    ("progressive_enhance", _enhance_case, ("out", "dz", "daffinity", "dgate", "dlam"), {}),
    ("asymmetric_loss", _asl_case, ("loss", "grad"), {}),
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
    warm-up, with the enhancement's plan computed before (as the head does when built), then
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
    plan = ops.enhance_plan(groups, mask=True)

    def step():
        z0 = ops.class_attention(q, k, v, backend=backend)
        z1 = ops.progressive_enhance(z0, r, groups, gate, lam, plan=plan, backend=backend)
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
