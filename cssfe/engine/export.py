"""Export a trained model to a standalone inference artifact (``torch.export``), checked to give
the same scores as the model it came from."""
from __future__ import annotations

import torch

from cssfe.engine.inference import TrainedModel


class ScoresOnly(torch.nn.Module):
    """images [B, 3, H, W] -> class probabilities [B, C]."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(images)["logits"].float())


def export_model(trained: TrainedModel, path: str, batch_size: int = 2, atol: float = 1e-5) -> float:
    """Write ``path`` (a .pt2 file, load with ``torch.export.load(path).module()``) and return the
    largest score difference on a random batch; raises if it exceeds ``atol``."""
    wrapper = ScoresOnly(trained.model).eval()
    size = trained.cfg.data.image_size
    example = torch.randn(batch_size, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(wrapper, (example,), dynamic_shapes={"images": {0: batch}})
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    check = torch.randn(batch_size + 1, 3, size, size)
    with torch.no_grad():
        diff = float((loaded(check) - wrapper(check)).abs().max())
    if diff > atol:
        raise RuntimeError(f"exported model differs from the original by {diff:.2e} (> {atol})")
    return diff
