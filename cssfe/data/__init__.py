"""Datasets: the bundled long-tailed digits, split folders, and the registry that builds them."""
from cssfe.data.datasets import DATASETS, LongTailData, MultiLabelImages, build_data, load_split_folder
from cssfe.data.split_files import GROUP_NAMES, SplitFormatError

__all__ = ["DATASETS", "GROUP_NAMES", "LongTailData", "MultiLabelImages", "SplitFormatError", "build_data", "load_split_folder"]
