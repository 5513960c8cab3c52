"""Multi-label image datasets and the registry that builds them from the data config."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cssfe.data import split_files
from cssfe.data.bundled import ensure_bundled
from cssfe.data.transforms import build_transform
from cssfe.registry import Registry


class MultiLabelImages(Dataset):
    """Images read from files, with a multi-hot label row each; items are (image, labels, index)."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, transform: Callable):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} image paths but {len(labels)} label rows")
        self.paths = list(paths)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as img:
            image = self.transform(img.convert("RGB"))
        return image, self.labels[index], index


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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: Registry[LongTailData] = Registry("dataset")


def load_split_folder(root: str, cfg) -> LongTailData:
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
    return LongTailData(
        train=MultiLabelImages(train_paths, train_labels, build_transform(cfg.image_size, train=True, augment=cfg.augment)),
        test=MultiLabelImages(test_paths, test_labels, build_transform(cfg.image_size, train=False)),
        class_names=names,
        groups=groups,
        class_freq=train_labels.sum(0).astype(np.int64),
        root=root,
        boxes=boxes,
        test_ids=test_ids,
    )


@DATASETS.register("bundled")
def _bundled(cfg, cache_dir: str, progress: bool = True) -> LongTailData:
    root = cfg.root or ensure_bundled(cache_dir, seed=cfg.seed, progress=progress)
    return load_split_folder(root, cfg)


@DATASETS.register("split_folder")
def _split_folder(cfg, cache_dir: str, progress: bool = True) -> LongTailData:
    if not cfg.root:
        raise split_files.SplitFormatError("config key 'data.root' must name the split folder for data.name=split_folder")
    return load_split_folder(cfg.root, cfg)


def build_data(cfg, cache_dir: str, progress: bool = True) -> LongTailData:
    """``cfg`` is a :class:`cssfe.config.DataConfig`."""
    return DATASETS.build(cfg.name, cfg, cache_dir, progress)
