"""Class activation maps of a model whose head has them, and Grad-CAM on the backbone's last stage.

``class_maps`` gives a CSSFE head's first-pass maps A and refined maps A' (SPEC section 1) under the
model's own mask setting and under the other one (same weights, only the enhancement's mask
changes), a CPRFL head's attention of each prompt over the image, all upsampled to the image size.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F


def _upsample(maps: torch.Tensor, h: int, w: int, size) -> torch.Tensor:
    b, c, _ = maps.shape
    return F.interpolate(maps.reshape(b, c, h, w), size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def class_maps(model: torch.nn.Module, images: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> Dict[str, torch.Tensor]:
    """``{"maps", "refined_mask", "refined_nomask", "probs"}``: maps [B, C, H, W] upsampled to
    ``size`` (default: the input size), probs [B, C] of the model as trained. A head without
    refined maps (CPRFL: attention of each prompt) gives ``{"maps", "probs"}``."""
    head = model.head
    if not head.has_class_maps:
        raise TypeError(f"class activation maps need a head that has them (cssfe, cprfl); {type(head).__name__} has none (use gradcam)")
    feats = model.backbone(images)
    h, w = feats.shape[-2:]
    size = tuple(size or images.shape[-2:])
    out = {}
    for mask in (True, False):
        result = head(feats, return_maps=True, mask=mask)
        out["maps"] = _upsample(result["maps"], h, w, size)
        if not head.has_refined_maps:  # nothing that the mask changes
            out["probs"] = torch.sigmoid(result["logits"].float())
            return out
        out["refined_mask" if mask else "refined_nomask"] = _upsample(result["refined_maps"], h, w, size)
        if mask == head.mask:
            out["probs"] = torch.sigmoid(result["logits"].float())
    return out


def gradcam(
    model: torch.nn.Module, images: torch.Tensor, classes: torch.Tensor, size: Optional[Tuple[int, int]] = None, mask: Optional[bool] = None
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of ``classes`` [B] on the backbone output; [B, H, W] in [0, 1].
    ``mask`` overrides a CSSFE head's mask setting for the logits explained."""
    with torch.no_grad():
        feats = model.backbone(images)
    feats = feats.detach().requires_grad_(True)
    logits = model.head(feats, mask=mask)["logits"]
    chosen = logits.gather(1, classes.view(-1, 1)).sum()
    (grads,) = torch.autograd.grad(chosen, feats)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * feats).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(size or images.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)
    return (cam / peak[:, None, None]).detach()
