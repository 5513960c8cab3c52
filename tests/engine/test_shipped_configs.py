"""Every loss and every shipped config, end to end on tiny data: one or two epochs at a small image
size, everything else as shipped, each run asserting finite losses and the outputs the docs promise."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cssfe.engine.train as train_module
from cssfe.config import load_config
from cssfe.data.split_files import write_split_folder
from cssfe.engine.train import train
from cssfe.losses import LOSSES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASSES = ["cat", "dog", "bird", "fish"]
# labels of the training images: a long tail (cat in 8 images, fish in 1); "tr3" is made unreadable
TRAIN_LABELS = [[0], [0, 1], [0], [0, 2], [0], [0, 1], [0], [0, 3], [1], [2], [0, 1], [1, 2]]
TEST_LABELS = [[0], [1], [2], [3], [0, 2]]


@pytest.fixture(scope="module")
def long_tailed_folder(tmp_path_factory):
    """A split folder of 12 training images (one truncated) and 5 test images over 4 classes."""
    root = tmp_path_factory.mktemp("folder")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    ids = {"train": [f"tr{i}" for i in range(len(TRAIN_LABELS))], "test": [f"te{i}" for i in range(len(TEST_LABELS))]}
    for split in ids:
        for image_id in ids[split]:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{image_id}.png")
    data = (root / "images" / "tr3.png").read_bytes()
    (root / "images" / "tr3.png").write_bytes(data[: len(data) // 2])
    write_split_folder(str(root), CLASSES, ids, {"train": TRAIN_LABELS, "test": TEST_LABELS}, head_min=5, tail_max=2)
    return root


def _finite_log(out):
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log and all(math.isfinite(r["train_loss"]) for r in log), log
    return log


@pytest.mark.parametrize("loss", LOSSES.names())
def test_every_loss_trains_on_the_class_frequencies_of_the_data(loss, long_tailed_folder, tmp_path, monkeypatch):
    """Each registered loss trains one epoch (finite losses, metrics.json, a checkpoint), built with the
    positives per class among the training images that load (tr3 does not: the class counts follow
    the images that remain, the groups stay those of the split files, docs/reliability.md) and the
    number of those images. A loss fed the split files' counts, the test split's, uniform counts or
    the number of listed images fails. The run names the unreadable image in skipped_images.txt with the reason
    (a run that drops the file, or lists nothing, fails)."""
    built = []
    real = train_module.build_loss
    monkeypatch.setattr(train_module, "build_loss", lambda name, freq, n, **kw: built.append((name, list(freq), n))
                        or real(name, freq, n, **kw))
    out = tmp_path / "run"
    cfg = load_config(None, ["data.name=split_folder", f"data.root={long_tailed_folder}", "data.image_size=16",
                             "data.batch_size=4", "optim.epochs=1", "progress=false", f"output_dir={out}",
                             f"loss.name={loss}"])
    result = train(cfg)
    readable = [labels for i, labels in enumerate(TRAIN_LABELS) if i != 3]
    want_freq = [sum(c in labels for labels in readable) for c in range(len(CLASSES))]
    assert [(name, [int(f) for f in freq], n) for name, freq, n in built] == [(loss, want_freq, len(TRAIN_LABELS) - 1)]
    _finite_log(out)
    assert math.isfinite(result["final"]["mAP"]["total"]) and result["skipped_images"] == 1
    assert json.loads((out / "metrics.json").read_text())["final"]["mAP"] == result["final"]["mAP"]
    assert (out / "checkpoints" / "last.pt").is_file()
    skipped = (out / "skipped_images.txt").read_text().splitlines()
    assert len(skipped) == 1
    path, reason = skipped[0].split("\t")
    assert os.path.basename(path) == "tr3.png" and reason.strip()


TINY_CLIP = "cssfe-test-recipe-clip"


@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory):
    """An open_clip model of the recipe's architecture family, small enough to build in a second, and
    its weights as a local checkpoint file (the recipe's "openai" tag needs a download)."""
    import open_clip
    import torch
    from open_clip import factory

    folder = tmp_path_factory.mktemp("clip")
    cfg_file = folder / f"{TINY_CLIP}.json"
    cfg_file.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(cfg_file)
    try:
        torch.manual_seed(0)
        ckpt = folder / "open_clip_pytorch_model.bin"
        torch.save(open_clip.create_model(TINY_CLIP).state_dict(), ckpt)
        yield ckpt
    finally:
        factory._MODEL_CONFIG_PATHS.remove(cfg_file)
        factory._MODEL_CONFIGS.pop(TINY_CLIP, None)


def _tree(name, root):
    sys.path.insert(0, os.path.join(ROOT, "tests", "data"))
    try:
        import format_builders as fb
    finally:
        sys.path.pop(0)
    make = {"lt_voc": lambda r: fb.make_lt_voc(r, n_train=8, n_test=2),
            "lt_coco": lambda r: fb.make_lt_coco(r, n_train=8, n_test=2), "odir5k": lambda r: fb.make_odir(r, n=6)}
    make[name](str(root))


# Changed from the shipped recipe, for a CPU test without downloads: the image size, batch sizes,
# workers (1 of the recipe's 8, still a worker process), epochs, no pretrained weights, a small CLIP
# checkpoint of the same family. Kept: the dataset and its layout, natural augmentation, ResNet50, the
# CSSFE head, the prompt, dim 512, the loss and its parameters, lr, schedule, EMA decay, AMP setting
# (auto: off on CPU; test_amp_and_other_backbones runs optim.amp=on). Batches of 2: OneCycleLR divides
# by zero when pct_start * steps is exactly 1 (5 steps at the recipe's 0.2).
@pytest.mark.parametrize("name", ["lt_voc", "lt_coco", "odir5k"])
def test_recipe_config_trains_on_its_dataset_layout(name, tmp_path, tiny_clip_checkpoint):
    tree = tmp_path / "tree"
    _tree(name, tree)
    config = os.path.join(ROOT, "configs", f"{name}.yaml")
    shipped = load_config(config)
    overrides = [f"data.root={tree}", "data.image_size=32", "data.batch_size=2", "data.eval_batch_size=8",
                 "data.num_workers=1", "optim.epochs=1", "model.pretrained=false", f"output_dir={tmp_path / 'run'}",
                 f"model.embedding_options={{model_name: {TINY_CLIP}, pretrained: '{tiny_clip_checkpoint}'}}",
                 "progress=false"]
    cfg = load_config(config, overrides)
    for key in ("name", "augment"):
        assert getattr(cfg.data, key) == getattr(shipped.data, key)
    assert cfg.model.backbone == shipped.model.backbone == "resnet50" and cfg.loss == shipped.loss
    result = train(cfg)
    out = tmp_path / "run"
    log = _finite_log(out)
    assert [r["epoch"] for r in log] == [1]
    mAP = result["final"]["mAP"]
    assert math.isfinite(mAP["total"]) and set(mAP) == {"total", "head", "medium", "tail"}
    assert (out / "checkpoints" / "best.pt").is_file() and (out / "config.yaml").is_file()


@pytest.mark.parametrize("backbone,amp", [("vgg16", "on"), ("vit_b_16", "off")])
def test_amp_and_other_backbones(backbone, amp, long_tailed_folder, tmp_path):
    """The torchvision backbones the recipes do not name, one epoch at 32 px (ViT-B/16: 2 x 2 patches);
    optim.amp=on (bf16 autocast on CPU) with one of them."""
    out = tmp_path / "run"
    cfg = load_config(None, ["data.name=split_folder", f"data.root={long_tailed_folder}", "data.image_size=32",
                             "data.batch_size=4", "optim.epochs=1", "progress=false", f"output_dir={out}",
                             f"model.backbone={backbone}", f"optim.amp={amp}", "data.augment=natural"])
    result = train(cfg)
    _finite_log(out)
    assert math.isfinite(result["final"]["mAP"]["total"])


@pytest.mark.parametrize("readme_args,want", [
    (["--config", "configs/baseline.yaml"], {"model": {"head": "baseline"}}),
    (["model.mask=false", "loss.name=db", "seed=1"], {"model": {"mask": False}, "loss": {"name": "db"}, "seed": 1}),
], ids=["baseline-config", "db-loss-without-mask"])
def test_readme_training_commands(readme_args, want, long_tailed_folder, tmp_path):
    """The README's two training variants through launch/train.py (baseline.yaml by --config, and
    the DB loss without the mask), on the tiny folder for one epoch: the run's config.yaml holds
    what the command asked for, and metrics.json a finite mAP."""
    import yaml

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *readme_args, "--output-dir", str(out),
                           "data.name=split_folder", f"data.root={long_tailed_folder}", "data.image_size=16",
                           "optim.epochs=1", "progress=false"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    for section, values in want.items():
        if isinstance(values, dict):
            assert {k: resolved[section][k] for k in values} == values
        else:
            assert resolved[section] == values
    _finite_log(out)
    assert math.isfinite(json.loads((out / "metrics.json").read_text())["final"]["mAP"]["total"])


def test_overrides_on_both_sides_of_an_option():
    """``train.py model.mask=false --output-dir D seed=1``: every override kept (argparse's plain
    parse_args refused the ones after the option: 'unrecognized arguments')."""
    from cssfe.engine.cli import parse_args

    args = parse_args(["model.mask=false", "--output-dir", "d", "seed=1", "--resume", "loss.name=db"])
    assert args.overrides == ["model.mask=false", "seed=1", "loss.name=db"] and args.output_dir == "d" and args.resume
