"""The pointing game (Zhang et al. 2016): a map scores a hit when its maximum falls in a box of its class."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from cssfe.metrics import GROUP_NAMES


def pointing_hits(maps: torch.Tensor, labels: torch.Tensor, boxes: Sequence[List[List[int]]]) -> List[tuple]:
    """(class, hit) for every positive class of every image; maps [B, C, H, W] in image pixels."""
    b, c, h, w = maps.shape
    flat = maps.flatten(2).argmax(-1)  # [B, C]
    ys, xs = (flat // w).numpy(), (flat % w).numpy()
    out = []
    for i in range(b):
        for cls in torch.nonzero(labels[i]).flatten().tolist():
            y, x = ys[i, cls], xs[i, cls]
            hit = any(bc == cls and x0 <= x < x1 and y0 <= y < y1 for bc, x0, y0, x1, y1 in boxes[i])
            out.append((cls, hit))
    return out


def pointing_game(hits: Sequence[tuple], groups: np.ndarray) -> Dict[str, float]:
    """Accuracy (%) over all (image, positive class) pairs, and per group."""
    classes = np.array([c for c, _ in hits], dtype=np.int64)
    ok = np.array([h for _, h in hits], dtype=np.float64)
    result = {"total": float(100 * ok.mean()) if len(ok) else float("nan")}
    for g, name in enumerate(GROUP_NAMES):
        sel = groups[classes] == g if len(classes) else np.zeros(0, dtype=bool)
        result[name] = float(100 * ok[sel].mean()) if sel.any() else float("nan")
    return result
