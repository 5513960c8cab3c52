"""``predict.py``: scores for image files, one JSON line per image; unreadable files are reported and skipped."""
from __future__ import annotations

import json
import os
import sys
from typing import Iterable, Iterator, List, Sequence, TextIO, Tuple

import torch
from PIL import Image, UnidentifiedImageError

from cssfe.data.split_files import IMAGE_EXTENSIONS
from cssfe.data.transforms import build_transform
from cssfe.engine.inference import TrainedModel


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Files as given, and the image files (by extension) found under directories, sorted."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for root, _, names in sorted(os.walk(item)):
                files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
        else:
            files.append(item)
    return files


def _batches(files: Iterable[str], transform, batch_size: int, errors: List[Tuple[str, str]]) -> Iterator[Tuple[List[str], torch.Tensor]]:
    names, tensors = [], []
    for path in files:
        try:
            with Image.open(path) as img:
                tensors.append(transform(img.convert("RGB")))
            names.append(path)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            errors.append((path, f"{type(exc).__name__}: {exc}"))
        if len(names) == batch_size:
            yield names, torch.stack(tensors)
            names, tensors = [], []
    if names:
        yield names, torch.stack(tensors)


@torch.no_grad()
def predict_files(
    trained: TrainedModel, inputs: Sequence[str], out: TextIO = sys.stdout, threshold: float = 0.5, batch_size: int = 64, device: str = "cpu"
) -> List[Tuple[str, str]]:
    """Write one JSON line per readable image; return the (file, reason) of those that failed."""
    transform = build_transform(trained.cfg.data.image_size, train=False)
    errors: List[Tuple[str, str]] = []
    files = expand_inputs(inputs)
    for names, images in _batches(files, transform, batch_size, errors):
        probs = torch.sigmoid(trained.model(images.to(device))["logits"].float()).cpu()
        for path, row in zip(names, probs.tolist()):
            scores = dict(zip(trained.class_names, (round(p, 6) for p in row)))
            labels = [c for c, p in zip(trained.class_names, row) if p >= threshold]
            out.write(json.dumps({"file": path, "labels": labels, "scores": scores}) + "\n")
    for path, reason in errors:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return errors
