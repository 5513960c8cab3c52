"""Bad data: each case has a documented outcome (docs/reliability.md)."""
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from cssfe.config import load_config
from cssfe.data import SplitFormatError, load_split_folder
from cssfe.data.images import to_rgb
from cssfe.data.split_files import write_split_folder

NAMES = ["cat", "dog", "bird"]


def _folder(tmp_path, n_train=6, n_test=3):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    ids = {"train": [f"tr{i}" for i in range(n_train)], "test": [f"te{i}" for i in range(n_test)]}
    sets = {"train": [[i % 3] for i in range(n_train)], "test": [[i % 3] for i in range(n_test)]}
    rng = np.random.default_rng(0)
    for split in ids:
        for image_id in ids[split]:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{image_id}.png")
    write_split_folder(str(root), NAMES, ids, sets, head_min=3, tail_max=1)
    return root


def _cfg(**data):
    cfg = load_config(None, ["data.image_size=16", "data.augment=none"])
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_truncated_and_non_image_files_are_skipped_counted_and_named(tmp_path, capsys):
    root = _folder(tmp_path)
    data = (root / "images" / "tr1.png").read_bytes()
    (root / "images" / "tr1.png").write_bytes(data[: len(data) // 2])  # truncated
    (root / "images" / "te2.png").write_bytes(b"this is not a png")
    loaded = load_split_folder(str(root), _cfg().data)
    assert len(loaded.train) == 5 and len(loaded.test) == 2
    assert sorted(os.path.basename(p) for p, _ in loaded.skipped) == ["te2.png", "tr1.png"]
    assert loaded.test_ids == ["te0", "te1"]
    assert "left out 2 unreadable image(s)" in capsys.readouterr().err
    loaded.train[4]  # the remaining items still load


def test_unreadable_images_can_be_made_fatal(tmp_path):
    root = _folder(tmp_path)
    (root / "images" / "tr3.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(SplitFormatError, match="tr3.png"):
        load_split_folder(str(root), _cfg(on_bad_image="error").data)


def test_missing_image_stops_before_training(tmp_path):
    root = _folder(tmp_path)
    os.remove(root / "images" / "te1.png")
    with pytest.raises(SplitFormatError, match="'te1' not found"):
        load_split_folder(str(root), _cfg().data)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "I;16", "I", "F", "1"])
def test_unusual_modes_become_8bit_rgb(tmp_path, mode):
    root = _folder(tmp_path)
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 200)
        assert img.mode == "I;16"
    elif mode in ("I", "F"):
        img = rgb.convert("L").convert(mode)
    else:
        img = rgb.convert(mode)
    path = root / "images" / ("tr0.tiff" if mode in ("I;16", "I", "F", "CMYK") else "tr0.png")
    os.remove(root / "images" / "tr0.png")
    img.save(path)
    loaded = load_split_folder(str(root), _cfg().data)
    image, labels, _ = loaded.train[0]
    assert image.shape == (3, 16, 16) and labels.tolist() == [1, 0, 0]
    if mode == "I;16":
        converted = np.asarray(to_rgb(Image.open(path)))
        assert converted.max() == round(255 * 200 / 65535 * 255)  # scaled by the 16-bit range, not clipped white


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32bit_and_float_images_are_scaled_by_their_own_range(tmp_path, mode):
    """Row 6 of the reliability table for the I and F modes: values from 1000 to 3000 map linearly
    onto 0..255. Wrong implementations this fails: PIL's own convert (clips everything above 255 to
    white), the 16-bit range of I;16 applied to I (a nearly black image), no rounding (truncation)."""
    values = np.linspace(1000, 3000, 16 * 16).reshape(16, 16)
    img = Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32), mode=mode)
    assert img.mode == mode
    path = tmp_path / "img.tiff"
    img.save(path)
    with Image.open(path) as reread:
        assert reread.mode == mode
        converted = np.asarray(to_rgb(reread))
    assert converted.shape == (16, 16, 3) and (converted[..., 0] == converted[..., 2]).all()
    want = np.round((values - 1000) / 2000 * 255).astype(np.uint8)
    assert (converted[..., 0] == want).all()
    assert converted.min() == 0 and converted.max() == 255 and 0 < np.median(converted) < 255


def test_images_without_labels_are_kept(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for i in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(root / "images" / f"{i}.png")
    write_split_folder(str(root), NAMES, {"train": ["a", "b"], "test": ["c"]}, {"train": [[0], []], "test": [[1]]})
    loaded = load_split_folder(str(root), _cfg().data)
    assert len(loaded.train) == 2 and loaded.train.labels[1].sum() == 0


def _rewrite(path, fn):
    obj = pickle.load(open(path, "rb"))
    pickle.dump(fn(obj), open(path, "wb"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: _rewrite(r / "train" / "class_freq.pkl", lambda d: {**d, "class_freq": d["class_freq"] + 1}), "class_freq disagrees"),
        (lambda r: _rewrite(r / "train" / "class_freq.pkl", lambda d: {**d, "gt_labels": d["gt_labels"][:, :2]}), "gt_labels has shape"),
        (lambda r: (r / "train" / "img_id.txt").write_text("tr0\ntr1\n"), "6 label rows but"),
        (lambda r: _rewrite(r / "class_split.pkl", lambda d: {**d, "tail": {7}}), "class index 7"),
        (lambda r: _rewrite(r / "class_split.pkl", lambda d: {**d, "tail": d["tail"] | d["middle"]}), "in two groups"),
        (lambda r: _rewrite(r / "class_split.pkl", lambda d: {"head": d["head"], "tail": d["tail"]}), "missing key"),
        (lambda r: _rewrite(r / "class_split.pkl", lambda d: {"head": set(), "middle": set(), "tail": set()}), "in no group"),
        (lambda r: (r / "class_split.pkl").write_bytes(b"not a pickle"), "cannot be unpickled"),
        (lambda r: (r / "classes.txt").write_text("cat\ncat\ndog\n"), "duplicate class names"),
        (lambda r: os.remove(r / "classes.txt"), "class list not found"),
        (lambda r: os.remove(r / "test" / "img_id.txt"), "image id list not found"),
        (lambda r: _rewrite(r / "train" / "class_freq.pkl", lambda d: [1, 2]), "expected a dict"),
    ],
    ids=["freq-vs-labels", "class-count", "id-count", "split-index", "split-overlap", "split-key", "split-empty",
         "split-not-pickle", "duplicate-names", "no-classes", "no-id-list", "freq-not-dict"],
)
def test_split_files_that_disagree_stop_with_the_file_named(tmp_path, damage, message):
    root = _folder(tmp_path)
    damage(root)
    with pytest.raises(SplitFormatError, match=message):
        load_split_folder(str(root), _cfg().data)


def test_dataset_folder_missing(tmp_path):
    with pytest.raises(SplitFormatError, match="dataset folder not found"):
        load_split_folder(str(tmp_path / "nope"), _cfg().data)


# --------------------------------------------------------------------------------------------------
# degenerate data: nothing trains on nothing; classes without positives are named
# --------------------------------------------------------------------------------------------------
def _corrupt(root, *ids):
    for image_id in ids:
        (root / "images" / f"{image_id}.png").write_bytes(b"not an image")


def test_no_readable_training_image_is_fatal_naming_the_list(tmp_path, data_cfg):
    """A VOC-format folder whose training list holds only unreadable images stops before training."""
    from format_builders import make_own_voc

    from cssfe.data import build_data

    own = make_own_voc(tmp_path, n_train=4, n_test=3)
    for image_id in own["train"]:
        (tmp_path / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(SplitFormatError, match=rf"no readable training image: {tmp_path / 'train.txt'}: all 4 of its "
                                               r"images were unreadable and left out \(first: .*tr000.jpg\)"):
        build_data(data_cfg("voc", tmp_path), cache_dir=str(tmp_path / "cache"), progress=False)


def test_no_readable_test_image_is_fatal_naming_the_list(tmp_path):
    root = _folder(tmp_path)
    _corrupt(root, "te0", "te1", "te2")
    with pytest.raises(SplitFormatError, match=rf"no readable test image: {root / 'test' / 'img_id.txt'}: all 3 of its"):
        load_split_folder(str(root), _cfg().data)


def test_test_set_without_any_positive_is_fatal_naming_the_list(tmp_path):
    """No class has a positive among the test images: no AP and no mean is defined (the run's
    "best" epoch would compare nothing). Wrong implementation it catches: only warning per class."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    ids = {"train": [f"tr{i}" for i in range(4)], "test": [f"te{i}" for i in range(3)]}
    sets = {"train": [[0], [1], [2], [0]], "test": [[], [], []]}
    for split in ids:
        for image_id in ids[split]:
            Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "images" / f"{image_id}.png")
    write_split_folder(str(root), NAMES, ids, sets, head_min=2, tail_max=1)
    with pytest.raises(SplitFormatError, match=r"no positive label in the test set: .*none of its 3 images"):
        load_split_folder(str(root), _cfg().data)


def test_class_lost_to_unreadable_files_is_named(tmp_path, capsys):
    root = _folder(tmp_path)
    _corrupt(root, "tr2", "tr5")  # every training image of 'bird'
    loaded = load_split_folder(str(root), _cfg().data)
    assert loaded.class_freq.tolist() == [2, 2, 0]  # the images that remain
    assert len(loaded.notes) == 1
    assert "'bird' (medium) lost every training image to unreadable files (e.g. " in loaded.notes[0]
    assert "tr2.png" in loaded.notes[0] and "'bird'" in capsys.readouterr().err


def test_classes_without_training_or_test_positives_are_named(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    ids = {"train": [f"tr{i}" for i in range(4)], "test": [f"te{i}" for i in range(3)]}
    sets = {"train": [[0], [1], [0], [1]], "test": [[0], [2], [2]]}  # bird never trained, dog never tested
    for split in ids:
        for image_id in ids[split]:
            Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "images" / f"{image_id}.png")
    write_split_folder(str(root), NAMES, ids, sets, head_min=2, tail_max=1)
    loaded = load_split_folder(str(root), _cfg().data)
    train_note, test_note = loaded.notes
    assert train_note.startswith("class(es) 'bird' (tail) have no positive among the 4 training images of "
                                 f"{root / 'train' / 'img_id.txt'}")
    assert test_note.startswith("class(es) 'dog' (head) have no positive among the 3 test images of ")
    assert test_note.endswith("their AP is undefined and left out of the total and head mAP")
    assert "'dog'" in capsys.readouterr().err
    from cssfe.losses import build_loss

    with pytest.raises(ValueError, match=r"class index\(es\) \[2\] are not"):  # a loss weighted by class counts
        build_loss("cb_focal", loaded.class_freq, len(loaded.train))


def test_fewer_images_than_one_batch_is_said_and_fatal_under_deepspeed(tmp_path, capsys):
    from cssfe.data.datasets import check_batch

    loaded = load_split_folder(str(_folder(tmp_path)), _cfg().data)
    check_batch(loaded, 6)
    assert capsys.readouterr().err == ""
    check_batch(loaded, 8)
    assert "the training set has 6 readable images" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"6 readable images .*fewer than one batch \(data.batch_size=8\)"):
        check_batch(loaded, 8, strict=True)


def test_means_name_the_classes_they_leave_out(tmp_path, capsys):
    """metrics (hence metrics.json), the printed table and the report table say which classes each
    mean leaves out, instead of a silently shorter mean."""
    import json

    from cssfe import report
    from cssfe.engine.evaluate import format_table
    from cssfe.metrics import evaluate_scores

    scores = [[0.9, 0.2, 0.1], [0.1, 0.8, 0.3], [0.6, 0.4, 0.2]]
    targets = [[1, 0, 0], [0, 1, 0], [1, 0, 0]]  # 'bird' has no positive
    metrics = evaluate_scores(scores, targets, [0, 1, 2], class_names=NAMES)
    assert metrics["left_out"] == {"total": ["bird"], "head": [], "medium": [], "tail": ["bird"]}
    assert metrics["mAP"]["tail"] is None and metrics["per_class_ap"][2] is None
    assert evaluate_scores(scores, targets, [0, 1, 2])["left_out"]["total"] == [2]  # by index without names
    table = format_table({"final": metrics["mAP"]}, left_out=metrics["left_out"])
    assert table.splitlines()[-1].endswith("total: bird; tail: bird")
    assert format_table({"final": metrics["mAP"]}, left_out=evaluate_scores(scores, [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                                                                           [0, 1, 2])["left_out"]).count("\n") == 1
    runs = []
    for i in range(2):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({"final": {**metrics, "mAP": {"total": 60.0 + i, "head": 70.0,
                                                                                    "medium": 50.0, "tail": None}}}))
        runs.append(str(run))
    assert report.main([f"CSSFE={','.join(runs)}"]) == 0
    out = capsys.readouterr().out
    assert "| CSSFE | 60.50 ± 0.71 | 70.00 ± 0.00 | 50.00 ± 0.00 | n/a | 2 |" in out
    assert "- CSSFE: left out of the means (no positive in the test set, AP undefined) -- total: bird; tail: bird" in out


def test_a_run_names_the_classes_its_means_leave_out(tmp_path, capsys, caplog):
    """Training end to end on a folder whose test set lacks a class and whose training set is
    smaller than one batch: both are said, and metrics.json and the final table name the class."""
    import json

    from cssfe.engine.train import train

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    ids = {"train": [f"tr{i}" for i in range(6)], "test": [f"te{i}" for i in range(4)]}
    sets = {"train": [[i % 3] for i in range(6)], "test": [[0], [1], [0], [1]]}  # no 'bird' to test
    rng = np.random.default_rng(0)
    for split in ids:
        for image_id in ids[split]:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{image_id}.png")
    write_split_folder(str(root), NAMES, ids, sets, head_min=3, tail_max=1)
    cfg = load_config(None, ["data.name=split_folder", f"data.root={root}", "data.image_size=16", "data.augment=none",
                             "data.batch_size=8", "model.embedding=rie", "model.dim=8", "optim.epochs=1",
                             f"output_dir={tmp_path / 'run'}"])
    import logging

    with caplog.at_level(logging.INFO, logger="cssfe"):  # the final table is a log record
        result = train(cfg)
    captured = capsys.readouterr()
    assert "the training set has 6 readable images" in captured.err and "fewer than one batch" in captured.err
    assert "'bird' (medium) have no positive among the 4 test images" in captured.err
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stored["final"]["left_out"] == result["final"]["left_out"] == {"total": ["bird"], "head": [],
                                                                          "medium": ["bird"], "tail": []}
    assert "left out of the means (no positive in the evaluation set, AP undefined) -- total: bird; medium: bird" in caplog.text
