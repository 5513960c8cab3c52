"""LT-VOC, LT-COCO, ODIR-5K and a user's own VOC / COCO folders, read from tiny trees in the real
on-disk formats: labels, groups, counts, split files, and the documented errors."""
import os
import pickle

import numpy as np
import pytest
from format_builders import coco_json, make_lt_coco, make_lt_voc, make_odir, make_own_voc, write_jpeg, write_voc_xml

from cssfe.data import DATASETS, SplitFormatError, build_data
from cssfe.data.odir import ODIR_CLASSES
from cssfe.data.published import published_split
from cssfe.data.voc import VOC_CLASSES


def _build(cfg):
    return build_data(cfg, cache_dir="/nonexistent-cache", progress=False)


def _label_sets(dataset):
    return [np.flatnonzero(row).tolist() for row in dataset.labels.numpy()]


def test_registry_names():
    assert {"lt_voc", "lt_coco", "odir5k", "voc", "coco", "bundled", "bundled_coco", "split_folder"} <= set(DATASETS.names())


def test_lt_voc_reads_published_labels_with_difficult_objects_and_groups(tmp_path, data_cfg):
    ids = make_lt_voc(tmp_path)
    data = _build(data_cfg("lt_voc", tmp_path))
    pub = published_split("lt_voc")
    assert data.class_names == list(VOC_CLASSES) == pub.classes
    assert len(data.train) == 24 and len(data.test) == 6
    assert _label_sets(data.train) == [sorted(x) for x in pub.train_labels[:24]]  # difficult objects count
    assert data.test_ids == ids["test"]
    assert np.array_equal(data.groups, pub.groups) and [int((data.groups == g).sum()) for g in range(3)] == [6, 6, 8]
    assert [VOC_CLASSES[c] for c in np.flatnonzero(data.groups == 0)] == ["bottle", "car", "chair", "diningtable", "person", "pottedplant"]
    image, labels, _ = data.train[0]
    assert image.shape == (3, 32, 32) and labels.sum() >= 1
    assert not os.path.exists(tmp_path / "longtail2012" / "class_split.pkl")  # published: the loader writes nothing


def test_lt_voc_verifies_the_published_pickles(tmp_path, data_cfg):
    ids = make_lt_voc(tmp_path)
    pub = published_split("lt_voc")
    from cssfe.data.split_files import class_statistics, groups_to_class_split, labels_matrix

    folder = tmp_path / "longtail2012"
    stats = class_statistics(labels_matrix(pub.train_labels[:24], 20))
    pickle.dump(stats, open(folder / "class_freq.pkl", "wb"))
    pickle.dump(groups_to_class_split(pub.groups), open(folder / "class_split.pkl", "wb"))
    assert len(_build(data_cfg("lt_voc", tmp_path)).train) == 24
    # A gt_labels row that disagrees with the annotations is named.
    stats["gt_labels"][3, 16] ^= 1
    stats["class_freq"] = stats["gt_labels"].sum(0)
    pickle.dump(stats, open(folder / "class_freq.pkl", "wb"))
    with pytest.raises(SplitFormatError,
                       match=f"class_freq.pkl: labels of 1 training image.*disagree with the annotations, first '{ids['train'][3]}'"):
        _build(data_cfg("lt_voc", tmp_path))
    # An annotation that disagrees with the published labels is named, image and classes.
    write_voc_xml(tmp_path / "VOCdevkit" / "VOC2012" / "Annotations" / f"{ids['train'][3]}.xml", [("sheep", 0)])
    with pytest.raises(SplitFormatError, match=f"image '{ids['train'][3]}': labels from the annotations \\[16\\] differ from the published"):
        _build(data_cfg("lt_voc", tmp_path))


def test_lt_coco_plain_text_pkl_ids_and_category_order(tmp_path, data_cfg):
    ids = make_lt_coco(tmp_path)
    data = _build(data_cfg("lt_coco", tmp_path))
    pub = published_split("lt_coco")
    assert data.class_names == pub.classes and len(data.class_names) == 80
    assert "traffic_light" in data.class_names
    assert len(data.train) == 20 and len(data.test) == 5  # test: every image of the val JSON
    assert _label_sets(data.train) == [sorted(x) for x in pub.train_labels[:20]]
    assert data.test_ids == ids["test"]
    assert _label_sets(data.test)[1] == sorted({1, 13})
    assert [int((data.groups == g).sum()) for g in range(3)] == [22, 33, 25]


def test_later_repositories_list_format_path_and_indices(tmp_path, data_cfg):
    make_lt_coco(tmp_path)
    pub = published_split("lt_coco")
    lines = [f"train2017/{int(i):012d}.jpg " + " ".join(map(str, pub.train_labels[n])) for n, i in enumerate(pub.train_ids[:20])]
    (tmp_path / "coco_lt_train.txt").write_text("\n".join(lines) + "\n")
    data = _build(data_cfg("lt_coco", tmp_path, "data.train_list=coco_lt_train.txt"))
    assert _label_sets(data.train) == [sorted(x) for x in pub.train_labels[:20]]
    (tmp_path / "coco_lt_train.txt").write_text("train2017/000000554625.jpg 0 80\n")
    with pytest.raises(SplitFormatError, match=r"class index 80 is outside 0\.\.79"):
        _build(data_cfg("lt_coco", tmp_path, "data.train_list=coco_lt_train.txt"))


@pytest.mark.parametrize("table", ["data.csv", "data.xlsx"])
def test_odir5k_table_to_eight_labels_and_seeded_split(tmp_path, data_cfg, table):
    labels = make_odir(tmp_path, n=10, table=table)
    data = _build(data_cfg("odir5k", tmp_path, f"data.train_annotations={table}", "data.test_fraction=0.3"))
    assert data.class_names == list(ODIR_CLASSES) and len(ODIR_CLASSES) == 8
    assert len(data.train) == 7 and len(data.test) == 3
    train_ids = (tmp_path / "train.txt").read_text().split()  # the seeded split is written and reused
    assert sorted(train_ids + data.test_ids, key=int) == [str(i) for i in range(10)]
    assert np.array_equal(data.train.labels.numpy(), labels[[int(i) for i in train_ids]])
    image, _, _ = data.train[0]
    assert image.shape == (3, 32, 32)
    from cssfe.data.images import read_rgb

    both = read_rgb(data.train.paths[0])  # both eyes side by side, the smaller one scaled to the same height
    assert both.size == (64, 32)
    again = _build(data_cfg("odir5k", tmp_path, f"data.train_annotations={table}", "data.seed=5"))
    assert again.test_ids == data.test_ids  # the written lists win over a new seed


def test_own_voc_folder_gets_split_files_from_its_training_labels(tmp_path, data_cfg):
    own = make_own_voc(tmp_path)
    data = _build(data_cfg("voc", tmp_path, "data.head_min=20", "data.tail_max=5"))
    assert data.class_names == own["names"]  # found in the annotations
    assert data.class_freq.tolist() == [30, 10, 3]
    assert data.groups.tolist() == [0, 1, 2]
    stats = pickle.load(open(tmp_path / "class_freq.pkl", "rb"))
    assert stats["class_freq"].tolist() == [30, 10, 3] and stats["gt_labels"].shape == (30, 3)
    assert stats["neg_class_freq"].tolist() == [0, 20, 27]
    assert pickle.load(open(tmp_path / "class_split.pkl", "rb")) == {"head": {0}, "middle": {1}, "tail": {2}}
    # Read back, not recomputed: other thresholds do not change the written split.
    assert _build(data_cfg("voc", tmp_path)).groups.tolist() == [0, 1, 2]


def test_own_coco_folder(tmp_path, data_cfg):
    names = ["apple", "pear", "plum"]
    coco_json(tmp_path / "annotations.json", {1: [0], 2: [0, 1], 3: [2], 4: [0]}, names)
    for i in range(1, 5):
        write_jpeg(tmp_path / "images" / f"{i:012d}.jpg", i)
    (tmp_path / "train.txt").write_text("1\n2\n3\n")
    (tmp_path / "test.txt").write_text("4\n")
    data = _build(data_cfg("coco", tmp_path, "data.head_min=2", "data.tail_max=1"))
    assert data.class_names == names and _label_sets(data.train) == [[0], [0, 1], [2]]
    assert data.groups.tolist() == [0, 1, 1]
    assert (tmp_path / "class_split.pkl").is_file()


# ------------------------------------------------------------------------------- bad input
def test_corrupt_images_are_counted_and_skipped_or_fatal(tmp_path, data_cfg, capsys):
    make_own_voc(tmp_path)
    (tmp_path / "JPEGImages" / "tr004.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    data = _build(data_cfg("voc", tmp_path))
    assert len(data.train) == 29 and [os.path.basename(p) for p, _ in data.skipped] == ["tr004.jpg"]
    assert "left out 1 unreadable image(s)" in capsys.readouterr().err
    with pytest.raises(SplitFormatError, match="tr004.jpg"):
        _build(data_cfg("voc", tmp_path, "data.on_bad_image=error"))


def test_id_without_annotation_is_named(tmp_path, data_cfg):
    make_own_voc(tmp_path)
    with open(tmp_path / "train.txt", "a") as f:
        f.write("ghost\n")
    with pytest.raises(SplitFormatError, match="no annotation for image 'ghost'"):
        _build(data_cfg("voc", tmp_path))
    make_lt_coco(tmp_path / "coco")
    with open(tmp_path / "coco" / "longtail2017" / "img_id.pkl", "a") as f:
        f.write("123\n")
    with pytest.raises(SplitFormatError, match="no annotation for image '123'.*instances_train2017.json"):
        _build(data_cfg("lt_coco", tmp_path / "coco"))


def test_unknown_class_names_are_named(tmp_path, data_cfg):
    ids = make_lt_voc(tmp_path)
    xml = tmp_path / "VOCdevkit" / "VOC2007" / "Annotations" / f"{ids['test'][2]}.xml"
    write_voc_xml(xml, [("dog", 0), ("unicorn", 0)])
    with pytest.raises(SplitFormatError, match=f"{ids['test'][2]}.xml: unknown class name 'unicorn'"):
        _build(data_cfg("lt_voc", tmp_path))
    make_own_voc(tmp_path / "own")
    (tmp_path / "own" / "classes.txt").write_text("cat\ndog\n")  # the user's class list lacks ferret
    with pytest.raises(SplitFormatError, match="unknown class name 'ferret'"):
        _build(data_cfg("voc", tmp_path / "own"))


def test_wrong_class_count_is_named(tmp_path, data_cfg):
    make_lt_voc(tmp_path)
    pickle.dump({"gt_labels": np.zeros((24, 19), np.uint8)}, open(tmp_path / "longtail2012" / "class_freq.pkl", "wb"))
    with pytest.raises(SplitFormatError, match=r"class_freq.pkl: gt_labels has shape \(24, 19\), expected \[n, 20\]"):
        _build(data_cfg("lt_voc", tmp_path))


def test_missing_parts_name_the_file_and_key(tmp_path, data_cfg):
    ids = make_lt_voc(tmp_path)
    os.remove(tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{ids['train'][0]}.jpg")
    os.remove(tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{ids['train'][1]}.jpg")
    with pytest.raises(SplitFormatError, match=f"2 training image file\\(s\\) not found: .*{ids['train'][0]}.jpg"):
        _build(data_cfg("lt_voc", tmp_path))
    with pytest.raises(SplitFormatError, match="data.test_images"):
        _build(data_cfg("lt_voc", tmp_path, "data.test_images=nowhere"))
    with pytest.raises(SplitFormatError, match="data.train_list"):
        _build(data_cfg("voc", tmp_path / "VOCdevkit" / "VOC2012"))
    with pytest.raises(SplitFormatError, match="data.root"):
        _build(data_cfg("lt_coco", tmp_path / "nowhere"))
    make_odir(tmp_path / "odir", n=4, table="patients.csv")  # not a name of the release's table
    with pytest.raises(SplitFormatError, match="data.train_annotations"):
        _build(data_cfg("odir5k", tmp_path / "odir"))
