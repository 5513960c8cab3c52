"""The second bundled dataset (marked digits, LT-COCO's profile): determinism, profile, objects and
boxes, balanced test set, disjoint sources, designed co-occurrence, cache repair, one training run."""
import filecmp
import json
import os
import pickle

import numpy as np
import pytest
from test_bundled import check_objects_and_boxes

from cssfe.data import bundled, bundled_coco, split_files
from cssfe.data.bundled_coco import CLASS_NAMES

C = len(CLASS_NAMES)


@pytest.fixture(scope="module")
def coco_root(_cache_dir):
    """The dataset (seed 0), generated once per test module."""
    return bundled_coco.ensure_bundled_coco(str(_cache_dir), seed=0, progress=False)


def _labels(root, split):
    return split_files.read_split(root, split, C)


@pytest.fixture
def few_images(monkeypatch):
    """Generation of a handful of images (the full label sets are tested on their own): every
    step of :func:`bundled_coco.generate` runs, in a fraction of a second."""
    def label_sets(seed):
        rng = np.random.default_rng(seed)
        return {split: [sorted(rng.choice(C, size=k, replace=False).tolist()) for k in (1, 2, 3, 4)] for split in ("train", "test")}

    monkeypatch.setattr(bundled_coco, "label_sets", label_sets)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_two_generations_are_byte_identical(few_images, tmp_path):
    first = bundled_coco.generate(str(tmp_path / "first"), seed=0, progress=False)
    again = bundled_coco.generate(str(tmp_path / "again"), seed=0, progress=False)
    other = bundled_coco.generate(str(tmp_path / "other"), seed=1, progress=False)
    assert _files(first) == _files(again) and len(_files(first)) > 8
    _, mismatch, errors = filecmp.cmpfiles(first, again, _files(first), shallow=False)
    assert mismatch == [] and errors == []
    _, mismatch, _ = filecmp.cmpfiles(first, other, _files(first), shallow=False)
    assert "images/train_00000.png" in mismatch  # the seed matters


def test_label_sets_are_a_function_of_the_seed():
    assert bundled_coco.label_sets(0) == bundled_coco.label_sets(0) != bundled_coco.label_sets(1)


def test_profile_is_lt_coco_and_groups_are_22_33_25(coco_root):
    profile, _ = bundled_coco.lt_coco_profile()
    assert len(profile) == C == 80 and sum(profile) == 8316  # LT-COCO's published training positives
    stats = pickle.load(open(os.path.join(coco_root, "train", "class_freq.pkl"), "rb"))
    freq = np.asarray(stats["class_freq"])
    assert sorted(freq.tolist(), reverse=True) == profile
    split = pickle.load(open(os.path.join(coco_root, "class_split.pkl"), "rb"))
    assert [len(split[k]) for k in split_files.SPLIT_KEYS] == [22, 33, 25]
    groups = split_files.class_split_to_groups(split, C)
    assert np.array_equal(groups, split_files.groups_from_frequencies(freq, 100, 20))
    assert split_files.read_classes(coco_root) == CLASS_NAMES


def test_one_to_four_objects_with_boxes_inside_the_canvas(coco_root):
    check_objects_and_boxes(coco_root, C, bundled_coco.CANVAS)
    from PIL import Image

    ids, _ = _labels(coco_root, "train")
    with Image.open(split_files.find_image(coco_root, ids[0])) as img:
        assert img.size == (bundled_coco.CANVAS, bundled_coco.CANVAS) and img.mode == "RGB"


def test_test_set_is_balanced(coco_root):
    ids, labels = _labels(coco_root, "test")
    assert len(ids) == bundled_coco.TEST_IMAGES
    per_class = labels.sum(0)
    assert per_class.max() - per_class.min() <= 2 and per_class.min() >= 30


def test_test_sources_never_in_training(tmp_path, monkeypatch):
    mnist, labels = bundled._load_mnist()
    train_pool, test_pool = bundled._source_pools(labels)
    train_digits, test_digits = (np.concatenate(list(p.values())) for p in (train_pool, test_pool))
    assert len(np.intersect1d(train_digits, test_digits)) == 0
    pixels = np.arange(427 * 640).reshape(427, 640)  # pixel numbers stand for the flower's pixels
    train_flower, test_flower = (bundled_coco._flower_region(pixels, s) for s in ("train", "test"))
    assert train_flower.size > 0 and test_flower.size > 0 and len(np.intersect1d(train_flower, test_flower)) == 0
    # What the generator renders for each split reads only that split's digits and flower half.
    read = {"train": set(), "test": set()}
    regions = {}
    render = bundled_coco._render

    class Reads:
        def __init__(self, split):
            self.split = split

        def __getitem__(self, index):
            read[self.split].add(int(index))
            return mnist[index]

    every_mark = [[d * 8 + m for m in range(0, 8, 2)] for d in range(10)] + [[d * 8 + m for m in range(1, 8, 2)] for d in range(10)]
    calls = []

    def spy(rng, classes, mnist_images, pool, region):
        split = "train" if len(calls) < len(every_mark) else "test"  # the training images come first
        calls.append(split)
        regions[split] = region
        return render(rng, classes, Reads(split), pool, region)

    monkeypatch.setattr(bundled_coco, "_render", spy)
    flower = bundled_coco._load_flower()
    os.makedirs(tmp_path / "images")
    bundled_coco._render_all(0, {"train": every_mark, "test": every_mark}, str(tmp_path / "images"), progress=False)
    assert calls.count("test") == len(every_mark)
    assert read["train"] and read["train"] <= set(train_digits.tolist())
    assert read["test"] and read["test"] <= set(test_digits.tolist())
    for split in ("train", "test"):
        assert np.array_equal(regions[split], bundled_coco._flower_region(flower, split))


def test_designed_co_occurrence_is_measurable(coco_root):
    for split in ("train", "test"):
        _, labels = _labels(coco_root, split)
        lift = bundled_coco.cooccurrence_lift(labels)
        assert np.allclose(lift[0, 1], (labels[:, 0] & labels[:, 1]).mean() / (labels[:, 0].mean() * labels[:, 1].mean()))
        labels = labels.astype(np.float64)
        joint, freq, n = labels.T @ labels, labels.sum(0), len(labels)
        expected = np.outer(freq, freq) / n
        context = np.zeros((C, C), dtype=bool)
        for a, b in bundled_coco.context_pairs():
            context[a, b] = True
        other = np.triu(~context, 1)
        assert joint[context].sum() / expected[context].sum() > 2  # same mark: well above independence
        assert joint[other].sum() / expected[other].sum() < 1
        supported = context & (expected >= 1)  # pairs independence would put together at least once
        assert (lift[supported] > 1).mean() >= 0.9
    assert len(bundled_coco.context_pairs()) == 8 * 45


def test_a_partial_or_damaged_cache_is_found_and_generated_again(few_images, tmp_path, capsys):
    cache = str(tmp_path)
    root = bundled_coco.ensure_bundled_coco(cache, seed=3, progress=False)
    assert bundled_coco.damage(root, 3) is None
    reference = open(os.path.join(root, "images", "train_00002.png"), "rb").read()
    assert bundled_coco.ensure_bundled_coco(cache, seed=3, progress=False) == root
    assert "generating it again" not in capsys.readouterr().err

    def broken(how):
        how()
        assert bundled_coco.damage(root, 3) is not None
        assert bundled_coco.ensure_bundled_coco(cache, seed=3, progress=False) == root
        assert "incomplete or damaged" in capsys.readouterr().err
        assert bundled_coco.damage(root, 3) is None
        assert open(os.path.join(root, "images", "train_00002.png"), "rb").read() == reference

    image = os.path.join(root, "images", "train_00002.png")
    broken(lambda: os.remove(image))  # a file missing
    broken(lambda: open(image, "r+b").truncate(10))  # a file cut short
    broken(lambda: os.remove(os.path.join(root, bundled_coco.MANIFEST)))  # generation never finished
    broken(lambda: open(os.path.join(root, bundled_coco.MANIFEST), "w").write("{"))  # manifest cut short


def test_example_grid_is_drawn(tmp_path):
    path = bundled_coco.draw_examples(str(tmp_path / "grid.png"), seed=0, scenes=2, scale=1)
    from PIL import Image

    with Image.open(path) as img:
        assert img.width > 100 and img.height > 100


def test_minilm_neighbours_share_a_part_or_an_attribute():
    """Under the packaged encoder every class's nearest label shares its mark or its digit."""
    from cssfe.models.text_encoders import label_embeddings

    emb = label_embeddings("minilm", CLASS_NAMES)
    sim = emb @ emb.t()
    sim.fill_diagonal_(-2)
    nearest = sim.argmax(1).tolist()
    same_mark = [bundled_coco.MARK_OF[i] == bundled_coco.MARK_OF[j] for i, j in enumerate(nearest)]
    same_digit = [i // len(bundled_coco.MARKS) == j // len(bundled_coco.MARKS) for i, j in enumerate(nearest)]
    assert all(m or d for m, d in zip(same_mark, same_digit))
    assert sum(same_mark) >= 0.9 * C  # the co-occurring context is the text neighbourhood too


def test_one_tiny_training_run_by_name(coco_root, tmp_path):
    from cssfe.config import load_config
    from cssfe.engine.train import train

    cfg = load_config("configs/default.yaml", ["data.name=bundled_coco", "data.image_size=32", "optim.epochs=1",
                                               "progress=false", f"output_dir={tmp_path / 'run'}",
                                               f"cache_dir={os.path.dirname(os.path.dirname(coco_root))}"])
    train(cfg)
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert len(metrics["final"]["per_class_ap"]) == C
    assert all(np.isfinite(metrics["final"]["mAP"][g]) for g in ("total", "head", "medium", "tail"))
    assert open(tmp_path / "run" / "config.yaml").read().count("name: bundled_coco") == 1
