"""Explanations on hand-made maps and models: the pointing game's hit rule, each of its map kinds
scored from its own maps, and Grad-CAM against its closed form on a linear head."""
import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from cssfe.engine import evaluation
from cssfe.explain.maps import gradcam
from cssfe.explain.pointing import pointing_game, pointing_hits
from cssfe.models.heads import BaselineHead


def _peaks(b, c, h, w, where):
    """Maps [B, C, H, W] of small noise with their maximum at where[(image, class)] = (y, x)."""
    maps = torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(0)) * 0.1
    for (i, cls), (y, x) in where.items():
        maps[i, cls, y, x] = 1.0
    return maps


def test_pointing_hits_rule():
    """A hit: the map's maximum (x, y) in a box of the same class, x0 <= x < x1 and y0 <= y < y1.
    Wrong implementations this fails: x and y swapped (the maps are 4 x 6, not square), right and
    bottom edges inclusive, a box of another class counted, negative classes scored."""
    h, w = 4, 6
    labels = torch.tensor([[1, 1, 0], [1, 0, 1]])
    where = {(0, 0): (1, 4), (0, 1): (3, 2), (0, 2): (0, 0), (1, 0): (2, 5), (1, 2): (0, 1)}
    boxes = [
        [[0, 4, 1, 5, 2],  # class 0 at x=4, y=1: inside (x0, y0 inclusive)
         [1, 0, 0, 2, 4]],  # class 1 peaks at x=2: on the exclusive right edge, a miss
        [[2, 5, 2, 6, 3],  # a class-2 box around class 0's peak: a miss for class 0
         [2, 0, 1, 2, 2]],  # class 2 peaks at (x=1, y=0): y0=1 excludes it (swapped x/y would hit)
    ]
    hits = pointing_hits(_peaks(2, 3, h, w, where), labels, boxes)
    assert hits == [(0, True), (1, False), (0, False), (2, False)]
    boxes[1][1] = [2, 1, 0, 2, 1]  # now (x=1, y=0) is inside
    assert pointing_hits(_peaks(2, 3, h, w, where), labels, boxes)[-1] == (2, True)


def test_pointing_game_per_group():
    hits = [(0, True), (0, False), (1, True), (2, False), (2, False), (2, True)]
    groups = np.array([0, 1, 2])
    got = pointing_game(hits, groups)
    assert got["total"] == 50.0 and got["head"] == 50.0 and got["medium"] == 100.0
    assert np.isclose(got["tail"], 100 / 3)


class _Boxed(torch.utils.data.Dataset):
    def __init__(self, path, n):
        self.paths, self.n = [path], n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(3, 4, 6), torch.tensor([1, 0]), i


def test_pointing_scores_score_each_map_kind_from_its_own_maps(monkeypatch, tmp_path):
    """evaluate.py's pointing game: the first-pass maps point inside every box, the refined maps
    with the mask never, without the mask in every other image. A wrong implementation that scores
    the first-pass maps under the refined keys (or mixes the two refined kinds) fails."""
    Image.new("RGB", (6, 4)).save(tmp_path / "img.png")
    n = 4
    inside, outside = {(i, 0): (1, 1) for i in range(n)}, {(i, 0): (3, 5) for i in range(n)}
    mixed = {(i, 0): (1, 1) if i % 2 else (3, 5) for i in range(n)}

    def fake_class_maps(model, images, size):
        assert size == (4, 6)  # the stored image's pixels, where the boxes are
        b = len(images)
        return {"maps": _peaks(b, 2, 4, 6, {k: v for k, v in inside.items() if k[0] < b}),
                "refined_mask": _peaks(b, 2, 4, 6, {k: v for k, v in outside.items() if k[0] < b}),
                "refined_nomask": _peaks(b, 2, 4, 6, {k: v for k, v in mixed.items() if k[0] < b})}

    monkeypatch.setattr(evaluation, "class_maps", fake_class_maps)
    boxes = {f"id{i}": [[0, 0, 0, 3, 3]] for i in range(n)}
    scores = evaluation.pointing_scores(None, _Boxed(str(tmp_path / "img.png"), n), [f"id{i}" for i in range(n)], boxes,
                                        np.array([0, 2]), batch_size=n)
    assert scores["maps"]["total"] == 100.0 and scores["refined_mask"]["total"] == 0.0
    assert scores["refined_nomask"]["total"] == 50.0
    assert 0.0 <= scores["random"]["total"] <= 100.0


class _Linear(nn.Module):
    """The image is the feature map: Grad-CAM of a linear head has a closed form."""

    def __init__(self, weight):
        super().__init__()
        self.backbone = nn.Identity()
        self.head = BaselineHead(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.fc.weight.copy_(weight)
            self.head.fc.bias.zero_()


def test_gradcam_closed_form_on_a_linear_head():
    """For logits = W mean(F) the gradient is W_c / (H W) at every position, so Grad-CAM is
    relu(sum_d W_cd F_d) scaled to a maximum of 1. Channel 0 has a bump at (1, 1), channel 1 at (2, 3);
    class 0 weighs them +1, -1 and class 1 -1, +1. Wrong implementations this fails: no ReLU
    (negative evidence left in), the weights of another class, weights with the sign flipped, no
    scaling to [0, 1]."""
    feats = torch.zeros(2, 2, 4, 5)
    feats[:, 0, 1, 1] = 3.0
    feats[:, 1, 2, 3] = 2.0
    model = _Linear(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    cam = gradcam(model, feats, torch.tensor([0, 1]))
    assert cam.shape == (2, 4, 5)
    want0 = torch.zeros(4, 5)
    want0[1, 1] = 1.0
    want1 = torch.zeros(4, 5)
    want1[2, 3] = 1.0
    torch.testing.assert_close(cam[0], want0)
    torch.testing.assert_close(cam[1], want1)
    bigger = gradcam(model, feats, torch.tensor([0, 1]), size=(8, 10))  # upsampled to the image size asked
    assert bigger.shape == (2, 8, 10) and bigger.min() >= 0 and torch.isclose(bigger.amax((1, 2)), torch.ones(2)).all()
