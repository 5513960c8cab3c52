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
    positives per class of the split files' training labels (the group statistics stay those of the
    split files when an unreadable image is left out, docs/reliability.md) and the number of training
    images that load (tr3 does not). A loss fed the test split's counts, uniform counts or the number
    of listed images fails. The run names the unreadable image in skipped_images.txt with the reason
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
    want_freq = [sum(c in labels for labels in TRAIN_LABELS) for c in range(len(CLASSES))]
    assert [(name, [int(f) for f in freq], n) for name, freq, n in built] == [(loss, want_freq, len(TRAIN_LABELS) - 1)]
    _finite_log(out)
    assert math.isfinite(result["final"]["mAP"]["total"]) and result["skipped_images"] == 1
    assert json.loads((out / "metrics.json").read_text())["final"]["mAP"] == result["final"]["mAP"]
    assert (out / "checkpoints" / "last.pt").is_file()
    skipped = (out / "skipped_images.txt").read_text().splitlines()
    assert len(skipped) == 1
    path, reason = skipped[0].split("\t")
    assert os.path.basename(path) == "tr3.png" and reason.strip()
