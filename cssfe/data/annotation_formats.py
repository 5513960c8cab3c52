"""One reader per annotation format (``voc``, ``coco``, ``odir``), all with the same four questions:
which images exist, which classes, the labels of given images, and the file(s) of an image."""
from __future__ import annotations

import abc
import glob
import os
from typing import List, Optional, Sequence

from cssfe.data import voc
from cssfe.data.coco import CocoAnnotations
from cssfe.data.images import ImageSource
from cssfe.data.odir import ODIR_CLASSES, OdirTable
from cssfe.data.split_files import SplitFormatError
from cssfe.registry import Registry

ANNOTATION_FORMATS: Registry = Registry("annotation format")


class AnnotationReader(abc.ABC):
    """``images``: the image folder (VOC: the year folder holding JPEGImages and Annotations);
    ``annotations``: the annotation file where the format has one."""

    def __init__(self, images: str, annotations: Optional[str]):
        self.images = images
        self.annotations = annotations

    @abc.abstractmethod
    def image_ids(self) -> List[str]:
        """Every annotated image id, in the format's order."""

    @abc.abstractmethod
    def class_names(self, image_ids: Sequence[str]) -> List[str]:
        """The class list, in the order the published split files use."""

    @abc.abstractmethod
    def label_sets(self, image_ids: Sequence[str], class_names: Sequence[str]) -> List[List[int]]:
        """For each image id, the indices of its classes."""

    @abc.abstractmethod
    def source(self, image_id: str) -> ImageSource:
        """The file (or files) to read for one image id."""


@ANNOTATION_FORMATS.register("voc")
class VocReader(AnnotationReader):
    def image_ids(self) -> List[str]:
        files = glob.glob(os.path.join(self.images, voc.ANNOTATION_FOLDER, "*.xml"))
        return sorted(os.path.splitext(os.path.basename(f))[0] for f in files)

    def class_names(self, image_ids: Sequence[str]) -> List[str]:
        return voc.discover_classes(self.images, image_ids)

    def label_sets(self, image_ids, class_names):
        return voc.label_sets(self.images, image_ids, class_names)

    def source(self, image_id: str) -> ImageSource:
        return voc.image_path(self.images, image_id)


@ANNOTATION_FORMATS.register("coco")
class CocoReader(AnnotationReader):
    def __init__(self, images: str, annotations: Optional[str]):
        super().__init__(images, annotations)
        if annotations is None:
            raise SplitFormatError("COCO-format data needs an annotation file (config key data.train_annotations / data.test_annotations)")
        self.coco = CocoAnnotations(annotations)

    def image_ids(self) -> List[str]:
        return self.coco.image_ids()

    def class_names(self, image_ids):
        return list(self.coco.class_names)

    def label_sets(self, image_ids, class_names):
        return self.coco.label_sets(image_ids, class_names)

    def source(self, image_id: str) -> ImageSource:
        return os.path.join(self.images, self.coco.file_name(image_id))


@ANNOTATION_FORMATS.register("odir")
class OdirReader(AnnotationReader):
    def __init__(self, images: str, annotations: Optional[str]):
        super().__init__(images, annotations)
        if annotations is None:
            raise SplitFormatError("ODIR-5K needs its annotation table (config key data.train_annotations)")
        self.table = OdirTable(annotations)

    def image_ids(self) -> List[str]:
        return self.table.patient_ids()

    def class_names(self, image_ids):
        return list(ODIR_CLASSES)

    def label_sets(self, image_ids, class_names):
        if list(class_names) != list(ODIR_CLASSES):
            unknown = [n for n in class_names if n not in ODIR_CLASSES]
            raise SplitFormatError(f"ODIR-5K has the classes {list(ODIR_CLASSES)}; unknown class name(s) {unknown or list(class_names)}")
        return self.table.label_sets(image_ids)

    def source(self, image_id: str) -> ImageSource:
        if image_id not in self.table.files:
            raise SplitFormatError(f"no annotation for patient {image_id!r}: it is not in {self.table.path}")
        return tuple(os.path.join(self.images, name) for name in self.table.files[image_id])
