"""Datasets read from their original annotations (VOC XML, COCO JSON, the ODIR-5K table) with
image lists and long-tail split files, checked before any training.

Each registered dataset has a :class:`Layout`: where its parts are by default, relative to
``data.root``. Every part can be set in the config instead (``data.train_images``,
``data.train_annotations``, ``data.train_list``, the same for ``test``, and ``data.split_dir``);
relative paths are taken from ``data.root``.

Image lists hold an image id per line, or ``path idx idx ...`` (the later repositories' format, the
labels then come from the list). The split files (``class_freq.pkl``, ``class_split.pkl``) are
read from ``data.split_dir`` (default: beside the training list) and checked against the labels;
for a user's own data they are computed from the training labels (thresholds ``data.head_min``,
``data.tail_max``) and written there when absent.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cssfe.data import split_files
from cssfe.data.annotation_formats import ANNOTATION_FORMATS, AnnotationReader
from cssfe.data.images import ImageSource, source_files
from cssfe.data.odir import split_patients
from cssfe.data.published import published_split
from cssfe.data.split_files import SplitFormatError

PARTS = ("train_images", "test_images", "train_annotations", "test_annotations", "train_list", "test_list", "split_dir")


@dataclass(frozen=True)
class Layout:
    """Default places (candidates under ``data.root``, the first that exists wins; the first is
    where files are written) of a dataset's parts. An empty tuple: the part has no default."""

    format: str
    train_images: Tuple[str, ...] = ("",)
    test_images: Tuple[str, ...] = ()  # () -> same as train
    train_annotations: Tuple[str, ...] = ()
    test_annotations: Tuple[str, ...] = ()  # () -> same as train
    train_list: Tuple[str, ...] = ("train.txt",)
    test_list: Tuple[str, ...] = ("test.txt",)
    split_dir: Tuple[str, ...] = ()  # () -> the training list's folder
    published: Optional[str] = None  # name of the shipped split (lt_voc, lt_coco)
    test_list_optional: bool = False  # no test list: every annotated test image (with a shared
    # table and no training list either, a seeded split of it)


@dataclass
class Entries:
    """One split, resolved: ids, image files, labels."""

    ids: List[str]
    sources: List[ImageSource]
    labels: np.ndarray  # uint8 [n, C]


@dataclass
class AnnotatedParts:
    """What :func:`read_annotated` found, before images are opened."""

    class_names: List[str]
    train: Entries
    test: Entries
    groups: np.ndarray
    split_dir: str
    generated: Dict[str, str]  # split -> where its list came from when it was not read from a file
    found_split: bool = False  # the groups came from an existing class_split.pkl
    written: List[str] = field(default_factory=list)  # split files written by this call
    lists: Dict[str, str] = field(default_factory=dict)  # split -> its list file, or what made the list


def _resolve(cfg, layout: Layout, part: str) -> Optional[str]:
    """The configured path, else the first existing default, else the first default (which may not
    exist: the caller decides whether that is an error)."""
    given = getattr(cfg, part)
    if given:
        return given if os.path.isabs(given) else os.path.join(cfg.root, given)
    candidates = getattr(layout, part)
    if not candidates and part.startswith("test_") and part != "test_list":
        return _resolve(cfg, layout, "train_" + part[len("test_"):])
    paths = [os.path.join(cfg.root, c) for c in candidates]
    for p in paths:
        if os.path.exists(p):
            return p
    return paths[0] if paths else None


def _need(path: Optional[str], key: str, layout: Layout, kind: str) -> str:
    if path is None or not os.path.exists(path):
        defaults = getattr(layout, key.split(".")[-1])
        looked = f" (looked for {', '.join(defaults)} under data.root)" if defaults and defaults != ("",) else ""
        raise SplitFormatError(f"{kind} not found: {path}{looked}; set config key '{key}'")
    return path


def _read_rows(path: Optional[str], num_classes: Optional[int]) -> Optional[List[Tuple[str, Optional[List[int]]]]]:
    if path is None or not os.path.isfile(path):
        return None
    return split_files.read_image_list(path, num_classes)


def _class_names(cfg, layout: Layout, reader: AnnotationReader, ids: Sequence[str], list_dir: str) -> List[str]:
    if layout.published:
        return list(published_split(layout.published).classes)
    for folder in (list_dir, cfg.root):
        if os.path.isfile(os.path.join(folder, "classes.txt")):
            return split_files.read_classes(folder)
    return reader.class_names(ids)


def _entries(rows, reader: AnnotationReader, class_names: Sequence[str], list_path: str, root: str) -> Entries:
    """Rows ``(id, labels or None)`` -> ids, image files, labels. Paths of ``path idx ...`` lines are
    taken from data.root, else from the list's folder."""
    ids, sources, sets = [], [], []
    pending = []
    for name, labels in rows:
        if labels is None:
            pending.append(len(ids))
            ids.append(name)
            sources.append(reader.source(name))
            sets.append(None)
        else:
            path = name if os.path.isabs(name) else os.path.join(root, name)
            if not os.path.isfile(path) and os.path.isfile(os.path.join(os.path.dirname(list_path), name)):
                path = os.path.join(os.path.dirname(list_path), name)
            ids.append(os.path.splitext(os.path.basename(name))[0])
            sources.append(path)
            sets.append(labels)
    if pending:
        for i, labels in zip(pending, reader.label_sets([ids[i] for i in pending], class_names)):
            sets[i] = labels
    return Entries(ids, sources, split_files.labels_matrix(sets, len(class_names)))


def _check_files_exist(entries: Entries, split: str) -> None:
    missing = [p for s in entries.sources for p in source_files(s) if not os.path.isfile(p)]
    if missing:
        listing = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SplitFormatError(f"{len(missing)} {split} image file(s) not found: {listing}")


def _check_published_labels(name: str, entries: Entries) -> None:
    """Training labels read from the annotations must equal the published ones (image by image)."""
    known = published_split(name).labels_by_id()
    for image_id, row in zip(entries.ids, entries.labels):
        if image_id in known and np.flatnonzero(row).tolist() != sorted(known[image_id]):
            raise SplitFormatError(
                f"image {image_id!r}: labels from the annotations {np.flatnonzero(row).tolist()} differ from the published "
                f"{name} labels {sorted(known[image_id])} (objects marked difficult must count as positive)")


def _groups(cfg, layout: Layout, split_dir: str, train: Entries, names: Sequence[str]) -> Tuple[np.ndarray, bool]:
    """(groups, whether they came from a class_split.pkl); a class_freq.pkl found is checked."""
    freq_path = os.path.join(split_dir, "class_freq.pkl")
    split_path = os.path.join(split_dir, "class_split.pkl")
    if os.path.isfile(freq_path):
        split_files.check_class_freq(freq_path, train.ids, train.labels)
    if os.path.isfile(split_path):
        return split_files.class_split_to_groups(split_files.read_pickle(split_path), len(names), split_path), True
    if layout.published:
        return published_split(layout.published).groups.copy(), False
    return split_files.groups_from_frequencies(train.labels.sum(0), cfg.head_min, cfg.tail_max), False


def save_split_files(cfg, layout: Layout, parts: "AnnotatedParts") -> List[str]:
    """Write ``class_freq.pkl`` and ``class_split.pkl`` (the groups already chosen) into the split
    folder, and the image lists that were not read from files where the layout looks for them next
    time. Returns the files written."""
    written = []
    for split, entries in (("train", parts.train), ("test", parts.test)):
        defaults = getattr(layout, f"{split}_list")
        if split in parts.generated and defaults:
            path = os.path.join(cfg.root, defaults[0])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            split_files.atomic_write(path, "\n".join(entries.ids) + "\n")
            written.append(path)
    split_files.write_class_files(parts.split_dir, parts.train.labels, groups=parts.groups)
    return written + [os.path.join(parts.split_dir, n) for n in ("class_freq.pkl", "class_split.pkl")]


def read_annotated(cfg, layout: Layout, write_split_files: Optional[bool] = None) -> AnnotatedParts:
    """Resolve and check every part of an annotated dataset (``cfg``: a DataConfig). Split files are
    written when absent: always for a user's own data, for published datasets only when
    ``write_split_files`` (``launch/prepare_data.py``); published ones otherwise come from the
    package."""
    if not cfg.root:
        raise SplitFormatError(f"config key 'data.root' must name the dataset folder for data.name={cfg.name}")
    if not os.path.isdir(cfg.root):
        raise SplitFormatError(f"dataset folder not found: {cfg.root} (config key 'data.root')")
    write = layout.published is None if write_split_files is None else write_split_files
    paths: Dict[str, Optional[str]] = {part: _resolve(cfg, layout, part) for part in PARTS}
    reader_cls = ANNOTATION_FORMATS.get(layout.format)
    train_reader = reader_cls(_need(paths["train_images"], "data.train_images", layout, "training image folder"),
                              paths["train_annotations"]
                              and _need(paths["train_annotations"], "data.train_annotations", layout, "training annotations"))
    same = (paths["test_images"], paths["test_annotations"]) == (paths["train_images"], paths["train_annotations"])
    test_reader = train_reader if same else reader_cls(
        _need(paths["test_images"], "data.test_images", layout, "test image folder"),
        paths["test_annotations"] and _need(paths["test_annotations"], "data.test_annotations", layout, "test annotations"))

    published = published_split(layout.published) if layout.published else None
    num_classes = len(published.classes) if published else None
    train_rows = _read_rows(paths["train_list"], num_classes)
    test_rows = _read_rows(paths["test_list"], num_classes)
    generated: Dict[str, str] = {}  # split -> where its list came from, when not from a file
    if train_rows is None:
        if published:
            train_rows, generated["train"] = [(i, None) for i in published.train_ids], "the published split"
        elif same and test_rows is None and layout.test_list_optional:
            split = split_patients(train_reader.image_ids(), cfg.test_fraction, cfg.seed)
            train_rows, test_rows = [(i, None) for i in split["train"]], [(i, None) for i in split["test"]]
            generated["train"] = generated["test"] = f"a seeded split (data.seed={cfg.seed}, data.test_fraction={cfg.test_fraction})"
        else:
            _need(paths["train_list"], "data.train_list", layout, "training image list")
    if test_rows is None:
        if not layout.test_list_optional:
            _need(paths["test_list"], "data.test_list", layout, "test image list")
        taken = {r[0] for r in train_rows} if same else set()
        test_rows = [(i, None) for i in test_reader.image_ids() if i not in taken]
        generated["test"] = "every annotated test image"

    list_dir = os.path.dirname(paths["train_list"]) if paths["train_list"] else cfg.root
    names = _class_names(cfg, layout, train_reader, [r[0] for r in train_rows + test_rows if r[1] is None], list_dir)
    for rows, path in ((train_rows, paths["train_list"]), (test_rows, paths["test_list"])):
        bad = [c for _, ix in rows if ix for c in ix if c >= len(names)]
        if bad:
            raise SplitFormatError(f"{path}: class index {bad[0]} is outside 0..{len(names) - 1} (the dataset has {len(names)} classes)")
    train = _entries(train_rows, train_reader, names, paths["train_list"] or cfg.root, cfg.root)
    test = _entries(test_rows, test_reader, names, paths["test_list"] or cfg.root, cfg.root)
    if not len(train.ids) or not len(test.ids):
        raise SplitFormatError(f"the {'training' if not len(train.ids) else 'test'} list is empty")
    _check_files_exist(train, "training")
    _check_files_exist(test, "test")
    if layout.published:
        _check_published_labels(layout.published, train)
    split_dir = paths["split_dir"] or list_dir
    groups, found = _groups(cfg, layout, split_dir, train, names)
    lists = {split: generated.get(split) or paths[f"{split}_list"] for split in ("train", "test")}
    parts = AnnotatedParts(names, train, test, groups, split_dir, generated, found, lists=lists)
    if write and not found:
        try:
            parts.written = save_split_files(cfg, layout, parts)
        except OSError as exc:  # a read-only dataset still trains: the split is then only in memory
            print(f"cssfe: could not write split files to {split_dir}: {exc}", file=sys.stderr)
    return parts
