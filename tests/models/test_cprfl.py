"""The CPRFL head: shapes, gradients and its two gradient stops, every kernels setting, and one tiny
training through the command line followed by checkpoint loading, evaluate, predict, visualize, export."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cssfe.ops
from cssfe.models.cprfl import CPRFLHead
from cssfe.models.heads import HEADS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B, D, H, W, C, E = 2, 6, 3, 4, 5, 7


def _head(**options) -> CPRFLHead:
    torch.manual_seed(0)
    return CPRFLHead(D, C, torch.randn(C, E), dim=16, heads=2, dropout=0.0, **options)


def _feats(requires_grad: bool = False) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(B, D, H, W, requires_grad=requires_grad)


def _grads(head: CPRFLHead, feats: torch.Tensor):
    """Gradients of a fixed weighting of the logits: every parameter's (zeros where none arrives), and the features'."""
    weights = torch.linspace(-1, 1, B * C).view(B, C)
    params = dict(head.named_parameters())
    found = torch.autograd.grad((head(feats)["logits"] * weights).sum(), [*params.values(), feats], allow_unused=True)
    tensors = [*params.values(), feats]
    out = {name: torch.zeros_like(t) if g is None else g for name, t, g in zip([*params, "feats"], tensors, found)}
    return out


def test_shapes_maps_and_both_attention_paths_agree():
    head = _head().eval()
    feats = _feats()
    plain = head(feats)
    with_maps = head(feats, return_maps=True)
    assert plain["logits"].shape == (B, C) and set(plain) == {"logits"}
    maps = with_maps["maps"]
    assert maps.shape == (B, C, H * W)
    # a prompt's attention over the visual tokens: a part of its softmax row (the rest is on the prompts)
    assert (maps >= 0).all() and (maps.sum(-1) < 1).all() and (maps.sum(-1) > 0).all()
    # the fused attention (no maps) and the explicit softmax (maps) compute the same logits
    torch.testing.assert_close(with_maps["logits"], plain["logits"], rtol=1e-5, atol=1e-6)
    assert head.has_class_maps and HEADS.get("cprfl") is not None


def test_scores_are_each_prompt_token_dot_its_prompt():
    head = _head().eval()
    feats = _feats()
    prompts = head.prompts(feats.dtype)
    x = torch.cat([head.visual(feats.flatten(2).transpose(1, 2)), prompts.expand(B, -1, -1)], 1)
    for layer in head.layers:
        x, _ = layer(x)
    want = torch.einsum("bcd,cd->bc", x[:, H * W:], prompts)
    torch.testing.assert_close(head(feats)["logits"], want)


@pytest.mark.parametrize("residual", [False, True])
def test_every_parameter_and_the_features_get_gradients(residual):
    head = _head(residual=residual, learnable_embeddings=True)
    grads = _grads(head, _feats(requires_grad=True))
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        assert g.abs().sum() > 0, f"no gradient reaches {name}"


def test_each_gradient_stop_blocks_exactly_its_path():
    """logit = <z(P, F), P>: the gradient is the encoder path (through z) plus the classifier-weight
    path (through the second P). stop_feature_grad keeps only the second, stop_prompt_grad only the
    first; nothing else changes, so per tensor the two stopped gradients add up to the full one."""
    feats = _feats(requires_grad=True)
    full = _head(learnable_embeddings=True)
    stopped = {}
    for switch in ("stop_feature_grad", "stop_prompt_grad"):
        head = _head(learnable_embeddings=True, **{switch: True})
        head.load_state_dict(full.state_dict())
        torch.testing.assert_close(head(feats)["logits"], full(feats)["logits"])  # forward unchanged
        stopped[switch] = _grads(head, feats)
    g_full = _grads(full, feats)
    for name in g_full:
        torch.testing.assert_close(stopped["stop_feature_grad"][name] + stopped["stop_prompt_grad"][name], g_full[name],
                                   rtol=1e-4, atol=1e-6, msg=f"paths of {name} do not add up")
    prompt_side = {n for n in g_full if n.startswith("prompt_mlp") or n == "embeddings"}
    for name, g in stopped["stop_feature_grad"].items():
        if name in prompt_side:  # only the classifier-weight path is left, and it is not zero
            assert g.abs().sum() > 0 and not torch.allclose(g, g_full[name]), name
        else:  # encoder, visual projection, backbone features: reached only through the encoder output
            assert g.abs().sum() == 0, name
    for name, g in stopped["stop_prompt_grad"].items():
        if name in prompt_side:  # the prompts still learn, through the encoder only
            assert g.abs().sum() > 0 and not torch.allclose(g, g_full[name]), name
        else:  # the classifier-weight path never reached these: untouched
            torch.testing.assert_close(g, g_full[name], msg=name)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"label embeddings must be \[5 classes"):
        CPRFLHead(D, C, torch.randn(C + 1, E))
    with pytest.raises(ValueError, match="stop_feature_grad and stop_prompt_grad"):
        CPRFLHead(D, C, torch.randn(C, E), stop_feature_grad=True, stop_prompt_grad=True)


def test_uses_no_custom_kernel(native_backend):
    """Standard ops only, so every kernels setting runs it the same: no cssfe:: operator reaches the
    dispatcher in the forward or the backward (a wrong implementation it catches: the head calling
    cssfe.ops.class_attention, however imported)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.namespaces = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.namespaces.add(func.namespace)
            return func(*args, **(kwargs or {}))

    head = _head()
    # the cpu backend: a cssfe.ops call would reach the dispatcher as a cssfe:: operator
    with cssfe.ops.use_backend("cpu"), Recorder() as seen:
        out = head(_feats(), return_maps=True)
        out["logits"].sum().backward()
    assert "aten" in seen.namespaces and "cssfe" not in seen.namespaces, seen.namespaces


def test_config_options_reach_the_head_and_bad_keys_are_named(tmp_path):
    from cssfe.config import ConfigError, load_config
    from cssfe.models.model import build_model

    cfg = load_config(None, ["model.head=cprfl", "model.embedding=rie", "model.dim=32",
                             "model.head_options={depth: 2, heads: 4, stop_prompt_grad: true}"])
    model = build_model(cfg.model, [f"c{i}" for i in range(C)], [0, 0, 1, 2, 2], 32, cache_dir=str(tmp_path))
    head = model.head
    assert isinstance(head, CPRFLHead) and len(head.layers) == 2 and head.layers[0].heads == 4
    assert head.stop_prompt_grad and isinstance(head.embeddings, torch.nn.Parameter)  # RIE: learnable prompts
    # mistakes are named when the config is read, before any data or model is built
    with pytest.raises(ConfigError, match="model.head_options.*'depht'"):
        load_config(None, ["model.head=cprfl", "model.head_options={depht: 2}"])
    with pytest.raises(ConfigError, match="model.head_options.*together"):
        load_config(None, ["model.head=cprfl", "model.head_options={stop_feature_grad: true, stop_prompt_grad: true}"])
    with pytest.raises(ConfigError, match="model.head_options' applies to model.head=cprfl, not 'cssfe'"):
        load_config(None, ["model.head_options={depth: 2}"])


@pytest.fixture(scope="module")
def cprfl_run(tmp_path_factory):
    """One epoch of CPRFL through the training command, on a tiny LT-VOC tree (24 + 6 images, 32 px),
    with learnable random label embeddings (no text model to load; the checkpoint must carry them)."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "data"))
    from format_builders import make_lt_voc

    root = tmp_path_factory.mktemp("lt_voc")
    make_lt_voc(str(root))
    out = root / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--output-dir", str(out), "model.head=cprfl",
         "data.name=lt_voc", f"data.root={root}", "data.image_size=32", "data.batch_size=8", "optim.epochs=1", "model.embedding=rie", "model.dim=32",
         "progress=false"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out / "checkpoints" / "last.pt"


def test_trained_head_round_trips_evaluates_predicts_visualizes_and_exports(cprfl_run, tmp_path):
    from PIL import Image

    from cssfe.data.images import read_rgb
    from cssfe.data.transforms import build_transform
    from cssfe.engine.evaluation import evaluate_checkpoint
    from cssfe.engine.export import export_model
    from cssfe.engine.inference import load_trained
    from cssfe.engine.prediction import predict_files
    from cssfe.explain.visualize import render_grid
    from cssfe.ops import kernel_backend

    root, ckpt = cprfl_run
    trained = load_trained(str(ckpt))
    assert isinstance(trained.model.head, CPRFLHead)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    weights = state["ema"] if "ema" in state else state["model"]
    for key, value in trained.model.state_dict().items():  # the checkpoint's weights, label embeddings included
        torch.testing.assert_close(value, weights[key], msg=key)

    metrics = evaluate_checkpoint(str(ckpt), str(tmp_path / "eval"), overrides=["kernels=reference"])
    assert 0 <= metrics["mAP"]["total"] <= 100 and set(metrics["f1"]) == {"weighted", "micro", "macro"}

    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = trained.model(x)["logits"]
        ran = []
        for kernels in ("reference", "cpu", "cuda", "triton"):
            try:
                backend = kernel_backend(kernels)
            except ValueError:  # absent on this machine
                continue
            with backend:
                torch.testing.assert_close(trained.model(x)["logits"], want)
            ran.append(kernels)
    assert "reference" in ran and len(ran) >= 2, ran

    sample = os.path.join(root, "VOCdevkit", "VOC2007", "JPEGImages", "000001.jpg")

    def read_image(path):
        return build_transform(trained.cfg.data.image_size, train=False)(read_rgb(path))[None]
    grid = render_grid(trained, str(tmp_path / "grid.png"), sample, classes=[0, 1])
    with Image.open(grid) as img:
        assert img.size[0] >= int(3 * 2.1 * 90) - 5  # image, prompt attention, Grad-CAM
        assert np.asarray(img.convert("L")).std() > 10

    diff = export_model(trained, str(tmp_path / "model.pt2"))
    exported = torch.export.load(str(tmp_path / "model.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), torch.sigmoid(want), atol=1e-5, rtol=0)
    assert diff <= 1e-5

    lines = io.StringIO()
    assert predict_files(trained, [sample], out=lines) == []
    line = json.loads(lines.getvalue())
    assert list(line["scores"]) == trained.class_names
    assert list(line["scores"].values()) == pytest.approx(torch.sigmoid(trained.model(read_image(sample))["logits"])[0].tolist(), abs=1e-6)


def test_methods_studies_compare_the_heads_on_one_recipe_and_report_f1(tmp_path):
    from cssfe.config import to_dict
    from cssfe.sweep.runner import trial_record
    from cssfe.sweep.studies import load_study
    from cssfe.sweep.summary import summary_markdown, write_summary

    for name, data in (("methods", "bundled"), ("methods_coco", "bundled_coco"), ("methods_lt_voc", "lt_voc"),
                       ("methods_lt_coco", "lt_coco"), ("methods_odir5k", "odir5k")):
        study = load_study(name)
        configs = [to_dict(study.trial_config(label, 0)) for label in study.variants]
        assert [c["model"]["head"] for c in configs] == ["baseline", "cssfe", "cprfl"], name
        assert {c["data"]["name"] for c in configs} == {data} and study.seeds == [0, 1, 2]
        for c in configs:  # the same recipe: only the head differs
            c["model"]["head"] = None
        assert all(c == configs[0] for c in configs), name

    # a finished trial reports the F1 of its metrics.json to Tune, its record carries it, and the
    # report has the F1 table
    from cssfe.sweep.trainable import final_metrics

    study = load_study("methods")
    records = []
    for label, seed, f1 in (("CSSFE", 0, 0.7), ("CSSFE", 1, 0.8), ("CPRFL", 0, 0.6)):
        mAP = {"total": 50.0, "head": 60.0, "medium": 50.0, "tail": 40.0}
        final = {"mAP": mAP, "f1": {"weighted": f1, "micro": f1 - 0.1, "macro": f1 - 0.2}}
        reported = {**final_metrics(study.trial_config(label, seed), final), "finished": True}
        records.append(trial_record({"trial": {"variant": label, "seed": seed}}, reported))
    assert records[0]["f1_weighted"] == 0.7 and records[2]["f1_macro"] == pytest.approx(0.4)
    text = summary_markdown(study, records)
    assert "| variant | class-weighted F1 | micro F1 | macro F1 | n |" in text and "threshold 0.5" in text
    assert "| CSSFE | 0.750 ± 0.071 | 0.650 ± 0.071 | 0.550 ± 0.071 | 2 |" in text
    assert "| CPRFL | 0.600 ± 0.000 | 0.500 ± 0.000 | 0.400 ± 0.000 | 1 |" in text
    paths = write_summary(study, records, str(tmp_path / "report"))
    rows = open(paths["f1_csv"]).read().splitlines()
    assert rows[0].startswith("variant,n,f1_weighted_mean,f1_weighted_std") and rows[1].startswith("CSSFE,2,0.7500,0.0707")


def test_sweep_digests_of_runs_from_before_head_options_are_unchanged(monkeypatch):
    """Trials are reused across studies by config digest: the new key, left empty, must not move them."""
    import cssfe.config
    from cssfe.config import load_config
    from cssfe.sweep.studies import config_hash

    cfg = load_config(None)
    with_key = config_hash(cfg)
    real = cssfe.config.to_dict

    def schema_before(c):  # before head_options and the logging section (console keys only) existed
        values = real(c)
        del values["model"]["head_options"], values["logging"]
        return values

    monkeypatch.setattr(cssfe.config, "to_dict", schema_before)
    assert config_hash(cfg) == with_key
    monkeypatch.undo()
    assert config_hash(load_config(None, ["model.head=cprfl", "model.head_options={depth: 2}"])) != \
        config_hash(load_config(None, ["model.head=cprfl"]))
