import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from cssfe.metrics import average_precision, evaluate_scores, f1_scores, long_tail_map


def _sk_ap(scores, targets):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array(
            [average_precision_score(targets[:, c], scores[:, c]) for c in range(targets.shape[1])]
        )


def _sk_f1(scores, targets, average, threshold=0.5):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f1_score(targets.astype(int), (scores >= threshold).astype(int), average=average)


def _data(n=37, c=11, seed=0, decimals=1):
    rng = np.random.default_rng(seed)
    scores = rng.random((n, c))
    if decimals is not None:
        scores = np.round(scores, decimals)  # many ties
    targets = (rng.random((n, c)) < 0.3).astype(np.float64)
    targets[:, 0] = 0  # no positive
    targets[:, 1] = 1  # all positive
    targets[:, 2] = 0
    targets[n // 2, 2] = 1  # a single positive
    scores[:, 3] = 0.5  # all tied
    return scores, targets


@pytest.mark.parametrize("n,c,seed,decimals", [(37, 11, 0, 1), (1, 5, 1, 1), (2, 4, 2, None), (101, 7, 3, 2), (64, 9, 4, 0)])
def test_average_precision_matches_sklearn(n, c, seed, decimals):
    scores, targets = _data(n, c, seed, decimals)
    ap = average_precision(scores, targets)
    ref = _sk_ap(scores, targets)
    assert ap.shape == (c,)
    has_pos = targets.sum(0) > 0
    assert np.isnan(ap[~has_pos]).all()
    np.testing.assert_allclose(ap[has_pos], ref[has_pos], rtol=1e-12, atol=1e-12)
    assert ap[1] == pytest.approx(1.0)  # all-positive class


def test_average_precision_tie_handling_example():
    # positives tied with a negative at the top: precision at that threshold is 1/2
    scores = np.array([[0.9], [0.9], [0.1], [0.1]])
    targets = np.array([[1], [0], [1], [0]])
    assert average_precision(scores, targets)[0] == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    assert average_precision(scores, targets)[0] == pytest.approx(_sk_ap(scores, targets)[0])


def test_torch_inputs_and_dtypes():
    scores, targets = _data(50, 6, 5, 2)
    ref = average_precision(scores, targets)
    for s, t in [
        (torch.tensor(scores, dtype=torch.float32), torch.tensor(targets, dtype=torch.bool)),
        (torch.tensor(scores), torch.tensor(targets, dtype=torch.long)),
        (torch.tensor(scores, dtype=torch.bfloat16), torch.tensor(targets)),
    ]:
        ap = average_precision(s, t)
        exp = _sk_ap(s.float().numpy().astype(np.float64), targets)
        has_pos = targets.sum(0) > 0
        np.testing.assert_allclose(ap[has_pos], exp[has_pos], rtol=1e-12)
    np.testing.assert_allclose(average_precision(scores.tolist(), targets.tolist()), ref, equal_nan=True)


def test_large_is_vectorized_and_correct(monkeypatch):
    """5000 x 80 against scikit-learn, computed with one sort over all classes at once (speed is the
    benchmarks' business; the call count is what keeps it fast). A per-class loop (80 sorts) or a
    per-threshold one fails the count."""
    rng = np.random.default_rng(0)
    scores = rng.random((5000, 80)).astype(np.float32)
    targets = (rng.random((5000, 80)) < 0.05).astype(np.float32)
    sorts = []
    real_argsort, real_sort = np.argsort, np.sort
    monkeypatch.setattr(np, "argsort", lambda *a, **k: sorts.append(1) or real_argsort(*a, **k))
    monkeypatch.setattr(np, "sort", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
    ap = average_precision(scores, targets)
    assert len(sorts) == 1
    monkeypatch.undo()
    np.testing.assert_allclose(ap, _sk_ap(scores, targets), rtol=1e-10)


def test_shape_validation():
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        average_precision(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="2-D"):
        average_precision(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="binary"):
        average_precision(np.zeros((2, 2)), np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.full((2, 2), np.nan), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"groups.*\(3,\).*\(2,\)"):
        long_tail_map(np.zeros((4, 3)), np.ones((4, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="groups"):
        long_tail_map(np.zeros((4, 3)), np.ones((4, 3)), np.array([0, 1, 3]))


def test_long_tail_map_group_means():
    scores, targets = _data(80, 9, 7, 1)
    groups = np.array([0, 0, 1, 1, 1, 0, 1, 1, 1])  # no tail class
    res = long_tail_map(scores, targets, torch.tensor(groups))
    ref = _sk_ap(scores, targets)
    ok = targets.sum(0) > 0  # class 0 has no positive: excluded
    assert set(res) == {"total", "head", "medium", "tail"}
    assert res["total"] == pytest.approx(100 * ref[ok].mean())
    assert res["head"] == pytest.approx(100 * ref[(groups == 0) & ok].mean())
    assert res["medium"] == pytest.approx(100 * ref[(groups == 1) & ok].mean())
    assert np.isnan(res["tail"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_matches_sklearn(seed):
    scores, targets = _data(43, 8, seed, 1)  # 0.5 appears exactly: ">=" matters
    scores[0, 4] = 0.5
    res = f1_scores(torch.tensor(scores), targets)
    for avg in ("weighted", "micro", "macro"):
        assert res[avg] == pytest.approx(_sk_f1(scores, targets, avg), abs=1e-12)
    res = f1_scores(scores, targets, threshold=0.3)
    assert res["macro"] == pytest.approx(_sk_f1(scores, targets, "macro", 0.3), abs=1e-12)


def test_f1_no_positive_no_prediction_class():
    scores = np.array([[0.9, 0.1], [0.2, 0.0], [0.7, 0.3]])
    targets = np.array([[1, 0], [0, 0], [1, 0]])
    res = f1_scores(scores, targets)
    for avg in ("weighted", "micro", "macro"):
        assert res[avg] == pytest.approx(_sk_f1(scores, targets, avg), abs=1e-12)
    assert res["macro"] == pytest.approx(0.5)


def test_evaluate_scores_json():
    scores, targets = _data(30, 5, 3, 1)
    groups = np.array([0, 1, 2, 2, 1])
    res = evaluate_scores(torch.tensor(scores, dtype=torch.float16), torch.tensor(targets), groups)
    text = json.dumps(res, allow_nan=False)
    assert set(res) == {"mAP", "f1", "per_class_ap", "left_out"}
    assert res["left_out"] == {"total": [0], "head": [0], "medium": [], "tail": []}  # named, not silently shorter
    assert len(res["per_class_ap"]) == 5 and res["per_class_ap"][0] is None
    assert all(isinstance(v, float) for v in res["per_class_ap"][1:])
    assert res["mAP"]["head"] is None  # the only head class has no positive
    assert json.loads(text)["mAP"]["total"] == pytest.approx(np.mean(res["per_class_ap"][1:]))
    res2 = evaluate_scores(scores, targets, None)
    assert res2["mAP"]["tail"] is None and res2["mAP"]["total"] is not None
