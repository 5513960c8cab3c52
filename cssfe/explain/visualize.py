"""``visualize.py``: PNG grids of the model's class activation maps and Grad-CAM.

One PNG per image; one row per class shown (the image's labels when known, else the top
predictions); columns: the image, the first-pass map A, the refined map A' with the
distribution-aware mask and without it (same weights, only the enhancement's mask changes), and
Grad-CAM on the backbone's last stage of the logits with and without the mask. A CPRFL head shows
each prompt's attention over the image and Grad-CAM; the baseline head, Grad-CAM alone.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from cssfe.data import GROUP_NAMES
from cssfe.data.images import ImageSource, read_rgb, source_files
from cssfe.data.transforms import build_transform
from cssfe.engine.inference import TrainedModel
from cssfe.explain.maps import class_maps, gradcam

COLUMNS = {
    "maps": "map A (1st pass)",
    "refined_mask": "A' with mask",
    "refined_nomask": "A' without mask",
    "gradcam_mask": "Grad-CAM with mask",
    "gradcam_nomask": "Grad-CAM without mask",
}
# A head whose maps have no refinement to compare (CPRFL): its one map per class, and Grad-CAM.
SINGLE_MAP_COLUMNS = {"maps": "prompt attention", "gradcam": "Grad-CAM"}


def pick_examples(labels: np.ndarray, groups: np.ndarray) -> Dict[str, int]:
    """For each group, the first image whose classes all belong to it (else any image with one)."""
    picks = {}
    for g, name in enumerate(GROUP_NAMES):
        has = labels[:, groups == g].sum(1) > 0
        only = has & (labels[:, groups != g].sum(1) == 0)
        candidates = np.flatnonzero(only) if only.any() else np.flatnonzero(has)
        if len(candidates):
            picks[name] = int(candidates[0])
    return picks


def render_grid(
    trained: TrainedModel, path: str, image_path: ImageSource, classes: Optional[Sequence[int]] = None, top_k: int = 3, title: str = ""
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = trained.model
    rgb = read_rgb(image_path)  # a file, or ODIR-5K's two eyes side by side (what the model saw)
    size = (rgb.height, rgb.width)
    x = build_transform(trained.cfg.data.image_size, train=False)(rgb)[None]
    titles = {"gradcam": "Grad-CAM"}
    if model.head.has_class_maps:
        maps = class_maps(model, x, size=size)
        probs = maps["probs"][0]
        titles = COLUMNS if "refined_mask" in maps else SINGLE_MAP_COLUMNS
    else:
        with torch.no_grad():
            probs = torch.sigmoid(model(x)["logits"].float())[0]
    if classes is None:
        classes = torch.argsort(probs, descending=True)[:top_k].tolist()
    columns = list(titles)
    fig, axes = plt.subplots(len(classes), len(columns) + 1, figsize=(2.1 * (len(columns) + 1), 2.2 * len(classes)), dpi=90, squeeze=False)
    image = np.asarray(rgb)
    for row, cls in enumerate(classes):
        group = GROUP_NAMES[trained.groups[cls]]
        axes[row, 0].imshow(image)
        axes[row, 0].set_ylabel(f"{trained.class_names[cls]}\n({group}, p={probs[cls]:.2f})", fontsize=8)
        for col, key in enumerate(columns, start=1):
            if key.startswith("gradcam"):
                mask = {"gradcam": None, "gradcam_mask": True, "gradcam_nomask": False}[key]
                heat = gradcam(model, x, torch.tensor([cls]), size=size, mask=mask)[0]
            else:
                heat = maps[key][0, cls]
            axes[row, col].imshow(image)
            axes[row, col].imshow(heat.numpy(), cmap="jet", alpha=0.5)
            if row == 0:
                axes[row, col].set_title(titles[key], fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def visualize(trained: TrainedModel, output_dir: str, images: Optional[Sequence[str]] = None, dataset=None) -> List[str]:
    """Grids for the given image files, or for a head, a medium and a tail example of ``dataset``."""
    written = []
    if images:
        for p in images:
            name = os.path.splitext(os.path.basename(p))[0]
            written.append(render_grid(trained, os.path.join(output_dir, f"{name}_maps.png"), p))
        return written
    if dataset is None:
        raise ValueError("give image files or a dataset to pick head / medium / tail examples from")
    labels = dataset.labels.numpy()
    for group, index in pick_examples(labels, trained.groups).items():
        classes = np.flatnonzero(labels[index]).tolist()
        path = os.path.join(output_dir, f"{group}_example_maps.png")
        shown = " + ".join(os.path.basename(f) for f in source_files(dataset.paths[index]))
        written.append(render_grid(trained, path, dataset.paths[index], classes, title=f"{group} example: {shown}"))
    return written
