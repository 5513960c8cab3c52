"""``launch/prepare_data.py``: counts against the published ones, split files written or verified,
a failing exit with the reason; and a user's own VOC folder that trains end to end."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from format_builders import make_lt_coco, make_lt_voc, make_odir, make_own_voc

from cssfe.data.prepare import main
from cssfe.data.published import published_split

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_complete_lt_voc_passes_and_gets_its_split_files(tmp_path):
    # The published sizes: 1,142 training images (ids and labels from the published split) and
    # 4,952 test images, as 8-pixel JPEGs.
    make_lt_voc(tmp_path, n_train=1142, n_test=4952, size=8)
    os.remove(tmp_path / "longtail2012" / "img_id.txt")  # only images and annotations: ids come from the package
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "prepare_data.py"), "--dataset", "lt-voc", "--root", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "1,142   (published: 1,142)" in out and "4,952   (published: 4,952)" in out
    assert "6/6/8   (published: 6/6/8)" in out and "OK: ready to train" in out
    folder = tmp_path / "longtail2012"
    pub = published_split("lt_voc")
    assert (folder / "img_id.txt").read_text().split() == pub.train_ids
    stats = pickle.load(open(folder / "class_freq.pkl", "rb"))
    assert stats["gt_labels"].shape == (1142, 20)
    assert stats["class_freq"].tolist() == json.load(open(os.path.join(ROOT, "cssfe", "data", "published", "lt_voc_split.json")))["class_freq"]
    split = pickle.load(open(folder / "class_split.pkl", "rb"))
    assert {k: sorted(v) for k, v in split.items()} == {k: np.flatnonzero(pub.groups == g).tolist() for g, k in enumerate(("head", "middle", "tail"))}
    # A second run reads the files it wrote and checks them against the annotations.
    assert main(["--dataset", "lt-voc", "--root", str(tmp_path)]) == 0


def test_incomplete_or_broken_dataset_fails_naming_the_problem(tmp_path, capsys):
    ids = make_lt_voc(tmp_path)
    (tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages" / f"{ids['test'][0]}.jpg").write_bytes(b"\xff\xd8broken")
    assert main(["--dataset", "lt-voc", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM: training images: 24, expected 1,142" in out
    assert "PROBLEM: test images: 6, expected 4,952" in out
    assert f"PROBLEM: 1 unreadable image file(s): {tmp_path}/VOCdevkit/VOC2007/JPEGImages/{ids['test'][0]}.jpg" in out
    assert "FAILED" in out
    os.remove(tmp_path / "VOCdevkit" / "VOC2007" / "Annotations" / f"{ids['test'][1]}.xml")
    assert main(["--dataset", "lt-voc", "--root", str(tmp_path)]) == 1
    assert f"error: no annotation for image '{ids['test'][1]}'" in capsys.readouterr().err
    assert main(["--dataset", "lt-vok", "--root", str(tmp_path)]) == 2
    assert "data.name" in capsys.readouterr().err


def test_own_voc_folder_prepared_then_trained_end_to_end(tmp_path, capsys, one_thread):
    data_root = tmp_path / "mydata"
    make_own_voc(data_root)
    assert main(["--dataset", "voc", "--root", str(data_root), "data.head_min=20", "data.tail_max=5"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {data_root}/class_freq.pkl" in out and "1/1/1" in out
    assert pickle.load(open(data_root / "class_split.pkl", "rb")) == {"head": {0}, "middle": {1}, "tail": {2}}
    assert main(["--dataset", "voc", "--root", str(data_root), "--no-write"]) == 0
    assert "read and checked against the labels" in capsys.readouterr().out

    from cssfe.config import load_config
    from cssfe.engine.train import train

    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "progress=false", "data.name=voc", f"data.root={data_root}",
                             "data.image_size=32", "data.augment=none", "data.batch_size=8", "model.embedding=rie",
                             "model.dim=16", "optim.epochs=2"])
    result = train(cfg)
    assert len(result["final"]["per_class_ap"]) == 3
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(saved["final"]["mAP"]) == {"total", "head", "medium", "tail"}
    assert np.isfinite(saved["final"]["mAP"]["total"])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


@pytest.mark.parametrize("name", ["lt_voc", "lt_coco", "odir5k"])
def test_dataset_configs_hold_the_reference_recipe(name):
    from cssfe.config import load_config
    from cssfe.losses import LOSSES

    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    assert cfg.data.name == name and cfg.data.image_size == 448 and cfg.data.augment == "natural"
    assert cfg.model.backbone == "resnet50" and cfg.model.pretrained and cfg.model.embedding == "clip"
    assert cfg.model.prompt == "a photo of {}." and cfg.loss.name == "asl"
    assert cfg.optim.epochs == 80 and cfg.optim.ema_decay == 0.998
    LOSSES.build(cfg.loss.name, **cfg.loss.params)  # the loss accepts the recipe's parameters


def test_lt_coco_and_odir5k_release_layouts(tmp_path, capsys):
    """The command on the other two releases' layouts: LT-COCO (train2017/val2017, instances JSON,
    longtail2017 id list) is read, counted against the published numbers and refused while
    incomplete, writing no split files; ODIR-5K (Training Images + data.csv, a seeded patient split)
    is read and gets its split files."""
    coco, odir = tmp_path / "coco", tmp_path / "odir"
    make_lt_coco(coco)
    assert main(["--dataset", "lt-coco", "--root", str(coco)]) == 1
    out = capsys.readouterr().out
    assert "training images            20   (published: 1,909)" in out
    assert "22/33/25   (published: 22/33/25)" in out and "PROBLEM: test images: 5, expected 5,000" in out
    assert not (coco / "longtail2017" / "class_freq.pkl").exists()
    make_odir(odir, n=10)
    assert main(["--dataset", "odir5k", "--root", str(odir)]) == 0
    out = capsys.readouterr().out
    assert "training images             8" in out and "test images                 2" in out and "OK: ready to train" in out
    train_ids = (odir / "train.txt").read_text().split()
    test_ids = (odir / "test.txt").read_text().split()
    assert len(train_ids) == 8 and len(test_ids) == 2 and not set(train_ids) & set(test_ids)  # patients, not eyes
    assert (odir / "class_freq.pkl").is_file() and (odir / "class_split.pkl").is_file()
