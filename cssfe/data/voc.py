"""Pascal VOC folders: ``JPEGImages/<id>.jpg`` and ``Annotations/<id>.xml`` (one ``<object>`` per
instance, its class in ``<name>``). An image's labels are the classes of all its objects; objects
marked ``<difficult>1</difficult>`` count as positive, as in LT-VOC's published labels."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence, Set

from cssfe.data.split_files import SplitFormatError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IMAGE_FOLDER = "JPEGImages"
ANNOTATION_FOLDER = "Annotations"
TEST_LIST = os.path.join("ImageSets", "Main", "test.txt")


def annotation_path(tree: str, image_id: str) -> str:
    return os.path.join(tree, ANNOTATION_FOLDER, image_id + ".xml")


def image_path(tree: str, image_id: str) -> str:
    return os.path.join(tree, IMAGE_FOLDER, image_id + ".jpg")


def object_names(path: str) -> List[str]:
    """Class names of every object in one annotation file (difficult ones included)."""
    if not os.path.isfile(path):
        raise SplitFormatError(f"no annotation for image {os.path.splitext(os.path.basename(path))[0]!r}: {path} not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise SplitFormatError(f"{path}: not valid XML ({exc})") from None
    names = []
    for obj in root.iter("object"):
        name = obj.findtext("name")
        if name is None or not name.strip():
            raise SplitFormatError(f"{path}: an <object> without a <name>")
        names.append(name.strip())
    return names


def discover_classes(tree: str, image_ids: Sequence[str]) -> List[str]:
    """Sorted class names found in the annotations of ``image_ids`` (for a user's own VOC folder
    without a class list)."""
    found: Set[str] = set()
    for image_id in image_ids:
        found.update(object_names(annotation_path(tree, image_id)))
    return sorted(found)


def label_sets(tree: str, image_ids: Sequence[str], class_names: Sequence[str]) -> List[List[int]]:
    """Class indices of each image; a name outside ``class_names`` is an error naming file and class."""
    index: Dict[str, int] = {name: i for i, name in enumerate(class_names)}
    out = []
    for image_id in image_ids:
        path = annotation_path(tree, image_id)
        classes = set()
        for name in object_names(path):
            c: Optional[int] = index.get(name)
            if c is None:
                raise SplitFormatError(f"{path}: unknown class name {name!r}; known classes: {', '.join(class_names)}")
            classes.add(c)
        out.append(sorted(classes))
    return out
