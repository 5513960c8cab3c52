"""Each op's benchmark cases, defined once for every run (CPU, GPU, the GPU check's CPU dry run).

An op (``OPS``) has named shape fields, the outputs a forward + backward call returns (checked
against the eager reference), the work it must do (bytes moved, FLOPs) and its case lists per run.
``make_case`` builds one case's seeded inputs and its reference; the providers that time it are in
``benchmarks.providers``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple


class Op(NamedTuple):
    name: str
    fields: Tuple[str, ...]  # the named shape fields, in the order the case lists give them
    outputs: Tuple[str, ...]  # what a forward + backward call returns
    cost: Callable  # (shape dict, mode, element size) -> {"bytes": int | None, "flop": float | None}
    cases: Dict[str, List[tuple]]  # run -> shapes
    variants: Tuple[str, ...] = ("",)  # a case's other dimension (the enhancement's affinity)


def _asl_cost(s, mode, esize):
    # read logits and bool targets (forward); + write the gradient (one pass of loss and gradient)
    return {"bytes": s["B"] * s["C"] * ((2 * esize + 1) if mode == "forward+backward" else (esize + 1)), "flop": None}


def _attention_flop(s, mode):
    # 4·B·C·N·d for the forward (q kᵀ and the pooling); forward + backward = 3.5× (FlashAttention's
    # convention: the backward recomputes the scores)
    flop = 4.0 * s["B"] * s["C"] * s["N"] * s["d"]
    return flop * (3.5 if mode == "forward+backward" else 1)


def _class_attention_cost(s, mode, esize):
    io = esize * (s["C"] * s["d"] + 2 * s["B"] * s["d"] * s["N"] + s["B"] * s["C"] * s["d"])
    return {"bytes": io * (2 if mode == "forward+backward" else 1), "flop": _attention_flop(s, mode)}


def _attention_cost(s, mode, esize):
    # class attention then the enhancement: FLOPs of the attention only (the C x C mixing is timed, not counted)
    return {"bytes": None, "flop": _attention_flop(s, mode)}


def _enhance_cost(s, mode, esize):
    # read z, write the output (+ read its gradient, write dz); 2·B·C²·L multiply-adds forward, 3× with backward
    full = mode == "forward+backward"
    return {"bytes": (4 if full else 2) * s["B"] * s["C"] * s["L"] * esize,
            "flop": 2.0 * s["B"] * s["C"] ** 2 * s["L"] * (3 if full else 1)}


# The SPEC section 6 grid: C x N x d at B = 32.
SPEC_GRID = [(32, c, n, d) for c in (20, 80, 1000) for n in (49, 196, 784) for d in (256, 512, 768)]

OPS: Dict[str, Op] = {op.name: op for op in (
    Op("asl", ("B", "C"), ("loss", "grad"), _asl_cost, {
        "cpu": [(4096, 80), (256, 1000)], "cpu_smoke": [(64, 20)],
        "gpu": [(16384, 1024), (4096, 80), (256, 1000)], "dry": [(64, 20), (16, 100)]}),
    Op("class_attention", ("B", "C", "d", "N"), ("z", "dq", "dk", "dv"), _class_attention_cost, {
        "cpu": [(32, 20, 128, 64), (8, 80, 256, 196), (4, 20, 768, 196)], "cpu_smoke": [(2, 20, 32, 49)]}),
    Op("progressive_enhance", ("B", "C", "L"), ("out", "dz", "dR", "dlam"), _enhance_cost, {
        "cpu": [(32, 20, 128), (8, 80, 256), (32, 1000, 128)], "cpu_smoke": [(2, 20, 16)],
        "gpu": [(64, 80, 512)], "dry": [(2, 8, 32)]},
       variants=("masked affinity", "dense affinity")),
    # the goals' op: class attention, then the enhancement of its output (the head's forward)
    Op("attention", ("B", "C", "N", "d"), ("z", "dq", "dk", "dv", "dlam"), _attention_cost, {
        "gpu": [(64, 80, 784, 512)], "dry": [(2, 8, 16, 32)],
        "gpu_grid": SPEC_GRID, "gpu_grid_quick": [(32, c, n, 512) for c in (80, 1000) for n in (196, 784)],
        "dry_grid": [(2, c, 9, 16) for c in (4, 8)]}),
)}


def shapes(op: str, run: str) -> List[dict]:
    """The named shapes of ``op`` in ``run`` (empty when the op has no case there)."""
    spec = OPS[op]
    return [dict(zip(spec.fields, case)) for case in spec.cases.get(run, [])]


def masked_affinity(c: int, device):
    """(groups, affinity) of C classes: random thirds and the model's masked affinity (seeded)."""
    import torch

    from cssfe.ops import reference

    gen = torch.Generator().manual_seed(0)
    groups = torch.randperm(c, generator=gen) % 3
    affinity = reference.semantic_affinity(torch.randn(c, 32, generator=gen), groups, mask=True, tau=0.1)
    return groups.to(device), affinity.to(device)


def _leaf(t, precise: bool):
    """The input for the reference: ``t`` itself, or (``precise``) a fresh fp32 leaf copy of it."""
    if not precise:
        return t
    out = t.detach().float().clone()
    return out.requires_grad_() if t.requires_grad else out


def make_case(op: str, shape: dict, dtype: str, device, variant: str = "") -> dict:
    """Seeded inputs of one case, ``half`` (a half-precision case), and ``make_ref(precise)``: the
    eager reference's forward + backward outputs, with the inputs upcast to fp32 when ``precise``."""
    import torch

    import cssfe.ops as ops

    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    case = {"op": op, "shape": dict(shape), "dtype": dtype, "variant": variant, "half": dtype != "float32"}

    def randn(*size):
        return torch.randn(*size, device=device, dtype=dt)

    if op == "asl":
        case["x"] = (torch.randn(shape["B"], shape["C"], device=device) * 3).to(dt).requires_grad_()
        case["y"] = torch.rand(shape["B"], shape["C"], device=device) < 0.1

        def ref(precise):
            x = _leaf(case["x"], precise)
            loss = ops.asymmetric_loss(x, case["y"], backend="reference")
            return (loss.detach(),) + torch.autograd.grad(loss, x)
    elif op == "progressive_enhance":
        b, c, length = shape["B"], shape["C"], shape["L"]
        groups, affinity = masked_affinity(c, device)
        if variant == "dense affinity":  # every class feeds every other
            affinity = torch.rand(c, c, generator=torch.Generator().manual_seed(0)).to(device) / c
        # the head's plan (which stages take only earlier groups), as the model passes it to the op
        plan = ops.enhance_plan(groups, mask=None if variant == "dense affinity" else True)
        case.update(z=randn(b, c, length).requires_grad_(), R=affinity.requires_grad_(), groups=groups, plan=plan,
                    gate=torch.rand(b, c, device=device).to(dt),
                    lam=torch.tensor(0.9, device=device, requires_grad=True), gout=randn(b, c, length))

        def ref(precise):
            z, r, lam = (_leaf(case[k], precise) for k in ("z", "R", "lam"))
            out = ops.progressive_enhance(z, r, groups, _leaf(case["gate"], precise), lam, plan=plan, backend="reference")
            return (out.detach(),) + torch.autograd.grad(out, (z, r, lam), _leaf(case["gout"], precise))
    elif op in ("class_attention", "attention"):
        b, c, n, d = shape["B"], shape["C"], shape["N"], shape["d"]
        case.update(q=randn(c, d).requires_grad_(), k=randn(b, d, n).requires_grad_(), v=randn(b, d, n).requires_grad_(),
                    gout=randn(b, c, d))
        if op == "attention":
            case["groups"], case["R"] = masked_affinity(c, device)
            case["plan"] = ops.enhance_plan(case["groups"], mask=True)
            case.update(gate=torch.rand(b, c, device=device).to(dt),
                        lam=torch.tensor(0.9, device=device, requires_grad=True))

        def ref(precise):
            leaves = tuple(_leaf(case[k], precise) for k in ("q", "k", "v"))
            z = ops.class_attention(*leaves, backend="reference")
            if op == "attention":
                leaves += (_leaf(case["lam"], precise),)
                z = ops.progressive_enhance(z, case["R"], case["groups"], _leaf(case["gate"], precise), leaves[-1],
                                            plan=case["plan"], backend="reference")
            return (z.detach(),) + torch.autograd.grad(z, leaves, _leaf(case["gout"], precise))
    else:
        raise ValueError(f"unknown op {op!r}; choose one of {sorted(OPS)}")
    case["make_ref"] = ref
    return case


def work(op: str, shape: dict, mode: str, dtype: str) -> dict:
    """Bytes and FLOPs of one call of ``op`` (``mode``: forward or forward+backward)."""
    esize = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[dtype]
    return OPS[op].cost(shape, mode, esize)


def main_shape(op: str, run: str) -> Optional[dict]:
    """Where a run's goals are judged: the op's first case in that run."""
    found = shapes(op, run)
    return found[0] if found else None
