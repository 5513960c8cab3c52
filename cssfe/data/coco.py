"""COCO-format annotations: an ``instances_*.json`` read through pycocotools, images in one folder.

Class order is category-id order (COCO's 80 classes as LT-COCO numbers them); spaces in category
names become underscores (``traffic_light``), as in the published split. An image's labels are the
categories of all its annotations, crowd regions included.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Dict, List, Sequence

from cssfe.data.split_files import SplitFormatError


def class_name(category: Dict) -> str:
    return str(category["name"]).strip().replace(" ", "_")


class CocoAnnotations:
    """One annotation file; pycocotools is imported here only, so other datasets never need it."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise SplitFormatError(f"COCO annotation file not found: {path}")
        try:
            from pycocotools.coco import COCO
        except ImportError:
            raise SplitFormatError("COCO-format data needs pycocotools: pip install pycocotools") from None
        self.path = path
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints timing lines
                self.coco = COCO(path)
        except Exception as exc:
            raise SplitFormatError(f"{path}: not a COCO annotation file ({type(exc).__name__}: {exc})") from None
        categories = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        self.class_names = [class_name(c) for c in categories]
        self._category_index = {c["id"]: i for i, c in enumerate(categories)}

    def image_ids(self) -> List[str]:
        return [str(i) for i in sorted(self.coco.getImgIds())]

    def _image(self, image_id: str) -> Dict:
        try:
            key = int(image_id)
        except ValueError:
            key = image_id
        if key not in self.coco.imgs:
            raise SplitFormatError(f"no annotation for image {image_id!r}: it is not in {self.path}")
        return self.coco.imgs[key]

    def file_name(self, image_id: str) -> str:
        return self._image(image_id)["file_name"]

    def label_sets(self, image_ids: Sequence[str], class_names: Sequence[str]) -> List[List[int]]:
        """Class indices per image in the order of ``class_names`` (which the file's categories must
        all belong to: an unknown name is an error naming it)."""
        wanted = {name: i for i, name in enumerate(class_names)}
        unknown = [n for n in self.class_names if n not in wanted]
        if unknown:
            raise SplitFormatError(f"{self.path}: unknown class name(s) {unknown}; known classes: {', '.join(class_names)}")
        to_index = {cat: wanted[self.class_names[i]] for cat, i in self._category_index.items()}
        out = []
        for image_id in image_ids:
            image = self._image(image_id)
            anns = self.coco.imgToAnns.get(image["id"], [])
            stray = [a["category_id"] for a in anns if a["category_id"] not in to_index]
            if stray:
                raise SplitFormatError(f"{self.path}: image {image_id!r} has an annotation of category id {stray[0]}, "
                                       "which is not among its categories")
            out.append(sorted({to_index[a["category_id"]] for a in anns}))
        return out
