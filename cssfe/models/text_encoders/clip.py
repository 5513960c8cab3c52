"""``clip``: the text tower of an open_clip model, its weights from a local checkpoint file or an
open_clip pretrained tag found in the local caches (a download only with ``download=True``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from cssfe.models.text_encoders.huggingface import _hf_offline
from cssfe.models.text_encoders.registry import register_encoder

CLIP_OPTION_HINT = (
    "set model.embedding_options.pretrained to a local checkpoint file "
    "(e.g. open_clip_pytorch_model.bin) or pre-populate the open_clip cache"
)

_CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz", ".ckpt")


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


@register_encoder("clip", _clip_key)
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
