"""``compile: true``: the model and the loss traced as one graph each (the CSSFE ops opaque nodes,
no graph break), the same numbers as eager with inductor, and a compiled training run (traced with
aot_eager: no C++ code generation, which takes minutes on two cores) that matches eager and resumes."""
import json

import numpy as np
import pytest
import torch

from cssfe import ops
from cssfe.config import ConfigError, load_config
from cssfe.engine import compiling
from cssfe.engine import trainer as trainer_module
from cssfe.engine.train import train
from cssfe.losses import build_loss
from cssfe.models.backbones import build_backbone
from cssfe.models.heads import HEADS
from cssfe.models.model import MultiLabelClassifier

# attention and enhancement once each, the loss twice (final and first-pass logits)
CSSFE_CALLS = sorted(["cssfe.class_attention.default", "cssfe.progressive_enhance.default"]
                     + ["cssfe.asymmetric_loss.default"] * 2)


def _tiny_model_and_loss(classes=6, dim=8, backbone=None):
    torch.manual_seed(0)
    groups = np.repeat([0, 1, 2], [2, 2, classes - 4])
    embeddings = torch.nn.functional.normalize(torch.randn(classes, 12), dim=1)
    backbone = backbone() if backbone is not None else build_backbone("smallcnn")
    head = HEADS.build("cssfe", backbone.out_channels, classes, embeddings, groups, dim=dim)
    model = MultiLabelClassifier(backbone, head)
    loss_fn = build_loss("asl", np.arange(1, classes + 1), 100, fused=True)
    x = torch.randn(3, 3, 16, 16)
    y = torch.rand(3, classes) < 0.3
    return model, loss_fn, x, y


def _step(model, loss_fn):
    def step(images, labels):
        out = model(images)
        return loss_fn(out["logits"].float(), labels) + 0.5 * loss_fn(out["logits0"].float(), labels)
    return step


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_model_and_loss_are_one_graph_with_the_ops_as_single_nodes(backend, request):
    if backend == "cpu":
        request.getfixturevalue("native_backend")
    model, loss_fn, x, y = _tiny_model_and_loss()
    step = _step(model, loss_fn)
    torch._dynamo.reset()
    with ops.use_backend(backend):
        for train_mode in (True, False):
            model.train(train_mode)
            explained = torch._dynamo.explain(step)(x, y)
            assert explained.graph_break_count == 0, explained.break_reasons
            assert explained.graph_count == 1
            targets = [str(n.target) for n in explained.graphs[0].graph.nodes if n.op == "call_function"]
            cssfe_calls = sorted(t for t in targets if t.startswith("cssfe."))
            assert cssfe_calls == CSSFE_CALLS, cssfe_calls
        model.train()
        torch._dynamo.reset()
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        got = compiled(x, y)
        grads = torch.autograd.grad(got, list(model.parameters()))
        want = step(x, y)
        want_grads = torch.autograd.grad(want, list(model.parameters()))
    assert torch.allclose(got, want, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)


class _Stem(torch.nn.Sequential):
    """A one-convolution backbone: inductor's C++ code generation for smallcnn's backward alone takes
    minutes on two cores; the ops, the head and the loss are what this test is about."""

    out_channels = 8

    def __init__(self):
        super().__init__(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU())


def test_inductor_gives_eager_numbers_in_training_and_evaluation(native_backend, one_thread, monkeypatch):
    """The compiled modules as training compiles them (in place, inductor): loss, every parameter's
    gradient and the evaluation logits within float tolerance of eager."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)  # no compile worker pool on a small machine
    model, loss_fn, x, y = _tiny_model_and_loss(backbone=_Stem)
    eager_model, eager_loss = _tiny_model_and_loss(backbone=_Stem)[:2]
    torch._dynamo.reset()
    compiling.compile_for_training(model, None, loss_fn, "default")
    with ops.use_backend("cpu"):
        got = _step(model, loss_fn)(x, y)
        got.backward()
        want = _step(eager_model, eager_loss)(x, y)
        want.backward()
        model.eval(), eager_model.eval()
        with torch.no_grad():
            got_eval, want_eval = model(x)["logits"], eager_model(x)["logits"]
    assert torch.allclose(got, want, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-5), name
    assert torch.allclose(got_eval, want_eval, rtol=1e-4, atol=1e-5)


def _cfg(out_dir, *overrides):
    return load_config(None, [f"output_dir={out_dir}", "progress=false", "optim.epochs=2", "data.image_size=16",
                              "model.embedding=rie", "model.dim=16", "data.batch_size=128", "data.eval_batch_size=512", *overrides])


def test_compiled_training_matches_eager_and_resumes(tmp_path, monkeypatch, one_thread):
    """Killed in epoch 2's evaluation and resumed, compiled all along: the uninterrupted eager run's
    numbers, epoch 1 (trained and evaluated compiled) included."""
    eager = train(_cfg(tmp_path / "eager"))

    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    compiled_modules = []
    real_compile = compiling.compile_module
    monkeypatch.setattr(compiling, "compile_module",
                        lambda module, mode: compiled_modules.append(type(module).__name__) or real_compile(module, mode))
    real_evaluate = trainer_module.evaluate
    calls = {"n": 0}

    def crash_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    torch._dynamo.reset()
    monkeypatch.setattr(trainer_module, "evaluate", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "cut", "compile=true"))
    # the trained model, its EMA copy (evaluated) and the loss
    assert compiled_modules == ["MultiLabelClassifier", "MultiLabelClassifier", "FusedAsymmetricLoss"]
    monkeypatch.setattr(trainer_module, "evaluate", real_evaluate)
    resumed = train(_cfg(tmp_path / "cut", "compile=true", "compile_mode=reduce-overhead"), resume=True)
    assert len(compiled_modules) == 6
    first = [json.loads((tmp_path / d / "log.jsonl").read_text().splitlines()[0]) for d in ("eager", "cut")]
    assert first[1]["train_loss"] == pytest.approx(first[0]["train_loss"], rel=1e-6)
    assert first[1]["mAP"] == pytest.approx(first[0]["mAP"], abs=1e-6)
    assert resumed["final"]["per_class_ap"] == pytest.approx(eager["final"]["per_class_ap"], abs=1e-6)
    assert resumed["final"]["first_pass_mAP"] == pytest.approx(eager["final"]["first_pass_mAP"], abs=1e-6)


def test_compile_mode_is_checked():
    with pytest.raises(ConfigError, match="compile_mode"):
        load_config(None, ["compile_mode=fast"])
    with pytest.raises(ConfigError, match="'compile'"):
        load_config(None, ["compile=yes please"])
