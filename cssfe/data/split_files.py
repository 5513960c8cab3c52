"""The long-tail split format of LT-VOC / LT-COCO, read and written in one place.

A split folder holds::

    classes.txt              one class name per line, in label order
    class_split.pkl          {'head': set, 'middle': set, 'tail': set} of class indices
    <split>/img_id.txt       one image id per line (split = train, test)
    <split>/class_freq.pkl   {'gt_labels': uint8 [n, C], 'class_freq', 'neg_class_freq', 'condition_prob'}
    images/<id>.png|.jpg     the images

``class_freq.pkl`` and ``class_split.pkl`` are the published files' formats (DB-loss benchmark):
``gt_labels`` aligned with ``img_id.txt``, ``condition_prob[i, j]`` = P(class j | class i).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import uuid
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from cssfe.metrics import GROUP_NAMES  # noqa: F401  (re-exported: one definition of the group names)

SPLIT_KEYS = ("head", "middle", "tail")  # the published pickle's keys
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


class SplitFormatError(ValueError):
    """A split file is missing, unreadable or disagrees with the others; the message names the file."""


# What the published pickles (and the ones written here) are made of: containers and numbers, numpy
# arrays, dtypes and scalars (numpy 1 pickles name numpy.core, numpy 2 numpy._core). Any other
# global (a function such as os.system that a crafted file could ask to call) is refused.
_ALLOWED_GLOBALS = {
    "builtins": {"set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "bool", "str", "bytes", "bytearray"},
    "numpy": {"ndarray", "dtype"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.numeric": {"_frombuffer"},
    "_codecs": {"encode"},  # how protocol-2 pickles store bytes (a numpy array's data)
}
_MODULE_ALIASES = {"numpy.core.multiarray": "numpy._core.multiarray", "numpy.core.numeric": "numpy._core.numeric",
                   "__builtin__": "builtins", "copy_reg": "copyreg"}


class _SplitUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # numpy arrays in Python 2 pickles
        self.path = path

    def find_class(self, module: str, name: str):
        resolved = _MODULE_ALIASES.get(module, module)
        if name in _ALLOWED_GLOBALS.get(resolved, ()):
            return getattr(importlib.import_module(resolved), name)
        if resolved == "numpy.dtypes" and name.endswith("DType"):  # numpy 2 dtype classes: plain data types
            cls = getattr(importlib.import_module(resolved), name, None)
            if isinstance(cls, type) and issubclass(cls, np.dtype):
                return cls
        raise SplitFormatError(
            f"{self.path}: refused to unpickle: it asks for {module}.{name}, which a split file never holds "
            f"(only containers, numbers and numpy arrays are admitted; the file may have been crafted to run code)")


def load_pickle_bytes(raw: bytes, path: str):
    """Unpickle ``raw`` (the contents of ``path``) admitting only what split files are made of."""
    return _SplitUnpickler(io.BytesIO(raw), path).load()


def class_statistics(labels: np.ndarray) -> Dict[str, np.ndarray]:
    labels = np.asarray(labels, dtype=np.uint8)
    class_freq = labels.sum(0).astype(np.int64)
    co = labels.T.astype(np.float64) @ labels.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        condition_prob = np.where(class_freq[:, None] > 0, co / np.maximum(class_freq[:, None], 1), 0.0)
    return {
        "gt_labels": labels,
        "class_freq": class_freq,
        "neg_class_freq": len(labels) - class_freq,
        "condition_prob": condition_prob,
    }


def groups_from_frequencies(class_freq: Sequence[int], head_min: int = 100, tail_max: int = 20) -> np.ndarray:
    """Group per class: 0 head (n >= head_min), 1 medium, 2 tail (n < tail_max)."""
    freq = np.asarray(class_freq)
    return np.where(freq >= head_min, 0, np.where(freq >= tail_max, 1, 2)).astype(np.int64)


def groups_to_class_split(groups: np.ndarray) -> Dict[str, set]:
    return {key: {int(c) for c in np.flatnonzero(groups == g)} for g, key in enumerate(SPLIT_KEYS)}


def class_split_to_groups(split: Dict[str, set], num_classes: int, path: str = "class_split.pkl") -> np.ndarray:
    missing = [k for k in SPLIT_KEYS if k not in split]
    if missing:
        raise SplitFormatError(f"{path}: missing key(s) {missing}; expected {list(SPLIT_KEYS)}")
    groups = np.full(num_classes, -1, dtype=np.int64)
    for g, key in enumerate(SPLIT_KEYS):
        for c in split[key]:
            c = int(c)
            if not 0 <= c < num_classes:
                raise SplitFormatError(f"{path}: class index {c} under '{key}' is outside 0..{num_classes - 1}")
            if groups[c] != -1:
                raise SplitFormatError(f"{path}: class index {c} is in two groups")
            groups[c] = g
    if (groups == -1).any():
        raise SplitFormatError(f"{path}: class indices {np.flatnonzero(groups == -1).tolist()} are in no group")
    return groups


def _labels_matrix(label_sets: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    out = np.zeros((len(label_sets), num_classes), dtype=np.uint8)
    for i, classes in enumerate(label_sets):
        out[i, list(classes)] = 1
    return out


def atomic_write(path: str, data: Union[bytes, str]) -> None:
    """Write ``data`` to ``path`` through a temporary file of its own in the same folder, then
    rename it over ``path``: a reader sees the old file or the new one, never a part of one, and
    writers that meet (ranks of one node preparing a node-local data root) never share a
    temporary file; the last rename wins, whole."""
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex}.tmp"  # unique per writer; open() honours the umask
    try:
        with open(tmp, "xb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _dump(obj, path: str) -> None:
    atomic_write(path, pickle.dumps(obj))


def write_split_folder(
    root: str,
    class_names: Sequence[str],
    ids: Dict[str, List[str]],
    label_sets: Dict[str, List[List[int]]],
    head_min: int = 100,
    tail_max: int = 20,
) -> np.ndarray:
    """Write classes.txt, <split>/img_id.txt, <split>/class_freq.pkl and class_split.pkl (from train)."""
    atomic_write(os.path.join(root, "classes.txt"), "\n".join(class_names) + "\n")
    for split in ids:
        os.makedirs(os.path.join(root, split), exist_ok=True)
        atomic_write(os.path.join(root, split, "img_id.txt"), "\n".join(ids[split]) + "\n")
        _dump(class_statistics(_labels_matrix(label_sets[split], len(class_names))), os.path.join(root, split, "class_freq.pkl"))
    train_freq = _labels_matrix(label_sets["train"], len(class_names)).sum(0)
    groups = groups_from_frequencies(train_freq, head_min, tail_max)
    _dump(groups_to_class_split(groups), os.path.join(root, "class_split.pkl"))
    return groups


def _list_lines(path: str) -> List[str]:
    """Non-empty lines of a list file; a pickled list (of ids) gives one line per item. Files named
    .pkl that are plain text (LT-COCO's img_id.pkl) are read as text."""
    if not os.path.isfile(path):
        raise SplitFormatError(f"image id list not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".pkl"):
        try:
            obj = load_pickle_bytes(raw, path)
            return [str(x) for x in obj]
        except SplitFormatError:
            raise  # a pickle that asks for a forbidden global: never read it as text
        except Exception:
            pass  # the published LT-COCO id file is text despite its name
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SplitFormatError(f"{path}: neither a pickle nor UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_id_list(path: str) -> List[str]:
    """Image ids, one per line (the first word of each line)."""
    return [line.split()[0] for line in _list_lines(path)]


def read_image_list(path: str, num_classes: Optional[int] = None) -> List[Tuple[str, Optional[List[int]]]]:
    """(image id or path, class indices or None) per line. A line is ``id`` (labels come from the
    annotations) or ``path idx idx ...`` (the format of later LT-VOC/LT-COCO repositories; a path
    followed by no index is an image without labels only when other lines carry indices)."""
    rows: List[Tuple[str, Optional[List[int]]]] = []
    for number, line in enumerate(_list_lines(path), 1):
        words = line.split()
        try:
            indices = [int(w) for w in words[1:]]
        except ValueError:
            raise SplitFormatError(f"{path}, line {number}: expected 'image [class index ...]', got {line!r}") from None
        if num_classes is not None:
            bad = [c for c in indices if not 0 <= c < num_classes]
            if bad:
                raise SplitFormatError(
                    f"{path}, line {number}: class index {bad[0]} is outside 0..{num_classes - 1} "
                    f"(the dataset has {num_classes} classes)")
        rows.append((words[0], indices))
    with_labels = any(len(ix) > 0 for _, ix in rows)
    return [(name, ix if with_labels else None) for name, ix in rows]


def labels_matrix(label_sets: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    return _labels_matrix(label_sets, num_classes)


def write_class_files(folder: str, labels: np.ndarray, head_min: int = 100, tail_max: int = 20,
                      groups: Optional[np.ndarray] = None) -> np.ndarray:
    """``class_freq.pkl`` of the training labels and ``class_split.pkl`` (``groups``, or computed
    from the frequencies with the thresholds) into ``folder``; returns the groups."""
    os.makedirs(folder, exist_ok=True)
    stats = class_statistics(labels)
    _dump(stats, os.path.join(folder, "class_freq.pkl"))
    if groups is None:
        groups = groups_from_frequencies(stats["class_freq"], head_min, tail_max)
    _dump(groups_to_class_split(groups), os.path.join(folder, "class_split.pkl"))
    return groups


def check_class_freq(path: str, ids: Sequence[str], labels: np.ndarray) -> None:
    """A ``class_freq.pkl`` must describe exactly these training labels (same rows, same order)."""
    stats = read_pickle(path)
    if not isinstance(stats, dict) or "gt_labels" not in stats:
        raise SplitFormatError(f"{path}: expected a dict with 'gt_labels'")
    stored = np.asarray(stats["gt_labels"], dtype=np.uint8)
    if stored.ndim != 2 or stored.shape[1] != labels.shape[1]:
        raise SplitFormatError(f"{path}: gt_labels has shape {stored.shape}, expected [n, {labels.shape[1]}] (the dataset's class count)")
    if len(stored) != len(labels):
        raise SplitFormatError(f"{path}: {len(stored)} label rows but the training list has {len(labels)} images")
    if "class_freq" in stats and not np.array_equal(np.asarray(stats["class_freq"]), stored.sum(0)):
        raise SplitFormatError(f"{path}: class_freq disagrees with the column sums of gt_labels")
    rows = np.flatnonzero((stored != labels).any(1))
    if len(rows):
        i = int(rows[0])
        raise SplitFormatError(
            f"{path}: labels of {len(rows)} training image(s) disagree with the annotations, first {ids[i]!r}: "
            f"file {np.flatnonzero(stored[i]).tolist()} vs annotations {np.flatnonzero(labels[i]).tolist()}")


def read_pickle(path: str):
    if not os.path.isfile(path):
        raise SplitFormatError(f"split file not found: {path}")
    try:
        with open(path, "rb") as f:
            return load_pickle_bytes(f.read(), path)
    except SplitFormatError:
        raise
    except Exception as exc:
        raise SplitFormatError(f"{path}: cannot be unpickled ({type(exc).__name__}: {exc})") from None


def read_split(root: str, split: str, num_classes: int) -> Tuple[List[str], np.ndarray]:
    """(image ids, labels uint8 [n, C]) of one split of a split folder, checked for agreement."""
    id_path = os.path.join(root, split, "img_id.txt")
    freq_path = os.path.join(root, split, "class_freq.pkl")
    ids = read_id_list(id_path)
    stats = read_pickle(freq_path)
    if not isinstance(stats, dict) or "gt_labels" not in stats:
        raise SplitFormatError(f"{freq_path}: expected a dict with 'gt_labels'")
    labels = np.asarray(stats["gt_labels"], dtype=np.uint8)
    if labels.ndim != 2 or labels.shape[1] != num_classes:
        raise SplitFormatError(f"{freq_path}: gt_labels has shape {labels.shape}, expected [n, {num_classes}]")
    if len(labels) != len(ids):
        raise SplitFormatError(f"{freq_path}: {len(labels)} label rows but {id_path} lists {len(ids)} images")
    if "class_freq" in stats and not np.array_equal(np.asarray(stats["class_freq"]), labels.sum(0)):
        raise SplitFormatError(f"{freq_path}: class_freq disagrees with the column sums of gt_labels")
    return ids, labels


def read_classes(root: str) -> List[str]:
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        raise SplitFormatError(f"class list not found: {path}")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if len(set(names)) != len(names):
        raise SplitFormatError(f"{path}: duplicate class names")
    return names


def find_image(root: str, image_id: str) -> str:
    for ext in IMAGE_EXTENSIONS:
        path = os.path.join(root, "images", image_id + ext)
        if os.path.isfile(path):
            return path
    raise SplitFormatError(f"image {image_id!r} not found under {os.path.join(root, 'images')} ({'/'.join(IMAGE_EXTENSIONS)})")
