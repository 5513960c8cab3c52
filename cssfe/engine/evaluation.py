"""``evaluate.py``: metrics of a checkpoint on its test set, per-class AP table and chart, pointing game."""
from __future__ import annotations

import csv
import json
import logging
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from cssfe import ops
from cssfe.cache import default_cache_dir
from cssfe.config import apply_overrides
from cssfe.data import GROUP_NAMES, build_data
from cssfe.engine.evaluate import evaluate, format_table
from cssfe.engine.inference import load_trained
from cssfe.explain.maps import class_maps
from cssfe.explain.pointing import pointing_game, pointing_hits

logger = logging.getLogger(__name__)

GROUP_COLOURS = {"head": "#1f77b4", "medium": "#ff7f0e", "tail": "#d62728"}


def per_class_chart(path: str, class_names: Sequence[str], ap: Sequence[Optional[float]], groups: np.ndarray, freq: np.ndarray) -> None:
    """Bar chart of per-class AP ordered by training frequency, coloured by group, saved to ``path``."""
    fig = per_class_figure(class_names, ap, groups, freq)  # selects the Agg backend first
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)


def per_class_figure(class_names: Sequence[str], ap: Sequence[Optional[float]], groups: np.ndarray, freq: np.ndarray):
    """The matplotlib figure of :func:`per_class_chart` (also drawn into TensorBoard during training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-freq, kind="stable")
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(order) + 2), 4), dpi=100)
    values = [np.nan if ap[i] is None else ap[i] for i in order]
    colours = [GROUP_COLOURS[GROUP_NAMES[groups[i]]] for i in order]
    ax.bar(range(len(order)), values, color=colours)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([f"{class_names[i]} ({freq[i]})" for i in order], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("AP (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-class AP, classes ordered by training positives")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=n) for n, c in GROUP_COLOURS.items()], loc="upper right")
    fig.tight_layout()
    return fig


@torch.no_grad()
def pointing_scores(model, dataset, test_ids, boxes, groups, batch_size: int = 128, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Pointing-game accuracy of the first-pass maps, the refined maps with and without the mask,
    and of uniformly random maps (the chance level)."""
    with Image.open(dataset.paths[0]) as img:
        size = (img.height, img.width)  # boxes are in the stored image's pixels
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    hits: Dict[str, list] = {"maps": [], "refined_mask": [], "refined_nomask": [], "random": []}
    generator = torch.Generator().manual_seed(seed)
    for images, labels, index in tqdm(loader, desc="pointing game", leave=False):
        image_boxes = [boxes[test_ids[i]] for i in index.tolist()]
        maps = class_maps(model, images, size=size)
        for key in ("maps", "refined_mask", "refined_nomask"):
            hits[key] += pointing_hits(maps[key], labels, image_boxes)
        noise = torch.rand(maps["maps"].shape, generator=generator)
        hits["random"] += pointing_hits(noise, labels, image_boxes)
    return {key: pointing_game(value, groups) for key, value in hits.items()}


def evaluate_checkpoint(checkpoint: str, output_dir: Optional[str] = None, overrides: Sequence[str] = (), device: str = "cpu",
                        progress: bool = True) -> Dict[str, Any]:
    trained = load_trained(checkpoint, device=device)
    cfg = trained.cfg
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    backend = ops.kernel_backend(cfg.kernels)  # the run's backend (override kernels=...); checked before any work
    output_dir = output_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "eval")
    data = build_data(cfg.data, cfg.cache_dir or default_cache_dir(), progress=progress)
    if data.class_names != trained.class_names:
        raise ValueError(f"{checkpoint}: the checkpoint's classes differ from the dataset's at {data.root}")
    loader = DataLoader(data.test, batch_size=cfg.data.eval_batch_size, shuffle=False)
    groups = trained.groups
    with backend:
        metrics = evaluate(trained.model, loader, groups, torch.device(device), progress=progress, class_names=trained.class_names)
        if data.boxes is not None and trained.model.head.has_refined_maps:
            metrics["pointing_game"] = pointing_scores(trained.model, data.test, data.test_ids, data.boxes, groups)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(checkpoint), **metrics}, f, indent=2)
    freq = trained.class_freq if trained.class_freq is not None else data.class_freq
    with open(os.path.join(output_dir, "per_class_ap.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "group", "train_positives", "ap"])
        for i, name in enumerate(trained.class_names):  # an empty ap: no test positive, left out of the means
            writer.writerow([name, GROUP_NAMES[groups[i]], int(freq[i]), metrics["per_class_ap"][i]])
    per_class_chart(os.path.join(output_dir, "per_class_ap.png"), trained.class_names, metrics["per_class_ap"], groups, np.asarray(freq))
    rows = {"final": metrics["mAP"]}
    if "first_pass_mAP" in metrics:
        rows["first pass"] = metrics["first_pass_mAP"]
    logger.info(format_table(rows, left_out=metrics["left_out"]))
    f1 = metrics["f1"]
    logger.info(f"F1: weighted {f1['weighted']:.3f}, micro {f1['micro']:.3f}, macro {f1['macro']:.3f}")
    if "pointing_game" in metrics:
        names = {"maps": "maps A", "refined_mask": "A' with mask", "refined_nomask": "A' without mask", "random": "random maps"}
        logger.info(format_table({names[k]: v for k, v in metrics["pointing_game"].items()}, title="pointing game (%)"))
    logger.info(f"wrote {output_dir}/metrics.json, per_class_ap.csv, per_class_ap.png")
    return metrics
