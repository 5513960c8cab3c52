"""Load a trained model from a checkpoint written by ``train`` (best.pt or last.pt)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from cssfe.config import TrainConfig, from_dict
from cssfe.engine.checkpoint import load_checkpoint
from cssfe.models.model import MultiLabelClassifier, build_model


@dataclass
class TrainedModel:
    model: MultiLabelClassifier
    cfg: TrainConfig
    class_names: List[str]
    groups: np.ndarray
    class_freq: Optional[np.ndarray]


def load_trained(checkpoint: str, device: str = "cpu", cache_dir: Optional[str] = None) -> TrainedModel:
    """The EMA weights of ``checkpoint`` in eval mode; the text encoder is not needed (the label
    embeddings are part of the weights)."""
    state = load_checkpoint(checkpoint)
    missing = [k for k in ("config", "class_names", "groups") if k not in state]
    if missing:
        raise ValueError(f"{checkpoint}: not a cssfe training checkpoint (missing {', '.join(missing)})")
    cfg = from_dict(state["config"])
    weights = state["ema"] if "ema" in state else state["model"]
    embeddings = weights.get("head.embeddings")
    from cssfe.cache import default_cache_dir

    model = build_model(
        cfg.model, state["class_names"], state["groups"], cfg.data.image_size, cache_dir or cfg.cache_dir or default_cache_dir(),
        embeddings=embeddings
    )
    model.load_state_dict(weights)
    model.to(device).eval()
    freq = np.asarray(state["class_freq"]) if "class_freq" in state else None
    return TrainedModel(model, cfg, list(state["class_names"]), np.asarray(state["groups"]), freq)
