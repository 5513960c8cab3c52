"""The label-embedding cache: ``<cache>/embeddings/<sha256>.pt``, the hash covering the encoder,
the options that change the result, the prompt and the class names."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from cssfe import cache

_CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """:func:`cssfe.cache.default_cache_dir` as a path, with ``~`` expanded."""
    return Path(cache.default_cache_dir()).expanduser()


def _cache_key(encoder: str, key_options: Dict[str, Any], prompt: str, class_names: Sequence[str]) -> str:
    blob = json.dumps(
        {
            "format": _CACHE_FORMAT,
            "encoder": encoder,
            "options": key_options,
            "prompt": prompt,
            "class_names": list(class_names),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _read_cache(path: Path, prompts: List[str]) -> Optional[torch.Tensor]:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        emb = payload["embeddings"]
        if payload.get("prompts") != prompts or emb.ndim != 2 or emb.shape[0] != len(prompts):
            raise ValueError("content does not match the request")
    except Exception as e:  # corrupt / foreign file: recompute and overwrite
        warnings.warn(f"ignoring unreadable label-embedding cache {path}: {e}")
        return None
    return emb.to(torch.float32).contiguous()


def _write_cache(path: Path, payload: Dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"could not write the label-embedding cache {path}: {e}")
