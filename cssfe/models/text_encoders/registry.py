"""The text-encoder registry and :func:`label_embeddings`, the one way to call an encoder:
prompts from the class names, the options checked, the result cached (``cache.py``).

An encoder is a function ``(prompts, **options) -> [len(prompts), e]`` registered with
:func:`register_encoder` together with its option normaliser, which returns the options that
change the result (defaults filled in) for the cache key and rejects unknown option names early.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

import torch

from cssfe.models.text_encoders.cache import _cache_key, _read_cache, _write_cache, default_cache_dir
from cssfe.registry import Registry

TEXT_ENCODERS: Registry = Registry("text encoder")

# Per-encoder option normalisers: (**options) -> dict of the options that change the result
# (with defaults filled in), used for the cache key.  They also validate option names early.
_CACHE_KEY_OPTIONS: Dict[str, Callable[..., Dict[str, Any]]] = {}
_LEARNABLE: Set[str] = set()  # encoders whose embeddings are meant to be trained


def register_encoder(name: str, key_options: Callable[..., Dict[str, Any]], learnable: bool = False):
    """Register an encoder under ``name`` with its option normaliser ``key_options``."""
    def wrap(fn):
        _CACHE_KEY_OPTIONS[name] = key_options
        if learnable:
            _LEARNABLE.add(name)
        return TEXT_ENCODERS.register(name)(fn)

    return wrap


def is_learnable(encoder: str) -> bool:
    """True when the embeddings of ``encoder`` are meant to be trained (only ``"rie"``: registered ``learnable``)."""
    TEXT_ENCODERS.check(encoder)
    return encoder in _LEARNABLE


def _format_prompts(prompt: str, class_names: Sequence[str]) -> List[str]:
    if isinstance(class_names, (str, bytes)) or not hasattr(class_names, "__iter__"):
        raise TypeError(f"class_names must be a sequence of strings, got {type(class_names).__name__}")
    class_names = list(class_names)
    if len(class_names) == 0:
        raise ValueError("class_names is empty")
    for name in class_names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class names must be non-empty strings, got {name!r}")
    template = prompt.replace("{class}", "{}")
    if "{}" not in template:
        raise ValueError(f"prompt {prompt!r} must contain '{{}}' (or '{{class}}') for the class name")
    return [template.replace("{}", name.replace("_", " ").strip()) for name in class_names]


def label_embeddings(
    encoder: str,
    class_names: Sequence[str],
    prompt: str = "a photo of {}.",
    cache_dir: Optional[str] = None,
    **options: Any,
) -> torch.Tensor:
    """Embeddings ``[C, e]`` (float32, CPU) of ``prompt`` filled with each class name.

    ``cache_dir`` (default :func:`default_cache_dir`) gets the result under ``embeddings/``;
    a later call with the same encoder, result-changing options, prompt and class names reads
    it back without loading the encoder.  ``options`` go to the encoder (see the package's doc).
    """
    TEXT_ENCODERS.check(encoder)
    if not isinstance(class_names, (str, bytes)) and hasattr(class_names, "__iter__"):
        class_names = list(class_names)
    prompts = _format_prompts(prompt, class_names)
    normalise = _CACHE_KEY_OPTIONS.get(encoder, lambda **kw: dict(kw))
    try:
        key_options = normalise(**options)
    except TypeError as e:
        raise TypeError(f"bad options for text encoder {encoder!r}: {e}") from e

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / "embeddings" / f"{_cache_key(encoder, key_options, prompt, class_names)}.pt"
    cached = _read_cache(path, prompts)
    if cached is not None:
        return cached

    print(f"cssfe: computing {encoder} label embeddings for {len(prompts)} classes -> {path}", flush=True)
    emb = TEXT_ENCODERS.get(encoder)(prompts, **options)
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != len(prompts):
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise RuntimeError(f"text encoder {encoder!r} returned {shape}, expected [{len(prompts)}, e]")
    emb = emb.detach().to(device="cpu", dtype=torch.float32).contiguous()
    _write_cache(
        path,
        {"embeddings": emb, "encoder": encoder, "options": json.loads(json.dumps(key_options, default=str)),
         "prompts": prompts},
    )
    return emb.clone()
