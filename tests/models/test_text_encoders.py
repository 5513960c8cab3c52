import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from cssfe.models.text_encoders import TEXT_ENCODERS, is_learnable, label_embeddings
from cssfe.models.text_encoders.clip import _cached_tag_checkpoint, _tag_quick_gelu_for_file
from cssfe.models.text_encoders.registry import _format_prompts

CLASSES = ["dog", "traffic_light", "airplane"]


def _raise(*args, **kwargs):
    raise AssertionError("the encoder must not run on a cache hit")


def test_registry_and_learnable():
    assert {"rie", "minilm", "clip", "bert", "glove", "word2vec"} <= set(TEXT_ENCODERS.names())
    assert is_learnable("rie")
    assert not is_learnable("minilm") and not is_learnable("clip")
    with pytest.raises(KeyError, match="rie"):
        label_embeddings("bart", CLASSES, cache_dir="/nonexistent")
    with pytest.raises(KeyError):
        is_learnable("bart")


def test_prompt_formatting():
    assert _format_prompts("a photo of {}.", ["traffic_light"]) == ["a photo of traffic light."]
    assert _format_prompts("a {class}", ["hair_drier"]) == ["a hair drier"]
    with pytest.raises(ValueError):
        _format_prompts("no placeholder", ["dog"])
    with pytest.raises(TypeError):
        _format_prompts("{}", "dog")


def test_rie_shape_norm_determinism_and_cache(tmp_path, monkeypatch, capsys):
    e1 = label_embeddings("rie", CLASSES, cache_dir=str(tmp_path), seed=3, dim=16)
    assert capsys.readouterr().out.count("\n") == 1  # one line when computing
    assert e1.shape == (3, 16) and e1.dtype == torch.float32
    torch.testing.assert_close(e1.norm(dim=1), torch.ones(3))
    files = list((tmp_path / "embeddings").glob("*.pt"))
    assert len(files) == 1 and len(files[0].stem) == 64
    assert not list((tmp_path / "embeddings").glob("*.tmp"))

    monkeypatch.setitem(TEXT_ENCODERS._entries, "rie", _raise)
    e2 = label_embeddings("rie", CLASSES, cache_dir=str(tmp_path), seed=3, dim=16)
    assert capsys.readouterr().out == ""  # silent cache hit
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    with pytest.raises(AssertionError):  # other options -> other file -> encoder runs
        label_embeddings("rie", CLASSES, cache_dir=str(tmp_path), seed=4, dim=16)
    monkeypatch.undo()

    # deterministic without the cache, and seed/dim change the result
    direct = TEXT_ENCODERS.get("rie")(["a", "b", "c"], seed=3, dim=16)
    torch.testing.assert_close(direct, e1, rtol=0, atol=0)
    assert not torch.equal(TEXT_ENCODERS.get("rie")(["a", "b", "c"], seed=4, dim=16), e1)
    assert TEXT_ENCODERS.get("rie")(["a"] * 5).shape == (5, 384)
    with pytest.raises(TypeError, match="rie"):
        label_embeddings("rie", CLASSES, cache_dir=str(tmp_path), sede=1)


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CSSFE_CACHE", str(tmp_path / "c"))
    label_embeddings("rie", ["x"], dim=4)
    assert len(list((tmp_path / "c" / "embeddings").glob("*.pt"))) == 1


# ------------------------------------------------------------------------------------ MiniLM
@pytest.fixture(scope="module")
def minilm_result(tmp_path_factory):
    cache = tmp_path_factory.mktemp("minilm_cache")
    emb = label_embeddings("minilm", ["dog", "puppy", "airplane"], prompt="{}", cache_dir=str(cache))
    return cache, emb


def test_minilm(minilm_result, monkeypatch):
    cache, emb = minilm_result
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    photo = TEXT_ENCODERS.get("minilm")(["a photo of dog."])  # model already loaded in-process
    assert photo.shape == (1, 384)
    sims = photo @ emb[1:].T
    assert sims[0, 0] > sims[0, 1]  # closer to "puppy" than to "airplane"
    monkeypatch.setitem(TEXT_ENCODERS._entries, "minilm", _raise)
    again = label_embeddings("minilm", ["dog", "puppy", "airplane"], prompt="{}", cache_dir=str(cache))
    torch.testing.assert_close(again, emb, rtol=0, atol=0)


# -------------------------------------------------------------------------------------- CLIP
TINY = "cssfe-test-tiny-clip"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip
    from open_clip import factory

    folder = tmp_path_factory.mktemp("tiny_clip")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    cfg_file = folder / f"{TINY}.json"
    cfg_file.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_file)
    try:
        torch.manual_seed(0)
        model = open_clip.create_model(TINY).eval()
        ckpt = folder / "open_clip_pytorch_model.bin"
        torch.save(model.state_dict(), ckpt)
        yield model, ckpt
    finally:
        factory._MODEL_CONFIG_PATHS.remove(cfg_file)
        factory._MODEL_CONFIGS.pop(TINY, None)


def test_clip_local_checkpoint(tiny_clip, tmp_path, monkeypatch):
    import open_clip

    model, ckpt = tiny_clip
    emb = label_embeddings("clip", CLASSES, cache_dir=str(tmp_path), model_name=TINY, pretrained=str(ckpt))
    prompts = ["a photo of dog.", "a photo of traffic light.", "a photo of airplane."]
    with torch.no_grad():
        ref = F.normalize(model.encode_text(open_clip.get_tokenizer(TINY)(prompts)), dim=-1)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setitem(TEXT_ENCODERS._entries, "clip", _raise)
    again = label_embeddings("clip", CLASSES, cache_dir=str(tmp_path), model_name=TINY, pretrained=str(ckpt))
    torch.testing.assert_close(again, emb, rtol=0, atol=0)


def test_clip_missing_file(tmp_path):
    missing = tmp_path / "nope" / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match="pretrained") as info:
        label_embeddings("clip", CLASSES, cache_dir=str(tmp_path), pretrained=str(missing))
    assert str(missing) in str(info.value)


def test_clip_uncached_tag_fails_fast(tmp_path, monkeypatch):
    # Empty Hugging Face cache and home: the tag's weights cannot be found -> clear RuntimeError, with
    # no download tried and no model built (which is what made it slow: retries over the network).
    import huggingface_hub
    import huggingface_hub.constants
    import open_clip
    import open_clip.pretrained

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    attempts = []
    for module, name in ((open_clip, "create_model"), (open_clip.pretrained, "download_pretrained"),
                         (open_clip.pretrained, "download_pretrained_from_url"), (huggingface_hub, "hf_hub_download"),
                         (open_clip.pretrained, "download_pretrained_from_hf")):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, lambda *a, _name=name, **k: attempts.append(_name))
    with pytest.raises(RuntimeError, match="model.embedding_options.pretrained to a local checkpoint file"):
        label_embeddings("clip", CLASSES, cache_dir=str(tmp_path), model_name="ViT-B-32", pretrained="openai")
    assert attempts == []
    with pytest.raises(ValueError, match="tags"):
        label_embeddings("clip", CLASSES, cache_dir=str(tmp_path), model_name="ViT-B-32", pretrained="nosuchtag")
    with pytest.raises(ValueError, match="model_name"):
        label_embeddings("clip", CLASSES, cache_dir=str(tmp_path), model_name="NoSuchNet", pretrained="openai")


def test_clip_tag_lookup_in_local_caches(tmp_path, monkeypatch):
    from pathlib import Path

    import huggingface_hub.constants

    hf = tmp_path / "hf"
    snap = hf / "models--org--repo" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (hf / "models--org--repo" / "refs").mkdir()
    (hf / "models--org--repo" / "refs" / "main").write_text("abc123")
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"x")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    found, _ = _cached_tag_checkpoint({"hf_hub": "org/repo/"})
    assert found == str(snap / "open_clip_pytorch_model.bin")
    assert _cached_tag_checkpoint({"hf_hub": "org/other/"})[0] is None
    clip_dir = tmp_path / "home" / ".cache" / "clip"
    clip_dir.mkdir(parents=True)
    (clip_dir / "W.pt").write_bytes(b"x")
    assert _cached_tag_checkpoint({"url": "https://example.invalid/a/W.pt"})[0] == str(clip_dir / "W.pt")
    # OpenAI weights need QuickGELU: recognised from the HF cache path of the tag
    openai_file = Path("/x/models--timm--vit_base_patch32_clip_224.openai/snapshots/s/open_clip_pytorch_model.bin")
    assert _tag_quick_gelu_for_file("ViT-B-32", openai_file) is True
    assert _tag_quick_gelu_for_file("ViT-B-32", Path("/x/open_clip_pytorch_model.bin")) is False
