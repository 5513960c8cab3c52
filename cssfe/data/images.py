"""Reading images robustly: every mode to 8-bit RGB, and an up-front scan for unreadable files."""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode. 16-bit and float images are scaled by their range, not clipped
    (PIL's own convert would turn most of a 16-bit image white); alpha is dropped."""
    if img.mode in HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
        arr = np.clip((arr - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")  # uint8 2-D: mode L
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


ImageSource = Union[str, Tuple[str, ...]]  # one file, or several shown side by side as one sample


def read_rgb(source: ImageSource) -> Image.Image:
    """One file as RGB; a tuple of files (ODIR-5K's two eyes of one patient) side by side, each
    resized to the first one's height."""
    if isinstance(source, str):
        with Image.open(source) as img:
            img.load()
            return to_rgb(img)
    parts = [read_rgb(path) for path in source]
    height = parts[0].height
    parts = [p if p.height == height else p.resize((max(1, round(p.width * height / p.height)), height)) for p in parts]
    canvas = Image.new("RGB", (sum(p.width for p in parts), height))
    x = 0
    for p in parts:
        canvas.paste(p, (x, 0))
        x += p.width
    return canvas


def source_files(source: ImageSource) -> Tuple[str, ...]:
    return (source,) if isinstance(source, str) else tuple(source)


def find_unreadable(paths: Sequence[ImageSource], desc: str = "checking images", progress: bool = True) -> List[Tuple[int, str, str]]:
    """(index, path, reason) of every file that cannot be fully decoded (for a sample of several
    files, the first bad one)."""
    bad = []
    for i, source in enumerate(tqdm(paths, desc=desc, disable=not progress, leave=False, unit="img")):
        for path in source_files(source):
            try:
                with Image.open(path) as img:
                    img.load()  # a full decode: verify() alone lets truncated files through
                    if img.width == 0 or img.height == 0:
                        raise ValueError("empty image")
            except Exception as exc:  # PIL raises many types for corrupt data
                bad.append((i, path, f"{type(exc).__name__}: {exc}"))
                break
    return bad
