"""Builders of tiny datasets in the real on-disk formats: VOC (JPEGImages + Annotations XML), COCO
(instances JSON), ODIR-5K (annotation table + fundus images), and the long-tail split files."""
import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from cssfe.data.published import published_split
from cssfe.data.voc import VOC_CLASSES


def write_jpeg(path, seed: int, size: int = 32) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, quality=70)


def write_voc_xml(path, objects: Sequence[Tuple[str, int]]) -> None:
    """``objects``: (class name, difficult flag) per object."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{difficult}</difficult>"
        f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object>"
        for name, difficult in objects
    )
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(path, "w") as f:
        f.write(f"<annotation><folder>VOC</folder><filename>{stem}.jpg</filename>"
                f"<size><width>32</width><height>32</height><depth>3</depth></size>{body}</annotation>")


def write_voc_tree(tree, labelled: Dict[str, List[Tuple[str, int]]], size: int = 32) -> None:
    for n, (image_id, objects) in enumerate(labelled.items()):
        write_jpeg(os.path.join(tree, "JPEGImages", f"{image_id}.jpg"), n, size)
        write_voc_xml(os.path.join(tree, "Annotations", f"{image_id}.xml"), objects)


def voc_objects(class_indices: Sequence[int], difficult_last: bool = False) -> List[Tuple[str, int]]:
    objs = [(VOC_CLASSES[c], 0) for c in class_indices]
    if difficult_last and objs:
        objs[-1] = (objs[-1][0], 1)  # a class seen only in a difficult object must still count
    return objs


def make_lt_voc(root, n_train: int = 24, n_test: int = 6, size: int = 32) -> Dict[str, list]:
    """An LT-VOC tree: the first ``n_train`` published training images with their published labels
    (one object of each image marked difficult), ``n_test`` VOC2007 test images."""
    pub = published_split("lt_voc")
    train_ids = pub.train_ids[:n_train]
    labels = dict(zip(pub.train_ids, pub.train_labels))
    write_voc_tree(os.path.join(root, "VOCdevkit", "VOC2012"), {i: voc_objects(labels[i], difficult_last=True) for i in train_ids}, size)
    test_ids = [f"{i:06d}" for i in range(1, n_test + 1)]
    write_voc_tree(os.path.join(root, "VOCdevkit", "VOC2007"), {i: voc_objects([n % 20, (n * 7) % 20]) for n, i in enumerate(test_ids)}, size)
    main = os.path.join(root, "VOCdevkit", "VOC2007", "ImageSets", "Main")
    os.makedirs(main, exist_ok=True)
    with open(os.path.join(main, "test.txt"), "w") as f:
        f.write("\n".join(test_ids) + "\n")
    os.makedirs(os.path.join(root, "longtail2012"), exist_ok=True)
    with open(os.path.join(root, "longtail2012", "img_id.txt"), "w") as f:
        f.write("\n".join(train_ids) + "\n")
    return {"train": train_ids, "test": test_ids}


def coco_json(path, images: Dict[int, List[int]], class_names: Sequence[str]) -> None:
    """Instances JSON: ``images`` id -> category indices (0-based in ``class_names``; category ids
    are COCO-like, not contiguous)."""
    cat_ids = [i + 1 + i // 10 for i in range(len(class_names))]  # gaps, as in COCO's 1..90
    anns, k = [], 1
    for image_id, classes in images.items():
        for c in classes:
            anns.append({"id": k, "image_id": image_id, "category_id": cat_ids[c], "bbox": [1, 1, 5, 5], "area": 25.0, "iscrowd": 0})
            k += 1
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({
            "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 32, "height": 32} for i in images],
            "annotations": anns,
            "categories": [{"id": cid, "name": name.replace("_", " "), "supercategory": "x"} for cid, name in zip(cat_ids, class_names)],
        }, f)


def make_lt_coco(root, n_train: int = 20, n_test: int = 5) -> Dict[str, list]:
    """An LT-COCO tree; the id list is LT-COCO's ``img_id.pkl`` that is plain text."""
    pub = published_split("lt_coco")
    train_ids = pub.train_ids[:n_train]
    labels = dict(zip(pub.train_ids, pub.train_labels))
    coco_json(os.path.join(root, "annotations", "instances_train2017.json"), {int(i): labels[i] for i in train_ids}, pub.classes)
    test = {900000 + n: [n % 80, (n * 13) % 80] for n in range(n_test)}
    coco_json(os.path.join(root, "annotations", "instances_val2017.json"), test, pub.classes)
    for n, i in enumerate(train_ids):
        write_jpeg(os.path.join(root, "train2017", f"{int(i):012d}.jpg"), n)
    for i in test:
        write_jpeg(os.path.join(root, "val2017", f"{i:012d}.jpg"), i)
    os.makedirs(os.path.join(root, "longtail2017"), exist_ok=True)
    with open(os.path.join(root, "longtail2017", "img_id.pkl"), "w") as f:
        f.write("\n".join(train_ids) + "\n")
    return {"train": train_ids, "test": [str(i) for i in test]}


ODIR_COLUMNS = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords",
                "Right-Diagnostic Keywords", "N", "D", "G", "C", "A", "H", "M", "O"]


def make_odir(root, n: int = 10, table: str = "data.csv") -> np.ndarray:
    """ODIR-5K: ``n`` patients, two fundus photographs each (different sizes), labels in the table."""
    import pandas as pd

    labels = np.zeros((n, 8), dtype=np.uint8)
    rows = []
    for p in range(n):
        labels[p, p % 8] = 1
        if p % 3 == 0:
            labels[p, 7] = 1
        rows.append([p, 50, "Male", f"{p}_left.jpg", f"{p}_right.jpg", "x", "y", *labels[p].tolist()])
        write_jpeg(os.path.join(root, "Training Images", f"{p}_left.jpg"), 2 * p, 32)
        write_jpeg(os.path.join(root, "Training Images", f"{p}_right.jpg"), 2 * p + 1, 24)
    frame = pd.DataFrame(rows, columns=ODIR_COLUMNS)
    if table.endswith(".xlsx"):
        frame.to_excel(os.path.join(root, table), index=False)
    else:
        frame.to_csv(os.path.join(root, table), index=False)
    return labels


def make_own_voc(root, n_train: int = 30, n_test: int = 10, size: int = 32) -> Dict[str, list]:
    """A user's own VOC-format folder: three classes with a long tail, own train/test lists."""
    names = ("cat", "dog", "ferret")
    rng = np.random.default_rng(0)
    train = {f"tr{i:03d}": [(names[0], 0)] + ([(names[1], 0)] if i % 3 == 0 else []) + ([(names[2], 0)] if i % 10 == 0 else [])
             for i in range(n_train)}
    test = {f"te{i:03d}": [(names[int(rng.integers(3))], 0)] for i in range(n_test)}
    write_voc_tree(root, {**train, **test}, size)
    with open(os.path.join(root, "train.txt"), "w") as f:
        f.write("\n".join(train) + "\n")
    with open(os.path.join(root, "test.txt"), "w") as f:
        f.write("\n".join(test) + "\n")
    return {"train": list(train), "test": list(test), "names": list(names)}
