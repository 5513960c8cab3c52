"""The forms of the CSSFE head's enhancement (model.enhance_form): the mask's flow for every form,
gradients against float64, the refined maps, the config key, one tiny training epoch per form."""
import json
import os

import numpy as np
import pytest
import torch
from test_heads import HeadLogits

from cssfe import ops
from cssfe.config import ConfigError, load_config
from cssfe.models import enhance_forms
from cssfe.models.enhance_forms import ENHANCE_FORMS, EnhanceInputs, PublishedForm
from cssfe.models.heads import CSSFEHead
from cssfe.ops.reference import semantic_affinity

GROUPS = np.array([0, 0, 1, 2, 1, 1, 2, 0, 2])  # interleaved: the stages are not contiguous slices
C, D = len(GROUPS), 12
FORMS = ENHANCE_FORMS.names()


def _head(form, mask=True, seed=0):
    torch.manual_seed(seed)
    head = CSSFEHead(D, C, torch.randn(C, 10), GROUPS, dim=8, mask=mask, enhance_form=form)
    for p in head.enhancement.parameters():  # learned forms: away from their start, where some equal "published"
        with torch.no_grad():
            p.normal_(0, 0.5)
    return head


def _flow(head, feats):
    """[dst group, src group]: whether the logits of a class of dst depend on the label embedding of
    another class of src. The embeddings reach the logits through each class's own query (its map,
    its features) and, across classes, only through the enhancement (R is a cached constant here)."""
    head.embeddings.requires_grad_(True)
    logits = head(feats)["logits"]
    reaches = torch.stack([torch.autograd.grad(logits[:, i].square().sum(), head.embeddings, retain_graph=True)[0]
                           .abs().sum(-1) > 0 for i in range(C)])  # [i, j]: embedding j reaches logit i
    reaches &= ~torch.eye(C, dtype=torch.bool)
    groups = torch.as_tensor(GROUPS)
    return torch.tensor([[bool(reaches[groups == dst][:, groups == src].any()) for src in range(3)] for dst in range(3)])


class LeakingForm(PublishedForm):
    """A wrong form: takes R transposed (what class j would take from i), so sources flow from the
    less frequent groups to the more frequent ones."""

    def forward(self, x, refine_maps):
        return super().forward(x._replace(affinity=x.affinity.t().contiguous(), plan=x.plan.for_mask(None)), refine_maps)


@pytest.mark.parametrize("form", FORMS)
def test_nothing_flows_from_a_less_frequent_group_under_the_mask(form):
    feats = torch.randn(3, D, 3, 4, generator=torch.Generator().manual_seed(2))
    flows = _flow(_head(form, mask=True), feats)
    for dst in range(3):
        for src in range(dst, 3):  # same group or less frequent: nothing
            assert not flows[dst, src], f"{form}: group {src} reaches the logits of group {dst}"
    # ... and it does flow the allowed way (tail takes from head and medium, medium from head)
    assert flows[2, 0] and flows[2, 1] and flows[1, 0]
    # without the mask every group reaches every other
    unmasked = _flow(_head(form, mask=False), feats)
    assert unmasked[0, 2] and unmasked[2, 2]


def test_the_flow_check_catches_a_leaking_form(monkeypatch):
    monkeypatch.setitem(ENHANCE_FORMS._entries, "leaking", LeakingForm)
    flows = _flow(_head("leaking", mask=True), torch.randn(3, D, 3, 4, generator=torch.Generator().manual_seed(2)))
    assert flows[0, 2] and flows[1, 2]


@pytest.mark.parametrize("form", FORMS)
def test_refined_maps_are_maps_and_pool_to_the_enhanced_features(form):
    """Each refined map is a distribution over the positions, and pooling the values with it gives
    the features the enhanced logits are computed from."""
    head = _head(form)
    feats = torch.randn(2, D, 5, 3)
    out = head(feats, return_maps=True)
    refined = out["refined_maps"]
    assert refined.shape == out["maps"].shape == (2, C, 15)
    assert (refined >= 0).all()
    torch.testing.assert_close(refined.sum(-1), torch.ones(2, C))
    q = head.query(head.embeddings)
    z1 = torch.einsum("bcn,bdn->bcd", refined, head.value(feats).flatten(2))
    torch.testing.assert_close(head.classify(z1, q, feats.mean(dim=(2, 3))), out["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["logits"], head(feats)["logits"])  # asking for maps changes nothing


def test_stage_lambda_starts_as_the_published_form():
    feats = torch.randn(2, D, 3, 3)
    torch.manual_seed(0)
    published = CSSFEHead(D, C, torch.randn(C, 10), GROUPS, dim=8)
    torch.manual_seed(0)
    staged = CSSFEHead(D, C, torch.randn(C, 10), GROUPS, dim=8, enhance_form="stage_lambda")
    assert torch.equal(published(feats)["logits"], staged(feats)["logits"])
    torch.testing.assert_close(staged.enhancement.stage_lam(staged.lam), staged.lam.expand(3))
    assert set(published.state_dict()) == set(staged.state_dict()) - {"enhancement.stage_log_scale"}


def _inputs(dtype=torch.float64, seed=0, b=2, n=5, d=3):
    g = torch.Generator().manual_seed(seed)
    groups = torch.as_tensor(GROUPS)
    maps = torch.softmax(torch.randn(b, C, n, generator=g, dtype=dtype), -1)
    value = torch.randn(b, d, n, generator=g, dtype=dtype)
    r = semantic_affinity(torch.randn(C, 6, generator=g), groups, mask=True).to(dtype)
    return EnhanceInputs(
        z0=torch.einsum("bcn,bdn->bcd", maps, value), maps=maps, value=value, affinity=r, groups=groups,
        gate=torch.rand(b, C, generator=g, dtype=dtype), presence=torch.rand(b, C, generator=g, dtype=dtype),
        lam=torch.tensor(1.3, dtype=dtype), plan=ops.enhance_plan(groups, True))


@pytest.mark.parametrize("form", FORMS)
def test_gradients_match_float64_finite_differences(form):
    """gradcheck of every form on odd sizes (B=2, N=5, d=3, 9 classes in interleaved groups) with
    respect to everything the head differentiates: features, maps, values, R, lambda, own parameters."""
    torch.manual_seed(0)
    module = ENHANCE_FORMS.build(form, C).double()
    for p in module.parameters():
        with torch.no_grad():
            p.normal_(0, 0.5)
    x = _inputs()
    names = ("z0", "maps", "value", "affinity", "lam")
    params = dict(module.named_parameters())

    def run(*tensors):  # the module's own parameters through a functional call, so that gradcheck perturbs them
        inputs = x._replace(**dict(zip(names, tensors[:len(names)])))
        return torch.func.functional_call(module, dict(zip(params, tensors[len(names):])), (inputs, True))

    leaves = [getattr(x, n).clone().requires_grad_() for n in names]
    leaves += [p.detach().clone().requires_grad_() for p in params.values()]
    assert torch.autograd.gradcheck(run, leaves, eps=1e-6, atol=1e-6)


def test_the_batched_recurrence_is_the_published_one_with_a_shared_affinity():
    x = _inputs()
    got = enhance_forms.batched_progressive_enhance(x.z0, x.affinity.expand(2, C, C), x.lam * x.gate, x.plan)
    want = ops.reference.progressive_enhance(x.z0, x.affinity, x.groups, x.gate, x.lam)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_presence_weights_each_source_by_its_presence():
    """A source class absent from the image (p = 0) gives nothing; with every p = 1 the form is the
    published one."""
    x = _inputs()
    form, published = ENHANCE_FORMS.build("presence", C), PublishedForm()
    ones = x._replace(presence=torch.ones_like(x.presence))
    torch.testing.assert_close(form(ones, True)[0], published(ones, True)[0], rtol=1e-10, atol=1e-10)
    head_absent = x._replace(presence=torch.where(torch.as_tensor(GROUPS == 0), 0.0, 1.0).double().expand(2, C))
    z1, _ = form(head_absent, False)
    medium = torch.as_tensor(GROUPS == 1)
    torch.testing.assert_close(z1[:, medium], x.z0[:, medium])  # medium takes only from head: nothing


def test_sharpen_moves_a_map_towards_where_its_sources_attend():
    x = _inputs()
    z1, refined = ENHANCE_FORMS.build("sharpen", C)(x, True)
    tail = torch.as_tensor(GROUPS == 2)
    guide = torch.einsum("ij,bjn->bin", x.affinity[tail], refined)
    # the map's mass on the guide grows: E_A'[guide] > E_A[guide] for every tail class with a gate
    assert ((refined[:, tail] * guide).sum(-1) > (x.maps[:, tail] * guide).sum(-1)).all()
    head = torch.as_tensor(GROUPS == 0)
    torch.testing.assert_close(refined[:, head], x.maps[:, head])
    zero_gate = x._replace(gate=torch.zeros_like(x.gate))
    torch.testing.assert_close(ENHANCE_FORMS.build("sharpen", C)(zero_gate, False)[0], x.z0)


def test_the_config_key_names_the_form():
    for form in FORMS:
        assert load_config(None, [f"model.enhance_form={form}"]).model.enhance_form == form
    with pytest.raises(ConfigError, match="model.enhance_form.*'blend'.*presence"):
        load_config(None, ["model.enhance_form=blend"])
    with pytest.raises(ConfigError, match="model.enhance_form.*model.enhance=False"):
        load_config(None, ["model.enhance_form=presence", "model.enhance=false"])
    with pytest.raises(ConfigError, match="model.enhance_form.*model.head='baseline'"):
        load_config(None, ["model.enhance_form=sharpen", "model.head=baseline"])
    with pytest.raises(ValueError, match="enhancement form 'blend'"):
        CSSFEHead(D, C, torch.randn(C, 10), GROUPS, enhance_form="blend")


@pytest.mark.parametrize("form", FORMS)
def test_every_form_exports_and_compiles(form):
    """The forms trace: no read-back of tensor values (the stages come from the plan's ints)."""
    head = _head(form).eval()
    model = HeadLogits(head)
    feats = torch.randn(2, D, 3, 3)
    program = torch.export.export(model, (feats,))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break either
    with torch.no_grad():
        torch.testing.assert_close(program.module()(feats), model(feats))
        torch.testing.assert_close(compiled(feats), model(feats))


@pytest.mark.parametrize("dataset", ["bundled", "bundled_coco"])
@pytest.mark.parametrize("form", FORMS)
def test_every_form_trains_an_epoch(form, dataset, tmp_path):
    from cssfe.engine.train import train

    cfg = load_config(None, [f"model.enhance_form={form}", f"data.name={dataset}", "data.image_size=16",
                             "data.batch_size=128", "model.dim=16", "model.embedding=rie", "optim.epochs=1",
                             "progress=false", "kernels=reference", "logging.tensorboard=false",
                             f"output_dir={tmp_path}"])
    metrics = train(cfg)
    losses = [r["train_loss"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "train_loss" in r]
    assert len(losses) == 1 and np.isfinite(losses[0]) and metrics["skipped_steps"] == 0
    assert 0 <= metrics["final"]["mAP"]["tail"] <= 100


def test_a_run_from_before_the_key_resumes_as_the_published_form():
    """A checkpoint's config written before model.enhance_form existed meant the published form."""
    from cssfe.config import to_dict
    from cssfe.engine.train import _check_resume_config

    saved = to_dict(load_config(None, []))
    del saved["model"]["enhance_form"]
    _check_resume_config(saved, load_config(None, []), "run/last.pt")
    with pytest.raises(ValueError, match="model.enhance_form: 'published' -> 'presence'"):
        _check_resume_config(saved, load_config(None, ["model.enhance_form=presence"]), "run/last.pt")


@pytest.fixture
def world_of_one(monkeypatch):
    """DeepSpeed in this process as a world of one: the variables a launcher sets, undone after (so
    processes that later tests start do not inherit them; the process group stays, as DeepSpeed keeps it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("form", [f for f in FORMS if f != "published"])
def test_every_form_trains_under_deepspeed_zero3(form, tmp_path, world_of_one):
    """One process, ZeRO stage 3: the forms' own parameters (stage_lambda's s) are partitioned and
    gathered like the head's; the run writes DeepSpeed checkpoints and finite metrics."""
    from cssfe.engine.train import train

    ds = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "deepspeed", "zero3.yaml")
    cfg = load_config(None, [f"model.enhance_form={form}", "data.image_size=16", "data.batch_size=128", "model.dim=16",
                             "model.embedding=rie", "optim.epochs=1", "progress=false", "logging.tensorboard=false",
                             f"distributed.deepspeed_config={ds}", f"output_dir={tmp_path}"])
    metrics = train(cfg)
    assert (tmp_path / "checkpoints" / "deepspeed").is_dir()
    assert np.isfinite(metrics["final"]["mAP"]["total"]) and metrics["skipped_steps"] == 0
