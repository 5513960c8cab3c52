"""The CSSFE head as a whole: outputs, switches, the mask at logit level, learnable RIE embeddings."""
import numpy as np
import pytest
import torch

from cssfe.models.heads import CSSFEHead, HEADS

GROUPS = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
C, D = len(GROUPS), 24


def _head(**kw):
    torch.manual_seed(0)
    return CSSFEHead(D, C, torch.randn(C, 10), GROUPS, dim=16, **kw)


def test_outputs_and_maps():
    head = _head()
    out = head(torch.randn(3, D, 5, 7), return_maps=True)
    assert out["logits"].shape == out["logits0"].shape == (3, C)
    assert out["maps"].shape == out["refined_maps"].shape == (3, C, 35)
    assert torch.allclose(out["refined_maps"].sum(-1), torch.ones(3, C), atol=1e-5)
    assert head.lam.item() == pytest.approx(1.0, abs=1e-6)


def test_head_logits_untouched_under_mask_and_changed_without():
    feats = torch.randn(4, D, 3, 3)
    out = _head(mask=True)(feats)
    head = torch.as_tensor(GROUPS == 0)
    assert torch.equal(out["logits"][:, head], out["logits0"][:, head])
    assert not torch.allclose(out["logits"][:, ~head], out["logits0"][:, ~head])
    out = _head(mask=False)(feats)
    assert not torch.allclose(out["logits"][:, head], out["logits0"][:, head])


def test_switches():
    feats = torch.randn(2, D, 4, 4)
    out = _head(enhance=False)(feats)
    assert torch.equal(out["logits"], out["logits0"])
    assert _head(global_branch=False).global_fc is None
    with pytest.raises(ValueError, match="gate"):
        _head(gate="sometimes")


@pytest.mark.parametrize("gate", ["uncertainty", "absence"])
def test_gates_are_detached_and_bounded(gate, monkeypatch):
    """Bounded: g(p) in [0, 1]. Detached: the head's gradients are those of a gate held constant at the
    same values. A head that computes the gate from logits0 without detaching it (so the loss also
    trains the first pass through the gate) fails the second check."""
    from cssfe.models import heads

    p = torch.linspace(0, 1, 11)
    g = heads.GATES[gate](p)
    assert (g >= 0).all() and (g <= 1).all()
    if gate == "uncertainty":
        assert g[0] == 0 and g[-1] == 0 and g[5] == 1
    else:
        assert torch.allclose(g, 1 - p)

    def grads():
        head, feats = _head(gate=gate), torch.randn(2, D, 3, 4, generator=torch.Generator().manual_seed(1))
        feats.requires_grad_()
        out = head(feats)
        return torch.autograd.grad(out["logits"].square().sum(), [feats] + list(head.parameters()), allow_unused=True)

    real = heads.GATES[gate]
    as_is = grads()
    monkeypatch.setitem(heads.GATES, gate, lambda p: real(p).detach())
    constant = grads()
    for a, b in zip(as_is, constant):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


def test_rie_embeddings_learn_and_affinity_follows():
    head = _head(learnable_embeddings=True)
    out = head(torch.randn(2, D, 3, 3))
    out["logits"].sum().backward()
    assert head.embeddings.grad is not None and head.embeddings.grad.abs().sum() > 0
    before = head.affinity().clone()
    with torch.no_grad():
        head.embeddings.add_(torch.randn_like(head.embeddings))
    assert not torch.allclose(before, head.affinity())


def test_baseline_head():
    head = HEADS.build("baseline", D, C)
    assert head(torch.randn(2, D, 3, 3))["logits"].shape == (2, C)
