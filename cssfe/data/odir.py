"""ODIR-5K: colour fundus photographs of both eyes per patient, eight diagnostic labels per patient.

The annotation table (``ODIR-5K_Training_Annotations(Updated)_V2.xlsx`` in the release, or the
same columns as ``.csv``) has one row per patient: ``ID``, ``Left-Fundus``, ``Right-Fundus`` (image
file names) and the 0/1 columns ``N D G C A H M O``. The labels belong to the patient, not to one
eye, so a sample is the patient: both photographs side by side (see
:func:`cssfe.data.images.read_rgb`).
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from cssfe.data.split_files import SplitFormatError

# Column letter -> class name (words a text encoder can read).
LABEL_COLUMNS = (
    ("N", "normal"),
    ("D", "diabetic_retinopathy"),
    ("G", "glaucoma"),
    ("C", "cataract"),
    ("A", "age_related_macular_degeneration"),
    ("H", "hypertensive_retinopathy"),
    ("M", "pathological_myopia"),
    ("O", "other_abnormality"),
)
ODIR_CLASSES = tuple(name for _, name in LABEL_COLUMNS)
ID_COLUMN, LEFT_COLUMN, RIGHT_COLUMN = "ID", "Left-Fundus", "Right-Fundus"


def _read_table(path: str):
    if not os.path.isfile(path):
        raise SplitFormatError(f"ODIR-5K annotation table not found: {path}")
    import pandas as pd  # only ODIR-5K needs pandas (and openpyxl for .xlsx)

    try:
        if path.lower().endswith((".xlsx", ".xls")):
            try:
                return pd.read_excel(path)
            except ImportError as exc:
                raise SplitFormatError(f"{path}: reading .xlsx needs openpyxl (pip install openpyxl): {exc}") from None
        return pd.read_csv(path)
    except SplitFormatError:
        raise
    except Exception as exc:
        raise SplitFormatError(f"{path}: cannot be read as a table ({type(exc).__name__}: {exc})") from None


class OdirTable:
    """Patients of the annotation table: id -> (left file, right file) and 8 labels."""

    def __init__(self, path: str):
        self.path = path
        table = _read_table(path)
        table.columns = [str(c).strip() for c in table.columns]
        needed = [ID_COLUMN, LEFT_COLUMN, RIGHT_COLUMN] + [c for c, _ in LABEL_COLUMNS]
        missing = [c for c in needed if c not in table.columns]
        if missing:
            raise SplitFormatError(f"{path}: missing column(s) {missing}; expected {needed}")
        labels = table[[c for c, _ in LABEL_COLUMNS]]
        bad = ~labels.isin([0, 1]).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise SplitFormatError(f"{path}: labels of patient {table[ID_COLUMN].iloc[row]!r} are not all 0 or 1")
        ids = [str(i).strip() for i in table[ID_COLUMN]]
        if len(set(ids)) != len(ids):
            raise SplitFormatError(f"{path}: duplicate patient ids")
        self.files: Dict[str, Tuple[str, str]] = {
            i: (str(left).strip(), str(right).strip()) for i, left, right in zip(ids, table[LEFT_COLUMN], table[RIGHT_COLUMN])
        }
        self.labels: Dict[str, np.ndarray] = dict(zip(ids, labels.to_numpy(dtype=np.uint8)))

    def patient_ids(self) -> List[str]:
        return list(self.files)

    def label_sets(self, patient_ids: Sequence[str]) -> List[List[int]]:
        out = []
        for pid in patient_ids:
            if pid not in self.labels:
                raise SplitFormatError(f"no annotation for patient {pid!r}: it is not in {self.path}")
            out.append(np.flatnonzero(self.labels[pid]).tolist())
        return out


def split_patients(patient_ids: Sequence[str], test_fraction: float, seed: int) -> Dict[str, List[str]]:
    """A seeded train/test split of the patients (the release has no labelled test set)."""
    order = np.random.default_rng(seed).permutation(len(patient_ids))
    n_test = int(round(test_fraction * len(patient_ids)))
    test = sorted(order[:n_test].tolist())
    train = sorted(order[n_test:].tolist())
    return {"train": [patient_ids[i] for i in train], "test": [patient_ids[i] for i in test]}
