"""Multi-label image datasets and the registry that builds them from the data config."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from cssfe.data import split_files
from cssfe.data.annotated import Layout, read_annotated
from cssfe.data.bundled import ensure_bundled
from cssfe.data.bundled_coco import ensure_bundled_coco
from cssfe.data.image_checks import unreadable_images
from cssfe.data.images import ImageSource, read_rgb, source_files
from cssfe.data.transforms import build_transform
from cssfe.metrics import GROUP_NAMES
from cssfe.registry import Registry


class MultiLabelImages(Dataset):
    """Images read from files, with a multi-hot label row each; items are (image, labels, index).
    A path may be a tuple of files, shown side by side as one image (ODIR-5K's two eyes)."""

    def __init__(self, paths: Sequence[ImageSource], labels: np.ndarray, transform: Callable):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} image paths but {len(labels)} label rows")
        self.paths = list(paths)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(read_rgb(self.paths[index])), self.labels[index], index

    def drop(self, indices: Sequence[int]) -> None:
        keep = np.setdiff1d(np.arange(len(self.paths)), np.asarray(list(indices), dtype=np.int64))
        self.paths = [self.paths[i] for i in keep]
        self.labels = self.labels[torch.as_tensor(keep)]


@dataclass
class LongTailData:
    """Everything training needs to know about a dataset."""

    train: MultiLabelImages
    test: MultiLabelImages
    class_names: List[str]
    groups: np.ndarray  # per class: 0 head, 1 medium, 2 tail
    class_freq: np.ndarray  # training positives per class
    root: str
    boxes: Optional[Dict[str, list]] = None  # image id -> [[class, x0, y0, x1, y1], ...]
    test_ids: Optional[List[str]] = None
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (file, reason) of unreadable images left out
    lists: Dict[str, str] = field(default_factory=dict)  # split -> the list file (or what made the list)
    notes: List[str] = field(default_factory=list)  # degenerate but usable data, said before training
    unreadable: Dict[str, List[str]] = field(default_factory=dict)  # split -> files left out
    lost: Dict[str, Dict[int, List[str]]] = field(default_factory=dict)  # split -> class -> its positives left out

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: Registry[LongTailData] = Registry("dataset")


def load_split_folder(root: str, cfg, progress: bool = False, cache_dir: Optional[str] = None) -> LongTailData:
    """Read a folder in the split format (see :mod:`cssfe.data.split_files`), checking it first."""
    if not os.path.isdir(root):
        raise split_files.SplitFormatError(f"dataset folder not found: {root}")
    names = split_files.read_classes(root)
    train_ids, train_labels = split_files.read_split(root, "train", len(names))
    test_ids, test_labels = split_files.read_split(root, "test", len(names))
    split_path = os.path.join(root, "class_split.pkl")
    if os.path.isfile(split_path):
        groups = split_files.class_split_to_groups(split_files.read_pickle(split_path), len(names), split_path)
    else:
        groups = split_files.groups_from_frequencies(train_labels.sum(0), cfg.head_min, cfg.tail_max)
    # Resolve every path up front: a missing image stops the run before any training.
    train_paths = [split_files.find_image(root, i) for i in train_ids]
    test_paths = [split_files.find_image(root, i) for i in test_ids]
    boxes = None
    boxes_path = os.path.join(root, "boxes.json")
    if os.path.isfile(boxes_path):
        with open(boxes_path) as f:
            boxes = json.load(f)["boxes"]
    data = LongTailData(
        train=MultiLabelImages(train_paths, train_labels, build_transform(cfg.image_size, train=True, augment=cfg.augment)),
        test=MultiLabelImages(test_paths, test_labels, build_transform(cfg.image_size, train=False)),
        class_names=names,
        groups=groups,
        class_freq=train_labels.sum(0).astype(np.int64),
        root=root,
        boxes=boxes,
        test_ids=test_ids,
        lists={split: os.path.join(root, split, "img_id.txt") for split in ("train", "test")},
    )
    if cfg.check_images:
        _leave_out_unreadable(data, cfg.on_bad_image, progress, cache_dir)
    check_degenerate(data)
    return data


def _leave_out_unreadable(data: LongTailData, policy: str, progress: bool, cache_dir: Optional[str] = None) -> None:
    """Scan every image once before training (once per set of files with a ``cache_dir``: see
    :mod:`cssfe.data.image_checks`). Policy ``error``: stop, naming the files; ``skip``: leave them
    out, count them and say so (the groups stay those of the split files; the class frequencies
    become those of the images that remain)."""
    bad = {split: unreadable_images(getattr(data, split).paths, cache_dir, f"checking {split} images", progress)
           for split in ("train", "test")}
    found = [(path, reason) for rows in bad.values() for _, path, reason in rows]
    if not found:
        return
    data.lost = {split: _positives_by_class(getattr(data, split), [i for i, _, _ in rows]) for split, rows in bad.items()}
    data.unreadable = {split: [path for _, path, _ in rows] for split, rows in bad.items()}
    listing = "; ".join(f"{p} ({r})" for p, r in found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
    if policy == "error":
        raise split_files.SplitFormatError(f"{len(found)} unreadable image(s): {listing} (data.on_bad_image=skip leaves them out)")
    for split, rows in bad.items():
        getattr(data, split).drop([i for i, _, _ in rows])
        if split == "test" and data.test_ids is not None:
            gone = {i for i, _, _ in rows}
            data.test_ids = [x for i, x in enumerate(data.test_ids) if i not in gone]
    data.skipped = found
    data.class_freq = data.train.labels.sum(0).numpy().astype(np.int64)
    print(f"cssfe: left out {len(found)} unreadable image(s): {listing}", file=sys.stderr)


def _positives_by_class(images: MultiLabelImages, indices: Sequence[int]) -> Dict[int, List[str]]:
    """class -> files of ``images[indices]`` that are positives of it."""
    out: Dict[int, List[str]] = {}
    for i in indices:
        for c in torch.nonzero(images.labels[i]).flatten().tolist():
            out.setdefault(c, []).append(source_files(images.paths[i])[0])
    return out


def _class_list(data: LongTailData, classes: Sequence[int]) -> str:
    return ", ".join(f"'{data.class_names[c]}' ({GROUP_NAMES[int(data.groups[c])]})" for c in classes)


def check_degenerate(data: LongTailData) -> None:
    """Data that cannot give a meaningful run, found before any training. Fatal (SplitFormatError
    naming the list and the count): no training or no test image left, or no positive label in
    the whole test set. Said on stderr and kept in
    ``data.notes``: a class with no training positive (named, and, when unreadable files took them
    all, said so), a class with no test positive (its AP is undefined: named with the means it is
    left out of)."""
    lost = data.lost
    for split, words in (("train", "training"), ("test", "test")):
        if len(getattr(data, split)) == 0:
            where = data.lists.get(split, f"the {words} list")
            files = data.unreadable.get(split, [])
            reason = (f"all {len(files)} of its images were unreadable and left out (first: {files[0]})" if files
                      else "it holds no image")
            raise split_files.SplitFormatError(
                f"no readable {words} image: {where}: {reason}; nothing to {'train on' if split == 'train' else 'evaluate'}")
    notes = []
    train_pos = data.train.labels.sum(0)
    empty = [c for c in range(data.num_classes) if train_pos[c] == 0]
    lost_train = lost.get("train", {})
    to_files = [c for c in empty if c in lost_train]
    if to_files:
        notes.append(f"class(es) {_class_list(data, to_files)} lost every training image to unreadable files "
                     f"(e.g. {lost_train[to_files[0]][0]}): the model cannot learn them")
    never = [c for c in empty if c not in lost_train]
    if never:
        notes.append(f"class(es) {_class_list(data, never)} have no positive among the {len(data.train)} training "
                     f"images of {data.lists.get('train', 'the training list')}: the model cannot learn them")
    test_pos = data.test.labels.sum(0)
    undefined = [c for c in range(data.num_classes) if test_pos[c] == 0]
    if len(undefined) == data.num_classes:  # no AP is defined: every mean, and "best", would be empty
        raise split_files.SplitFormatError(
            f"no positive label in the test set: {data.lists.get('test', 'the test list')}: none of its "
            f"{len(data.test)} images holds any of the {data.num_classes} classes; nothing to evaluate")
    if undefined:
        means = sorted({GROUP_NAMES[int(data.groups[c])] for c in undefined}, key=GROUP_NAMES.index)
        lost_test = [c for c in undefined if c in lost.get("test", {})]
        cause = f" (unreadable files took all of {_class_list(data, lost_test)})" if lost_test else ""
        notes.append(f"class(es) {_class_list(data, undefined)} have no positive among the {len(data.test)} test "
                     f"images of {data.lists.get('test', 'the test list')}{cause}: their AP is undefined and "
                     f"left out of the total and {'/'.join(means)} mAP")
    data.notes.extend(notes)
    for note in notes:
        print(f"cssfe: {note}", file=sys.stderr)


def check_batch(data: LongTailData, batch_size: int, strict: bool = False) -> None:
    """Fewer training images than one batch: each epoch is then one step on a partial batch (said
    on stderr); ``strict`` (DeepSpeed, whose batch is fixed) makes it an error."""
    n = len(data.train)
    if n >= batch_size:
        return
    message = (f"the training set has {n} readable images ({data.lists.get('train', 'the training list')}), "
               f"fewer than one batch (data.batch_size={batch_size})")
    if strict:
        raise ValueError(message)
    print(f"cssfe: {message}: every epoch is a single step on a batch of {n}", file=sys.stderr)


@DATASETS.register("bundled")
def _bundled(cfg, cache_dir: str, progress: bool = True) -> LongTailData:
    root = cfg.root or ensure_bundled(cache_dir, seed=cfg.seed, progress=progress)
    return load_split_folder(root, cfg, progress, cache_dir)


@DATASETS.register("bundled_coco")
def _bundled_coco(cfg, cache_dir: str, progress: bool = True) -> LongTailData:
    root = cfg.root or ensure_bundled_coco(cache_dir, seed=cfg.seed, progress=progress)
    return load_split_folder(root, cfg, progress, cache_dir)


@DATASETS.register("split_folder")
def _split_folder(cfg, cache_dir: str, progress: bool = True) -> LongTailData:
    if not cfg.root:
        raise split_files.SplitFormatError("config key 'data.root' must name the split folder for data.name=split_folder")
    return load_split_folder(cfg.root, cfg, progress, cache_dir)


# Datasets read from their original annotations (see cssfe/data/annotated.py for the keys that
# override each default place, all relative to data.root).
LAYOUTS: Dict[str, Layout] = {
    "lt_voc": Layout(
        format="voc",
        train_images=("VOCdevkit/VOC2012", "VOC2012"),
        test_images=("VOCdevkit/VOC2007", "VOC2007"),
        train_list=("longtail2012/img_id.txt", "appendix/VOCdevkit/longtail2012/img_id.txt"),
        test_list=("VOCdevkit/VOC2007/ImageSets/Main/test.txt", "VOC2007/ImageSets/Main/test.txt"),
        split_dir=("longtail2012", "appendix/VOCdevkit/longtail2012"),
        published="lt_voc",
    ),
    "lt_coco": Layout(
        format="coco",
        train_images=("train2017", "images/train2017"),
        test_images=("val2017", "images/val2017"),
        train_annotations=("annotations/instances_train2017.json",),
        test_annotations=("annotations/instances_val2017.json",),
        # The published id file is img_id.pkl (plain text); a written one is img_id.txt.
        train_list=("longtail2017/img_id.txt", "longtail2017/img_id.pkl", "appendix/coco/longtail2017/img_id.pkl"),
        test_list=("longtail2017/test.txt",),
        split_dir=("longtail2017", "appendix/coco/longtail2017"),
        published="lt_coco",
        test_list_optional=True,  # COCO val2017 whole
    ),
    "odir5k": Layout(
        format="odir",
        train_images=("ODIR-5K/Training Images", "Training Images", "images"),
        train_annotations=("ODIR-5K/data.xlsx", "data.xlsx", "ODIR-5K_Training_Annotations(Updated)_V2.xlsx", "data.csv"),
        test_list_optional=True,  # no lists: a seeded split of the patients, written as train.txt / test.txt
    ),
    "voc": Layout(format="voc", train_list=("train.txt", "ImageSets/Main/train.txt"), test_list=("test.txt", "ImageSets/Main/test.txt")),
    "coco": Layout(format="coco", train_images=("images",), train_annotations=("annotations.json",)),
}


def load_annotated(cfg, layout: Layout, progress: bool = False, write_split_files: Optional[bool] = None,
                   cache_dir: Optional[str] = None) -> LongTailData:
    """A dataset read from its annotations (``cfg``: a DataConfig), checked before any training."""
    parts = read_annotated(cfg, layout, write_split_files)
    for path in parts.written:
        print(f"cssfe: wrote {path}", file=sys.stderr)
    augment = cfg.augment
    data = LongTailData(
        train=MultiLabelImages(parts.train.sources, parts.train.labels, build_transform(cfg.image_size, train=True, augment=augment)),
        test=MultiLabelImages(parts.test.sources, parts.test.labels, build_transform(cfg.image_size, train=False)),
        class_names=parts.class_names,
        groups=parts.groups,
        class_freq=parts.train.labels.sum(0).astype(np.int64),
        root=cfg.root,
        test_ids=list(parts.test.ids),
        lists=dict(parts.lists),
    )
    if cfg.check_images:
        _leave_out_unreadable(data, cfg.on_bad_image, progress, cache_dir)
    check_degenerate(data)
    return data


def _register_annotated(name: str, layout: Layout) -> None:
    @DATASETS.register(name)
    def _build(cfg, cache_dir: str, progress: bool = True) -> LongTailData:
        return load_annotated(cfg, layout, progress, cache_dir=cache_dir)


for _name, _layout in LAYOUTS.items():
    _register_annotated(_name, _layout)


def build_data(cfg, cache_dir: str, progress: bool = True) -> LongTailData:
    """``cfg`` is a :class:`cssfe.config.DataConfig`."""
    return DATASETS.build(cfg.name, cfg, cache_dir, progress)
