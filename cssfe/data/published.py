"""The published LT-VOC / LT-COCO training splits that ship with the package (see published/README.md),
and the facts a prepared dataset is checked against."""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from cssfe.data.split_files import SPLIT_KEYS

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published")


@dataclass(frozen=True)
class Expected:
    """Counts a complete copy of a published dataset has."""

    train: int
    test: int
    classes: int
    groups: Tuple[int, int, int]  # head, medium, tail


@dataclass(frozen=True)
class PublishedSplit:
    classes: List[str]
    train_ids: List[str]
    train_labels: List[List[int]]
    groups: np.ndarray

    def labels_by_id(self) -> Dict[str, List[int]]:
        return dict(zip(self.train_ids, self.train_labels))


EXPECTED = {
    "lt_voc": Expected(train=1142, test=4952, classes=20, groups=(6, 6, 8)),
    "lt_coco": Expected(train=1909, test=5000, classes=80, groups=(22, 33, 25)),
}


@functools.lru_cache(maxsize=None)
def published_split(name: str) -> PublishedSplit:
    """``name``: lt_voc | lt_coco."""
    with open(os.path.join(FOLDER, f"{name}_split.json"), encoding="utf-8") as f:
        raw = json.load(f)
    groups = np.full(len(raw["classes"]), -1, dtype=np.int64)
    for g, key in enumerate(SPLIT_KEYS):
        groups[list(raw["class_split"][key])] = g
    return PublishedSplit(list(raw["classes"]), [str(i) for i in raw["train_image_ids"]], raw["train_labels"], groups)
