"""The CSSFE head as a whole: outputs, switches, the mask at logit level, learnable RIE embeddings."""
import numpy as np
import pytest
import torch

from cssfe.models.enhance_forms import ENHANCE_FORMS
from cssfe.models.heads import HEADS, CSSFEHead

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


@pytest.mark.parametrize("form", ENHANCE_FORMS.names())
def test_head_logits_untouched_under_mask_and_changed_without(form):
    """Every enhancement form (tests/models/test_enhance_forms.py checks the flow between all groups)."""
    feats = torch.randn(4, D, 3, 3)
    out = _head(mask=True, enhance_form=form)(feats)
    head = torch.as_tensor(GROUPS == 0)
    assert torch.equal(out["logits"][:, head], out["logits0"][:, head])
    assert not torch.allclose(out["logits"][:, ~head], out["logits0"][:, ~head])
    out = _head(mask=False, enhance_form=form)(feats)
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


# --------------------------------------------------------------------------------------------------
# R is derived state: it follows the embeddings and groups on every path that changes them
# --------------------------------------------------------------------------------------------------
from cssfe import ops  # noqa: E402

OTHER_GROUPS = GROUPS[::-1].copy()  # the former tail classes become head


def _expected_affinity(head):
    return ops.semantic_affinity(head.embeddings.detach().float(), head.groups, head.mask, head.tau)


def _assert_consistent(head):
    r = head.affinity()
    torch.testing.assert_close(r, _expected_affinity(head), rtol=0, atol=0)
    groups = head.groups
    forbidden = groups[None, :] >= groups[:, None]  # j may feed i only if group(j) < group(i)
    assert (r[forbidden] == 0).all(), "a class receives information from a class the mask forbids"
    for mask in (True, False):  # the enhancement's plan follows the groups too
        got, want = head.enhance_plan(mask), ops.enhance_plan(head.groups, mask)
        assert torch.equal(got.order, want.order) and (got.bounds, got.earlier_only) == (want.bounds, want.earlier_only)
    out = head(torch.randn(2, D, 3, 3))
    is_head = groups == 0
    assert torch.equal(out["logits"][:, is_head], out["logits0"][:, is_head])  # head classes untouched


def test_affinity_follows_load_state_dict_with_other_embeddings_and_groups():
    head = _head()
    torch.manual_seed(1)
    other = CSSFEHead(D, C, torch.randn(C, 10), OTHER_GROUPS, dim=16)
    head.load_state_dict(other.state_dict())
    assert torch.equal(head.groups, torch.as_tensor(OTHER_GROUPS))
    _assert_consistent(head)


def test_affinity_follows_the_setter_and_in_place_or_replaced_tensors():
    head = _head()
    head.set_label_space(embeddings=torch.randn(C, 10), groups=OTHER_GROUPS)
    _assert_consistent(head)
    with torch.no_grad():
        head.groups.copy_(torch.as_tensor(GROUPS))  # in place
    _assert_consistent(head)
    head.embeddings = torch.randn(C, 10)  # replaced
    _assert_consistent(head)
    with pytest.raises(ValueError, match="groups must have shape"):
        head.set_label_space(groups=GROUPS[:-1])


def test_rie_affinity_and_gate_stay_fp32_under_autocast(monkeypatch):
    head = _head(learnable_embeddings=True)
    with torch.no_grad():
        head.embeddings.mul_(3.0)  # varied similarities: bf16 rounding of cos / tau shows
    seen = []
    real = ops.progressive_enhance

    def recording(z, affinity, groups, gate, lam, **kw):
        seen.append((affinity.detach().clone(), gate.detach().clone(), z.dtype))
        return real(z, affinity, groups, gate, lam, **kw)

    monkeypatch.setattr(ops, "progressive_enhance", recording)
    feats = torch.randn(2, D, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(feats)
        assert head.affinity().dtype == torch.float32
    affinity, gate, z_dtype = seen[0]
    assert z_dtype == torch.bfloat16  # the features themselves do run in bf16
    assert affinity.dtype == gate.dtype == torch.float32
    torch.testing.assert_close(affinity, _expected_affinity(head), rtol=1e-6, atol=1e-7)
    p0 = torch.sigmoid(out["logits0"].float())
    torch.testing.assert_close(gate, 1 - (2 * p0 - 1).abs(), rtol=0, atol=0)


class HeadLogits(torch.nn.Module):
    """A head's logits alone, as torch.export wants one tensor out."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, feats):
        return self.head(feats)["logits"]


def test_head_exports_with_its_cached_affinity():
    """torch.export traces fake tensors: the staleness check of R must not touch their data."""
    model = HeadLogits(_head()).eval()
    program = torch.export.export(model, (torch.randn(2, D, 3, 3),))
    feats = torch.randn(2, D, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(feats), model(feats))


def test_head_hands_its_plan_to_the_enhancement(monkeypatch):
    """Every enhancement call gets the plan of the mask in force (the model's, or the one asked for)."""
    head = _head()
    seen = []
    real = ops.progressive_enhance
    monkeypatch.setattr(ops, "progressive_enhance", lambda *a, plan=None, **kw: seen.append(plan) or real(*a, plan=plan, **kw))
    feats = torch.randn(2, D, 3, 3)
    head(feats, return_maps=True)
    head(feats, mask=False)
    assert [p.earlier_only for p in seen] == [0b111, 0b111, ops.enhance_plan(head.groups, False).earlier_only]
    assert all(torch.equal(p.order, ops.enhance_plan(head.groups).order) for p in seen)


@pytest.mark.parametrize("name, maps, refined, first_pass", [("cssfe", True, True, True), ("baseline", False, False, False),
                                                              ("cprfl", True, False, False)])
def test_heads_say_what_they_can_do(name, maps, refined, first_pass):
    """The capabilities the engine and the explanations ask instead of the head's name."""
    torch.manual_seed(0)
    head = HEADS.build(name, D, C, torch.randn(C, 10), GROUPS)
    assert (head.has_class_maps, head.has_refined_maps, head.has_first_pass_logits) == (maps, refined, first_pass)
    assert HEADS.get(name).uses_label_embeddings == (name != "baseline")
    feats, labels = torch.randn(2, D, 3, 3), (torch.rand(2, C) > 0.5).float()
    out = head(feats, return_maps=maps)
    assert ("refined_maps" in out) == refined and ("maps" in out) == maps
    loss_fn = torch.nn.BCEWithLogitsLoss()
    aux = head.auxiliary_loss(out, labels, loss_fn)
    if first_pass:
        assert torch.equal(aux, loss_fn(out["logits0"].float(), labels))
    else:
        assert aux is None
    if name == "cssfe":  # without the enhancement the first pass is the output: nothing to supervise apart
        plain = _head(enhance=False)
        assert not plain.has_first_pass_logits and plain.auxiliary_loss(plain(feats), labels, loss_fn) is None
