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
