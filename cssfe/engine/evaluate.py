"""Evaluation: scores of the whole evaluation set, then the long-tail metrics on fp32 scores."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cssfe.metrics import evaluate_scores, left_out_note


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device, progress: bool = False) -> Dict[str, np.ndarray]:
    """Sigmoid scores of the final (``scores``) and first-pass (``scores0``) logits, and the targets."""
    model.eval()
    scores, scores0, targets = [], [], []
    for images, labels, _ in tqdm(loader, desc="eval", leave=False, disable=not progress):
        out = model(images.to(device, non_blocking=True))
        scores.append(torch.sigmoid(out["logits"].float()).cpu())
        if "logits0" in out:
            scores0.append(torch.sigmoid(out["logits0"].float()).cpu())
        targets.append(labels)
    result = {"scores": torch.cat(scores).numpy(), "targets": torch.cat(targets).numpy()}
    if scores0:
        result["scores0"] = torch.cat(scores0).numpy()
    return result


def evaluate(model: torch.nn.Module, loader: DataLoader, groups: np.ndarray, device: torch.device, progress: bool = False,
             gather: Optional[Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]] = None,
             class_names: Optional[Sequence[str]] = None) -> Dict:
    """``{"mAP": {...}, "f1": {...}, "per_class_ap": [...], "left_out": {...}}`` (see
    :func:`cssfe.metrics.evaluate_scores`), plus ``first_pass_mAP`` for CSSFE heads.
    ``gather`` joins the predictions of a shard of the evaluation set with the other ranks' shards."""
    pred = predict(model, loader, device, progress)
    if gather is not None:
        pred = gather(pred)
    metrics = evaluate_scores(pred["scores"], pred["targets"], groups, class_names=class_names)
    if "scores0" in pred:
        metrics["first_pass_mAP"] = evaluate_scores(pred["scores0"], pred["targets"], groups)["mAP"]
    return metrics


def format_table(rows: Dict[str, Dict[str, float]], title: str = "mAP (%)", left_out: Optional[Dict[str, list]] = None) -> str:
    """A small text table: one row per name, columns total / head / medium / tail mAP; with
    ``left_out`` (metrics' ``left_out``) a last line names the classes the means leave out."""
    cols = ("total", "head", "medium", "tail")
    width = max(12, len(title), *(len(name) for name in rows))
    lines = [f"{title:<{width}} " + " ".join(f"{c:>7}" for c in cols)]
    for name, values in rows.items():
        lines.append(f"{name:<{width}} " + " ".join("    n/a" if values[c] is None else f"{values[c]:7.2f}" for c in cols))
    note = left_out_note(left_out)
    return "\n".join(lines + ([note] if note else []))
