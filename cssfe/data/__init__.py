"""Datasets: the bundled long-tailed digits, split folders, LT-VOC / LT-COCO / ODIR-5K and own VOC or
COCO folders read from their annotations, and the registry that builds them."""
from cssfe.data.datasets import DATASETS, LAYOUTS, LongTailData, MultiLabelImages, build_data, load_annotated, load_split_folder
from cssfe.data.split_files import GROUP_NAMES, SplitFormatError

__all__ = ["DATASETS", "GROUP_NAMES", "LAYOUTS", "load_annotated", "LongTailData", "MultiLabelImages", "SplitFormatError", "build_data",
           "load_split_folder"]
