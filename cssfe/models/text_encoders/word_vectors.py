"""Embeddings without a language model: ``rie`` (random unit vectors, seeded, learnable) and
``glove`` / ``word2vec`` (the mean of the word vectors of the prompt, gensim ``KeyedVectors``
from a local file)."""
from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from cssfe.models.text_encoders.registry import register_encoder


# --------------------------------------------------------------------------------------------
# rie: random init embeddings
# --------------------------------------------------------------------------------------------
def _rie_key(seed: int = 0, dim: int = 384) -> Dict[str, Any]:
    if int(dim) != dim or dim < 1:
        raise ValueError(f"rie option dim must be a positive int, got {dim!r}")
    if int(seed) != seed:
        raise ValueError(f"rie option seed must be an int, got {seed!r}")
    return {"seed": int(seed), "dim": int(dim)}


@register_encoder("rie", _rie_key, learnable=True)
def rie(prompts: List[str], seed: int = 0, dim: int = 384) -> torch.Tensor:
    opts = _rie_key(seed, dim)
    gen = torch.Generator(device="cpu").manual_seed(opts["seed"])
    emb = torch.randn(len(prompts), opts["dim"], generator=gen, dtype=torch.float32)
    return F.normalize(emb, dim=1)


# --------------------------------------------------------------------------------------------
# glove, word2vec: mean of the word vectors of the prompt (gensim KeyedVectors from a local file)
# --------------------------------------------------------------------------------------------
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")


def _vectors_key(kind: str, path: Optional[str] = None, binary: Optional[bool] = None, lowercase: bool = True) -> Dict[str, Any]:
    if not path:
        raise ValueError(f"the {kind} encoder needs a local vectors file: set model.embedding_options.path")
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{kind} vectors file not found: {str(file)!r} (option model.embedding_options.path={path!r})")
    st = file.stat()
    return {"file": {"path": str(file.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns},
            "binary": _is_binary(file, binary), "lowercase": bool(lowercase)}


def _is_binary(file: Path, binary: Optional[bool]) -> bool:
    return bool(binary) if binary is not None else file.suffix.lower() == ".bin"


@functools.lru_cache(maxsize=2)
def _load_vectors(path: str, binary: bool, glove: bool):
    """gensim KeyedVectors: a gensim ``.kv`` file, word2vec text / binary, or GloVe text (no header)."""
    try:
        from gensim.models import KeyedVectors
    except ImportError:
        raise ImportError("GloVe / Word2Vec embeddings need gensim: pip install gensim (or cssfe[embeddings])") from None
    if path.endswith(".kv"):
        return KeyedVectors.load(path)
    if glove and not binary:
        with open(path, encoding="utf-8") as f:
            first = f.readline().split()
        has_header = len(first) == 2 and all(w.isdigit() for w in first)  # word2vec-style "count dim" line
        return KeyedVectors.load_word2vec_format(path, binary=False, no_header=not has_header)
    return KeyedVectors.load_word2vec_format(path, binary=binary)


def _mean_word_vectors(kind: str, prompts: List[str], path: str, binary: Optional[bool], lowercase: bool) -> torch.Tensor:
    file = Path(path).expanduser()
    vectors = _load_vectors(str(file), _is_binary(file, binary), kind == "glove")
    rows, missing = [], {}
    for prompt in prompts:
        found = []
        for word in _WORD.findall(prompt):
            for form in ((word.lower(),) if lowercase else (word, word.lower())):
                if form in vectors.key_to_index:
                    found.append(vectors[form])
                    break
            else:
                missing.setdefault(word, prompt)
        if not found:
            raise ValueError(f"{kind}: no word of the prompt {prompt!r} is in the vocabulary of {str(file)!r}")
        rows.append(torch.as_tensor(np.mean(found, axis=0), dtype=torch.float32))
    if missing:
        warnings.warn(f"{kind}: {len(missing)} word(s) not in the vocabulary of {file.name}, left out of the mean: "
                      + ", ".join(sorted(missing)))
    return torch.stack(rows)


@register_encoder("glove", functools.partial(_vectors_key, "glove"))
def glove(prompts: List[str], path: Optional[str] = None, binary: Optional[bool] = None, lowercase: bool = True) -> torch.Tensor:
    _vectors_key("glove", path, binary, lowercase)
    return _mean_word_vectors("glove", prompts, path, binary, lowercase)


@register_encoder("word2vec", functools.partial(_vectors_key, "word2vec", lowercase=False))
def word2vec(prompts: List[str], path: Optional[str] = None, binary: Optional[bool] = None, lowercase: bool = False) -> torch.Tensor:
    _vectors_key("word2vec", path, binary, lowercase)
    return _mean_word_vectors("word2vec", prompts, path, binary, lowercase)
