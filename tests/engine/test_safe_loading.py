"""Loading what others share runs no code: checkpoints, DeepSpeed client states, split pickles and
label-embedding caches refuse a pickle that asks for anything but plain data."""
import os
import pickle
import random
import types
import warnings

import numpy as np
import pytest
import torch

from cssfe.config import load_config, to_dict
from cssfe.data import split_files
from cssfe.data.published import published_split
from cssfe.engine import checkpoint as ckpt


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): proof that the file's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _crafted_torch_file(path, marker, **extra):
    torch.save({"model": {}, "config": {}, "payload": _RunsCode(marker), **extra}, path)


def test_checkpoints_load_weights_only_and_crafted_ones_are_refused(tmp_path):
    from cssfe.engine.ema import ModelEMA
    from cssfe.engine.inference import load_trained
    from cssfe.engine.train import _run_checkpoint
    from cssfe.metrics import evaluate_scores

    # a checkpoint as training writes it (model, EMA, optimizer, one-cycle schedule, scaler, RNG, config, metrics)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=4)
    metrics = evaluate_scores([[0.9, 0.1], [0.2, 0.8]], [[1, 0], [0, 1]], [0, 2])
    data = types.SimpleNamespace(class_names=["a", "b"], groups=np.array([0, 2]), class_freq=np.array([5, 1]))
    state = _run_checkpoint(model, ModelEMA(model, 0.9), optimizer, scheduler, torch.amp.GradScaler("cpu"),
                            load_config(None, []), data, {"epoch": 1, "best_metrics": metrics})
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(state, str(path))
    plain = torch.load(path, weights_only=True)  # no allow-list needed
    assert plain["config"] == to_dict(load_config(None, []))
    draw = lambda: (random.random(), np.random.rand(), torch.rand(1).item())
    a = draw()
    ckpt.set_rng_state(ckpt.load_checkpoint(str(path))["rng"])
    assert draw() == a  # the random states round-trip
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]\[1\] is a builtins.object"):
        ckpt.save_checkpoint({"extra": [1, object()]}, str(tmp_path / "bad.pt"))
    assert not (tmp_path / "bad.pt").exists()
    ckpt.save_checkpoint({"lr": np.float64(0.1), "counts": np.arange(3)}, str(tmp_path / "numpy.pt"))  # made plain
    assert torch.load(tmp_path / "numpy.pt", weights_only=True)["counts"].tolist() == [0, 1, 2]

    # crafted files: refused on every path that reads a checkpoint, nothing runs
    marker = tmp_path / "ran"
    bad = tmp_path / "best.pt"
    _crafted_torch_file(bad, marker)
    for load in (ckpt.load_checkpoint, ckpt.load_latest, load_trained):
        with pytest.raises(ValueError, match=rf"{bad}.*weights-only.*posix.mkdir.*--convert {bad}"):
            load(str(bad))
    assert not marker.exists()

    # a checkpoint of the earlier format (numpy random state, numpy scalars): loads, or converts
    old = dict(state, rng={"python": random.getstate(), "numpy": np.random.get_state(),
                           "torch": torch.get_rng_state()})
    torch.save(old, tmp_path / "old.pt")
    ckpt.set_rng_state(ckpt.load_checkpoint(str(tmp_path / "old.pt"))["rng"])
    torch.save(dict(old, best_total=np.float64(61.5)), tmp_path / "older.pt")
    with pytest.raises(ValueError, match="--convert"):
        ckpt.load_checkpoint(str(tmp_path / "older.pt"))
    assert ckpt.main(["--convert", str(tmp_path / "older.pt"), str(tmp_path / "converted.pt")]) == 0
    assert torch.load(tmp_path / "converted.pt", weights_only=True)["best_total"] == 61.5


def test_deepspeed_client_state_is_loaded_weights_only(tmp_path):
    from cssfe.engine import distributed
    from cssfe.engine.ds_checkpoint import client_path, mark_complete
    from cssfe.engine.train import _ds_resume

    ds_dir = tmp_path / "deepspeed"
    tag = "epoch0001-step000000"
    os.makedirs(ds_dir / tag)
    mark_complete(str(ds_dir), tag, world_size=1)
    marker = tmp_path / "ran"
    client = client_path(str(ds_dir), tag, 0)
    _crafted_torch_file(client, marker, world_size=1)
    with pytest.raises(ValueError, match=rf"{client}.*weights-only"):
        _ds_resume(None, str(ds_dir), load_config(None, []), distributed.Context())
    assert not marker.exists()


def _split_folder(tmp_path):
    root = tmp_path / "split"
    root.mkdir()
    ids = {"train": ["a", "b"], "test": ["c"]}
    split_files.write_split_folder(str(root), ["x", "y"], ids, {"train": [[0], [1]], "test": [[0, 1]]})
    return root


@pytest.mark.parametrize("name", ["class_freq.pkl", "class_split.pkl", "img_id.pkl"])
def test_crafted_split_pickles_are_refused_naming_the_file(tmp_path, name):
    root = _split_folder(tmp_path)
    marker = tmp_path / "ran"
    path = root / ("train" if name != "class_split.pkl" else "") / name
    with open(path, "wb") as f:
        pickle.dump({"gt_labels": _RunsCode(marker)} if name != "img_id.pkl" else [_RunsCode(marker)], f)
    with pytest.raises(split_files.SplitFormatError, match=rf"{path}: refused to unpickle: it asks for posix.mkdir"):
        if name == "img_id.pkl":
            split_files.read_id_list(str(path))
        elif name == "class_freq.pkl":
            split_files.read_split(str(root), "train", 2)
        else:
            split_files.read_pickle(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["lt_voc", "lt_coco"])
def test_published_split_pickles_still_read(tmp_path, name):
    """The published splits as the DB-loss benchmark distributes them (numpy 1 pickles, protocol 2,
    sets of ints): read back by the restricted unpickler, equal to the published data."""
    published = published_split(name)
    labels = split_files.labels_matrix(published.train_labels, len(published.classes))
    stats = split_files.class_statistics(labels)
    freq_bytes = pickle.dumps(stats, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in freq_bytes  # as numpy 1 wrote them
    (tmp_path / "class_freq.pkl").write_bytes(freq_bytes)
    with open(tmp_path / "class_split.pkl", "wb") as f:
        pickle.dump(split_files.groups_to_class_split(published.groups), f, protocol=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core is numpy 2's alias of numpy._core
        read = split_files.read_pickle(str(tmp_path / "class_freq.pkl"))
    assert np.array_equal(read["gt_labels"], labels) and np.array_equal(read["class_freq"], stats["class_freq"])
    np.testing.assert_array_equal(read["condition_prob"], stats["condition_prob"])
    groups = split_files.class_split_to_groups(split_files.read_pickle(str(tmp_path / "class_split.pkl")),
                                               len(published.classes))
    assert np.array_equal(groups, published.groups)


def test_crafted_label_embedding_cache_is_refused_and_recomputed(tmp_path):
    from cssfe.models.text_encoders import label_embeddings

    first = label_embeddings("rie", ["cat", "dog"], cache_dir=str(tmp_path), dim=8)
    (cache,) = (tmp_path / "embeddings").glob("*.pt")
    marker = tmp_path / "ran"
    _crafted_torch_file(cache, marker)
    with pytest.warns(UserWarning, match=rf"ignoring unreadable label-embedding cache {cache}"):
        again = label_embeddings("rie", ["cat", "dog"], cache_dir=str(tmp_path), dim=8)
    assert not marker.exists()
    assert torch.equal(first, again)
