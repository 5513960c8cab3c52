"""The whole classifier: backbone + head, built from the model config."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from cssfe.models.backbones import build_backbone
from cssfe.models.heads import HEADS
from cssfe.models.text_encoders import is_learnable, label_embeddings


class MultiLabelClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, return_maps: bool = False) -> Dict[str, torch.Tensor]:
        return self.head(self.backbone(images), return_maps=return_maps)


def build_model(
    cfg, class_names: Sequence[str], groups, image_size: int, cache_dir: str, embeddings: Optional[torch.Tensor] = None
) -> MultiLabelClassifier:
    """``cfg`` is a :class:`cssfe.config.ModelConfig`. ``embeddings`` (e.g. from a checkpoint) skip the text encoder."""
    head_cls = HEADS.get(cfg.head)
    backbone = build_backbone(cfg.backbone, pretrained=cfg.pretrained, weights_path=cfg.weights_path, image_size=image_size)
    learnable = head_cls.uses_label_embeddings and is_learnable(cfg.embedding)
    if head_cls.uses_label_embeddings and embeddings is None:
        embeddings = label_embeddings(cfg.embedding, class_names, prompt=cfg.prompt, cache_dir=cache_dir, **cfg.embedding_options)
    options = head_cls.config_options(cfg, learnable_embeddings=learnable)
    head = head_cls(backbone.out_channels, len(class_names), embeddings, groups, **options)
    return MultiLabelClassifier(backbone, head)
