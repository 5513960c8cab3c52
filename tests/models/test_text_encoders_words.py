"""BERT (a tiny randomly initialised model the test saves), GloVe and Word2Vec (small vectors files
the test writes): shapes, values, caching, determinism, and the errors for missing files."""
import inspect
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cssfe.models.text_encoders import TEXT_ENCODERS, is_learnable, label_embeddings

CLASSES = ["dog", "traffic_light", "airplane"]
PROMPTS = ["a photo of dog.", "a photo of traffic light.", "a photo of airplane."]


def _raise(*args, **kwargs):
    raise AssertionError("the encoder must not run on a cache hit")


# -------------------------------------------------------------------------------------- BERT
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "dog", "traffic", "light", "air", "##plane", "."]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 names the argument vocab, earlier versions vocab_file
    name = "vocab_file" if "vocab_file" in inspect.signature(BertTokenizer.__init__).parameters else "vocab"
    BertTokenizer(**{name: str(folder / "vocab.txt")}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32)
    BertModel(config).eval().save_pretrained(folder)
    return folder


def test_bert_from_a_local_folder_matches_mean_pooling_and_caches(tiny_bert, tmp_path, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    emb = label_embeddings("bert", CLASSES, cache_dir=str(tmp_path), model=str(tiny_bert))
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    with torch.no_grad():
        rows = []
        for prompt in PROMPTS:  # one at a time: no padding to leave out
            rows.append(model(**tokenizer(prompt, return_tensors="pt")).last_hidden_state[0].mean(0))
    torch.testing.assert_close(emb, F.normalize(torch.stack(rows), dim=1), rtol=1e-4, atol=1e-5)
    assert tokenizer.tokenize("a photo of airplane.") == ["a", "photo", "of", "air", "##plane", "."]  # no [UNK]
    monkeypatch.setitem(TEXT_ENCODERS._entries, "bert", _raise)
    again = label_embeddings("bert", CLASSES, cache_dir=str(tmp_path), model=str(tiny_bert))
    torch.testing.assert_close(again, emb, rtol=0, atol=0)
    monkeypatch.undo()
    fresh = label_embeddings("bert", CLASSES, cache_dir=str(tmp_path / "fresh"), model=str(tiny_bert))
    torch.testing.assert_close(fresh, emb, rtol=0, atol=0)  # deterministic: recomputed, same numbers
    cls = label_embeddings("bert", CLASSES, cache_dir=str(tmp_path / "other"), model=str(tiny_bert), pooling="cls")
    assert not torch.allclose(cls, emb)
    assert not is_learnable("bert")


def test_bert_missing_weights_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.embedding_options.model"):
        label_embeddings("bert", CLASSES, cache_dir=str(tmp_path), model=str(tmp_path / "no_such_folder"))
    with pytest.raises(RuntimeError, match="model.embedding_options.model to a local folder"):
        label_embeddings("bert", CLASSES, cache_dir=str(tmp_path), model="cssfe-test/not-in-any-cache")
    with pytest.raises(ValueError, match="pooling"):
        label_embeddings("bert", CLASSES, cache_dir=str(tmp_path), model="x", pooling="max")


# ----------------------------------------------------------------------------- GloVe, Word2Vec
VECTORS = {
    "a": [1, 0, 0, 0], "photo": [0, 1, 0, 0], "of": [0, 0, 1, 0],
    "dog": [0, 0, 0, 4], "puppy": [0, 0, 1, 4], "airplane": [4, 4, 0, -4],
    "traffic": [2, 0, 0, 0], "light": [0, 2, 0, 0], "hair": [1, 1, 1, 1],
}


def _glove_file(path, header: bool = False):
    lines = [f"{w} " + " ".join(f"{x:.1f}" for x in v) for w, v in VECTORS.items()]
    path.write_text((f"{len(VECTORS)} 4\n" if header else "") + "\n".join(lines) + "\n")
    return path


def _expected(words):
    return torch.tensor(np.mean([VECTORS[w] for w in words], axis=0), dtype=torch.float32)


@pytest.mark.parametrize("header", [False, True])
def test_glove_mean_of_word_vectors_cached_and_deterministic(tmp_path, monkeypatch, header):
    vectors = _glove_file(tmp_path / "glove.4d.txt", header)
    emb = label_embeddings("glove", CLASSES, cache_dir=str(tmp_path / "c1"), path=str(vectors))
    assert emb.shape == (3, 4)
    torch.testing.assert_close(emb[0], _expected(["a", "photo", "of", "dog"]))
    torch.testing.assert_close(emb[1], _expected(["a", "photo", "of", "traffic", "light"]))
    torch.testing.assert_close(label_embeddings("glove", CLASSES, cache_dir=str(tmp_path / "c2"), path=str(vectors)), emb, rtol=0, atol=0)
    monkeypatch.setitem(TEXT_ENCODERS._entries, "glove", _raise)
    torch.testing.assert_close(label_embeddings("glove", CLASSES, cache_dir=str(tmp_path / "c1"), path=str(vectors)), emb, rtol=0, atol=0)
    # "dog" is closer to "puppy" than to "airplane", through the same prompt
    monkeypatch.undo()
    e = F.normalize(label_embeddings("glove", ["dog", "puppy", "airplane"], cache_dir=str(tmp_path / "c3"), path=str(vectors)), dim=1)
    assert e[0] @ e[1] > e[0] @ e[2]


def test_glove_reports_missing_words_and_rejects_unknown_prompts(tmp_path):
    vectors = _glove_file(tmp_path / "glove.txt")
    with pytest.warns(UserWarning, match="1 word\\(s\\) not in the vocabulary of glove.txt.*drier"):
        emb = label_embeddings("glove", ["hair_drier"], cache_dir=str(tmp_path), path=str(vectors))
    torch.testing.assert_close(emb[0], _expected(["a", "photo", "of", "hair"]))
    with pytest.raises(ValueError, match="no word of the prompt 'zebra' is in the vocabulary"):
        label_embeddings("glove", ["zebra"], prompt="{}", cache_dir=str(tmp_path), path=str(vectors))


def test_word2vec_binary_file_case_and_missing_file(tmp_path):
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=4)
    words = [w.capitalize() if w == "dog" else w for w in VECTORS]  # the file has "Dog", not "dog"
    kv.add_vectors(words, np.asarray([VECTORS[w.lower()] for w in words], dtype=np.float32))
    kv.save_word2vec_format(str(tmp_path / "w2v.bin"), binary=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every word is found: no warning
        emb = label_embeddings("word2vec", ["Dog", "airplane"], cache_dir=str(tmp_path), path=str(tmp_path / "w2v.bin"))
    torch.testing.assert_close(emb[0], _expected(["a", "photo", "of", "dog"]))  # case-sensitive lookup finds "Dog"
    with pytest.warns(UserWarning, match="left out of the mean: Dog"):  # lowercase=True looks up "dog", which this file lacks
        label_embeddings("word2vec", ["Dog"], cache_dir=str(tmp_path), path=str(tmp_path / "w2v.bin"), lowercase=True)
    with pytest.raises(FileNotFoundError, match="model.embedding_options.path"):
        label_embeddings("word2vec", CLASSES, cache_dir=str(tmp_path), path=str(tmp_path / "GoogleNews-vectors.bin"))
    with pytest.raises(ValueError, match="set model.embedding_options.path"):
        label_embeddings("glove", CLASSES, cache_dir=str(tmp_path))
