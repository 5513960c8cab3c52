"""The scan for unreadable images runs once per set of files: the other ranks of a launch (and the
next run) read what the first load, or ``launch/prepare_data.py``, recorded in the cache."""
import numpy as np
import pytest
from format_builders import make_own_voc
from PIL import Image

from cssfe.data import build_data
from cssfe.data.prepare import check_dataset
from cssfe.data.split_files import write_split_folder


@pytest.fixture
def decodes(monkeypatch):
    """Count the image files opened (every scan opens each file once)."""
    opened = []
    real = Image.open

    def counting(fp, *args, **kwargs):
        opened.append(str(fp))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return opened


def _split_folder(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    ids = {"train": [f"tr{i}" for i in range(6)], "test": [f"te{i}" for i in range(3)]}
    rng = np.random.default_rng(0)
    for image_id in ids["train"] + ids["test"]:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{image_id}.png")
    (root / "images" / "tr4.png").write_bytes(b"not an image")
    sets = {split: [[i % 3] for i in range(len(ids[split]))] for split in ids}
    write_split_folder(str(root), ["cat", "dog", "bird"], ids, sets, head_min=3, tail_max=1)
    return root


def test_a_second_load_of_the_same_files_decodes_nothing(tmp_path, data_cfg, decodes):
    """What rank 0 found, every other rank reads: no image decoded twice, the same images left out."""
    root, cache = _split_folder(tmp_path), str(tmp_path / "cache")
    cfg = data_cfg("split_folder", root)
    first = build_data(cfg, cache, progress=False)
    assert len(decodes) == 9 and [p.split("/")[-1] for p, _ in first.skipped] == ["tr4.png"]
    decodes.clear()
    second = build_data(cfg, cache, progress=False)
    assert decodes == []
    assert second.skipped == first.skipped and second.train.paths == first.train.paths


def test_a_changed_image_is_decoded_again(tmp_path, data_cfg, decodes):
    root, cache = _split_folder(tmp_path), str(tmp_path / "cache")
    cfg = data_cfg("split_folder", root)
    build_data(cfg, cache, progress=False)
    (root / "images" / "te1.png").write_bytes(b"broken since")
    decodes.clear()
    again = build_data(cfg, cache, progress=False)
    assert len(decodes) == 3  # the test split again; the training split's record still holds
    assert sorted(p.split("/")[-1] for p, _ in again.skipped) == ["te1.png", "tr4.png"]


def test_training_after_prepare_data_decodes_no_image(tmp_path, data_cfg, decodes):
    """``prepare_data.py`` before the launch: the ranks' start-up reads its scan."""
    make_own_voc(tmp_path / "voc", n_train=12, n_test=4, size=8)
    cfg, cache = data_cfg("voc", tmp_path / "voc"), str(tmp_path / "cache")
    assert check_dataset(cfg, cache_dir=cache).ok
    assert len(decodes) == 16
    decodes.clear()
    data = build_data(cfg, cache, progress=False)
    assert decodes == [] and len(data.train) == 12
