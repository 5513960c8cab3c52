"""The reference ops: semantics against direct loops in float64, and the mask's guarantees."""
import math

import pytest
import torch

from cssfe.ops import class_attention, progressive_enhance, semantic_affinity

GROUPS = torch.tensor([2, 0, 1, 2, 0, 1, 1, 2, 0, 2, 1])  # 3 head, 4 medium, 4 tail, interleaved


def _direct_enhance(z, r, groups, gate, lam):
    """Class by class, straight from SPEC section 1."""
    b, c, _ = z.shape
    out = z.clone()
    for g in range(3):
        snapshot = out.clone()  # earlier groups updated, this and later groups original
        for i in range(c):
            if groups[i] != g:
                continue
            for n in range(b):
                w = lam * gate[n, i]
                msg = sum(r[i, j] * snapshot[n, j] for j in range(c))
                out[n, i] = (z[n, i] + w * msg) / (1 + w * r[i].sum())
    return out


@pytest.mark.parametrize("mask", [True, False])
def test_affinity_rows(mask):
    emb = torch.randn(len(GROUPS), 17, dtype=torch.float64)
    r = semantic_affinity(emb, GROUPS, mask=mask, tau=0.1)
    assert torch.isfinite(r).all()
    assert (r.diagonal() == 0).all()
    if mask:
        allowed = GROUPS[None, :] < GROUPS[:, None]
        assert (r[~allowed] == 0).all()
        assert (r[GROUPS == 0] == 0).all()  # head rows have no source
        assert torch.allclose(r[GROUPS > 0].sum(1), torch.ones(int((GROUPS > 0).sum()), dtype=r.dtype))
    else:
        assert torch.allclose(r.sum(1), torch.ones(len(GROUPS), dtype=r.dtype))


def test_affinity_matches_formula():
    emb = torch.randn(len(GROUPS), 9, dtype=torch.float64)
    tau = 0.3
    r = semantic_affinity(emb, GROUPS, mask=True, tau=tau).double()
    e = emb / emb.norm(dim=1, keepdim=True)
    for i in range(len(GROUPS)):
        allowed = [j for j in range(len(GROUPS)) if GROUPS[j] < GROUPS[i]]
        denom = sum(math.exp(float(e[i] @ e[k]) / tau) for k in allowed)
        for j in range(len(GROUPS)):
            want = math.exp(float(e[i] @ e[j]) / tau) / denom if j in allowed else 0.0
            assert abs(float(r[i, j]) - want) < 1e-6


@pytest.mark.parametrize("mask", [True, False])
def test_progressive_enhance_matches_direct_loop(mask):
    torch.manual_seed(0)
    b, c, length = 3, len(GROUPS), 5
    z = torch.randn(b, c, length, dtype=torch.float64)
    r = semantic_affinity(torch.randn(c, 8), GROUPS, mask=mask, tau=0.2).double()
    gate = torch.rand(b, c, dtype=torch.float64)
    lam = torch.tensor(0.7, dtype=torch.float64)
    got = progressive_enhance(z, r, GROUPS, gate, lam)
    want = _direct_enhance(z, r, GROUPS, gate, lam)
    assert torch.allclose(got, want, atol=1e-12)


def test_mask_blocks_flow_to_more_frequent_groups():
    b, c, length = 2, len(GROUPS), 6
    z = torch.randn(b, c, length, dtype=torch.float64, requires_grad=True)
    r = semantic_affinity(torch.randn(c, 8), GROUPS, mask=True).double()
    gate = torch.rand(b, c, dtype=torch.float64)
    out = progressive_enhance(z, r, GROUPS, gate, torch.tensor(1.3, dtype=torch.float64))
    head, medium, tail = (GROUPS == 0), (GROUPS == 1), (GROUPS == 2)
    assert torch.equal(out[:, head], z[:, head])  # head features unchanged
    for src_group, dst in ((tail, head | medium), (medium, head)):
        grad = torch.autograd.grad(out[:, dst].sum() + (out[:, dst] ** 2).sum(), z, retain_graph=True)[0]
        assert (grad[:, src_group] == 0).all()
    # ... and information does flow the allowed way.
    grad = torch.autograd.grad(out[:, tail].sum(), z)[0]
    assert (grad[:, head].abs() > 0).any()


def test_without_mask_information_flows_everywhere():
    c = len(GROUPS)
    z = torch.randn(1, c, 4, dtype=torch.float64, requires_grad=True)
    r = semantic_affinity(torch.randn(c, 8), GROUPS, mask=False).double()
    out = progressive_enhance(z, r, GROUPS, torch.ones(1, c, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    grad = torch.autograd.grad(out[:, GROUPS == 0].sum(), z)[0]
    assert (grad[:, GROUPS == 2].abs() > 0).all()


def test_refined_maps_sum_to_one():
    torch.manual_seed(1)
    b, c, d, n = 2, len(GROUPS), 8, 13
    q, k, v = torch.randn(c, d), torch.randn(b, d, n), torch.randn(b, d, n)
    z, maps = class_attention(q, k, v, return_maps=True)
    r = semantic_affinity(torch.randn(c, 8), GROUPS, mask=True)
    gate, lam = torch.rand(b, c), torch.tensor(2.0)
    refined = progressive_enhance(maps, r, GROUPS, gate, lam)
    assert torch.allclose(refined.sum(-1), torch.ones(b, c), atol=1e-5)
    assert (refined >= 0).all()
    # Pooling is linear in the map: the refined maps pool to the refined features.
    z1 = progressive_enhance(z, r, GROUPS, gate, lam)
    assert torch.allclose(torch.einsum("bcn,bdn->bcd", refined, v), z1, atol=1e-5)


@pytest.mark.parametrize("batched_q", [False, True])
def test_class_attention_matches_direct(batched_q):
    torch.manual_seed(2)
    b, c, d, n = 3, 7, 5, 11
    q = torch.randn(b, c, d, dtype=torch.float64) if batched_q else torch.randn(c, d, dtype=torch.float64)
    k, v = torch.randn(b, d, n, dtype=torch.float64), torch.randn(b, d, n, dtype=torch.float64)
    z, maps = class_attention(q, k, v, return_maps=True)
    for bi in range(b):
        qb = q[bi] if batched_q else q
        for ci in range(c):
            s = torch.tensor([float(qb[ci] @ k[bi, :, j]) / math.sqrt(d) for j in range(n)], dtype=torch.float64)
            a = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
            assert torch.allclose(maps[bi, ci], a)
            assert torch.allclose(z[bi, ci], (v[bi] * a).sum(-1))


def test_class_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="k and v"):
        class_attention(torch.randn(4, 8), torch.randn(2, 8, 5), torch.randn(2, 8, 6))
    with pytest.raises(ValueError, match="q must be"):
        class_attention(torch.randn(4, 7), torch.randn(2, 8, 5), torch.randn(2, 8, 5))
