"""The bundled long-tailed digits dataset: profile, groups, objects, boxes, split format."""
import json
import os
import pickle

import numpy as np
import pytest

from cssfe.data import bundled, split_files
from cssfe.data.bundled import CLASS_NAMES, LT_VOC_PROFILE


def test_profile_and_groups(bundled_root):
    stats = pickle.load(open(os.path.join(bundled_root, "train", "class_freq.pkl"), "rb"))
    freq = np.asarray(stats["class_freq"])
    assert len(CLASS_NAMES) == len(freq) == 20
    assert sorted(freq.tolist(), reverse=True) == LT_VOC_PROFILE  # exactly LT-VOC's Pareto profile
    assert np.array_equal(freq, stats["gt_labels"].sum(0))
    assert np.array_equal(stats["neg_class_freq"], len(stats["gt_labels"]) - freq)
    split = pickle.load(open(os.path.join(bundled_root, "class_split.pkl"), "rb"))
    assert [len(split[k]) for k in ("head", "middle", "tail")] == [6, 6, 8]
    groups = split_files.class_split_to_groups(split, 20)
    assert np.array_equal(groups, split_files.groups_from_frequencies(freq, 100, 20))


def check_objects_and_boxes(root: str, num_classes: int, canvas: int) -> None:
    """1-4 objects per image, one box per positive class, every box inside the canvas (both bundled datasets)."""
    boxes = json.load(open(os.path.join(root, "boxes.json")))["boxes"]
    for split in ("train", "test"):
        ids, labels = split_files.read_split(root, split, num_classes)
        counts = labels.sum(1)
        assert counts.min() >= 1 and counts.max() <= 4
        for image_id, row in zip(ids, labels):
            image_boxes = boxes[image_id]
            assert sorted(b[0] for b in image_boxes) == np.flatnonzero(row).tolist()
            for _, x0, y0, x1, y1 in image_boxes:
                assert 0 <= x0 < x1 <= canvas and 0 <= y0 < y1 <= canvas


def test_images_objects_and_boxes(bundled_root):
    check_objects_and_boxes(bundled_root, 20, bundled.CANVAS)
    ids, test_labels = split_files.read_split(bundled_root, "test", 20)
    test_freq = test_labels.sum(0)
    assert test_freq.min() >= 0.6 * test_freq.mean() and test_freq.max() <= 1.4 * test_freq.mean()
    from PIL import Image

    with Image.open(split_files.find_image(bundled_root, ids[0])) as img:
        assert img.size == (bundled.CANVAS, bundled.CANVAS) and img.mode == "RGB"


def test_test_sources_never_in_training():
    _, labels = bundled._load_mnist()
    train_pool, test_pool = bundled._source_pools(labels)
    train_idx = np.concatenate(list(train_pool.values()))
    test_idx = np.concatenate(list(test_pool.values()))
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    for d in range(10):
        assert (labels[train_pool[d]] == d).all() and (labels[test_pool[d]] == d).all()


def test_generation_is_deterministic():
    mnist, labels = bundled._load_mnist()
    pool = bundled._source_pools(labels)[0]
    a = bundled._render(np.random.default_rng(5), [3, 8], mnist, pool)
    b = bundled._render(np.random.default_rng(5), [3, 8], mnist, pool)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    sets = [bundled._train_label_sets(np.random.default_rng(1), np.array(LT_VOC_PROFILE)) for _ in range(2)]
    assert sets[0] == sets[1]


def test_label_packing_hits_counts_exactly():
    counts = np.array([50, 9, 3, 1, 0, 20])
    sets = bundled._train_label_sets(np.random.default_rng(0), counts)
    got = np.zeros_like(counts)
    for s in sets:
        assert len(set(s)) == len(s) and 1 <= len(s) <= 4
        got[s] += 1
    assert np.array_equal(got, counts)


def test_split_format_round_trip_and_errors(tmp_path):
    root = str(tmp_path)
    ids = {"train": ["a", "b", "c"], "test": ["d"]}
    sets = {"train": [[0], [0, 2], [1]], "test": [[2]]}
    groups = split_files.write_split_folder(root, ["x", "y", "z"], ids, sets, head_min=2, tail_max=2)
    assert groups.tolist() == [0, 2, 2]
    got_ids, labels = split_files.read_split(root, "train", 3)
    assert got_ids == ids["train"] and labels.tolist() == [[1, 0, 0], [1, 0, 1], [0, 1, 0]]
    stats = pickle.load(open(tmp_path / "train" / "class_freq.pkl", "rb"))
    assert stats["condition_prob"][0, 2] == pytest.approx(0.5)  # P(z | x)
    # The LT-COCO id file is plain text despite its .pkl name; a real pickle works too.
    (tmp_path / "img_id.pkl").write_text("123\n456\n")
    assert split_files.read_id_list(str(tmp_path / "img_id.pkl")) == ["123", "456"]
    pickle.dump([7, 8], open(tmp_path / "real.pkl", "wb"))
    assert split_files.read_id_list(str(tmp_path / "real.pkl")) == ["7", "8"]
    with pytest.raises(split_files.SplitFormatError, match="gt_labels has shape"):
        split_files.read_split(root, "train", 4)
    (tmp_path / "train" / "img_id.txt").write_text("a\nb\n")
    with pytest.raises(split_files.SplitFormatError, match="3 label rows.*lists 2"):
        split_files.read_split(root, "train", 3)
    with pytest.raises(split_files.SplitFormatError, match="not found"):
        split_files.find_image(root, "a")


def test_minilm_sees_which_classes_share_a_shape():
    """Every class's nearest label under the packaged encoder is the other size of the same digit."""
    import torch

    from cssfe.models.text_encoders import label_embeddings

    emb = label_embeddings("minilm", CLASS_NAMES)
    sim = emb @ emb.t()
    sim.fill_diagonal_(-2)
    nearest = sim.argmax(1)
    for i, j in enumerate(nearest.tolist()):
        assert CLASS_NAMES[i].split()[1] == CLASS_NAMES[j].split()[1], (CLASS_NAMES[i], CLASS_NAMES[j])
    assert torch.isfinite(emb).all()
