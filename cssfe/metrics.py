"""Evaluation metrics for (long-tailed) multi-label classification.

All functions take ``scores`` and ``targets`` of shape ``[N, C]`` (N samples, C classes) as
torch tensors, numpy arrays or nested lists, and convert them to float64 numpy arrays of the
whole evaluation set before computing anything.

Conventions
-----------
* Average precision follows scikit-learn's ``average_precision_score`` exactly (non-interpolated
  step integral of the precision-recall curve, with one threshold per *distinct* score, so tied
  scores enter together).  It is computed for all classes at once with numpy.
* A class without any positive sample has an undefined AP.  scikit-learn 1.9 returns ``0.0``
  for it (after warning "No positive class found in y_true"), which would silently drag means
  down; here such a class gets ``NaN`` and is left out of every mean (total, head, medium,
  tail); :func:`evaluate_scores` names them per mean (``left_out``), so a shorter mean is never
  silent.  A mean over no class with a defined AP is ``NaN``.
* mAP values are in percent (0-100); per-class AP from :func:`average_precision` is a fraction
  (0-1) like scikit-learn's, and in percent in :func:`evaluate_scores`.
* F1 scores are fractions (0-1), equal to scikit-learn's ``f1_score`` on the binarised
  predictions ``scores >= threshold`` (a probability of exactly 0.5 counts as a positive
  prediction, i.e. ``logit >= 0``); ill-defined per-class F1 (no positive and no prediction)
  is 0, as in scikit-learn's default ``zero_division``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

try:  # torch is a dependency of the package, but keep the metrics usable without it
    import torch
except ImportError:  # pragma: no cover
    torch = None

__all__ = ["average_precision", "long_tail_map", "f1_scores", "evaluate_scores", "left_out_of_means", "left_out_note"]

GROUP_NAMES = ("head", "medium", "tail")


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _to_numpy(x: Any, name: str) -> np.ndarray:
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric array or tensor, got {type(x).__name__}: {e}") from e


def _check_pair(scores: Any, targets: Any):
    s = _to_numpy(scores, "scores")
    t = _to_numpy(targets, "targets")
    if s.ndim != 2 or t.ndim != 2 or s.shape != t.shape:
        raise ValueError(
            f"scores and targets must both be 2-D arrays of the same shape [N, C]; "
            f"got scores {tuple(s.shape)} and targets {tuple(t.shape)}"
        )
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"scores and targets must be non-empty; got shape {tuple(s.shape)}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if not np.isin(t, (0.0, 1.0)).all():
        bad = np.unique(t[~np.isin(t, (0.0, 1.0))])[:5]
        raise ValueError(f"targets must be binary (0/1); found values such as {bad.tolist()}")
    return s, t


def _check_groups(groups: Any, num_classes: int) -> np.ndarray:
    g = _to_numpy(groups, "groups")
    if g.ndim != 1 or g.shape[0] != num_classes:
        raise ValueError(
            f"groups must be a 1-D array with one entry per class, shape ({num_classes},); "
            f"got shape {tuple(g.shape)}"
        )
    if not np.isin(g, (0.0, 1.0, 2.0)).all():
        raise ValueError("groups must contain only 0 (head), 1 (medium) or 2 (tail)")
    return g.astype(np.int64)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


# --------------------------------------------------------------------------------------------
# average precision
# --------------------------------------------------------------------------------------------
def _average_precision(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-class AP of validated float64 arrays [N, C] (fractions, NaN without positives)."""
    n = s.shape[0]
    order = np.argsort(-s, axis=0, kind="stable")  # descending scores per class
    s_sorted = np.take_along_axis(s, order, axis=0)
    t_sorted = np.take_along_axis(t, order, axis=0)
    tp = np.cumsum(t_sorted, axis=0)
    # One threshold per distinct score: the last index of each run of equal scores.
    is_end = np.empty(s.shape, dtype=bool)
    is_end[:-1] = s_sorted[:-1] != s_sorted[1:]
    is_end[-1] = True
    rows = np.broadcast_to(np.arange(n)[:, None], s.shape)
    # For every position, the index of the end of its tie group (backward fill of the ends).
    end = np.minimum.accumulate(np.where(is_end, rows, n)[::-1], axis=0)[::-1]
    precision_at_end = np.take_along_axis(tp, end, axis=0) / (end + 1.0)
    # AP = sum_k (R_k - R_{k-1}) P_k = (1/P) * sum over positives of the precision at the
    # threshold where that positive is first retrieved (the end of its tie group).
    num_pos = tp[-1]
    total = (t_sorted * precision_at_end).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(num_pos > 0, total / num_pos, np.nan)
    return ap


def average_precision(scores: Any, targets: Any) -> np.ndarray:
    """Per-class average precision, shape ``[C]``, as fractions in [0, 1].

    Identical to ``sklearn.metrics.average_precision_score(targets, scores, average=None)``
    except that a class without positives gets ``NaN`` (scikit-learn: 0.0 with a warning).
    """
    s, t = _check_pair(scores, targets)
    return _average_precision(s, t)


# --------------------------------------------------------------------------------------------
# long-tailed mAP
# --------------------------------------------------------------------------------------------
def _group_means(ap: np.ndarray, groups: Optional[np.ndarray]) -> Dict[str, float]:
    out = {"total": _nanmean(ap) * 100.0}
    for gid, gname in enumerate(GROUP_NAMES):
        if groups is None:
            out[gname] = float("nan")
        else:
            out[gname] = _nanmean(ap[groups == gid]) * 100.0
    return out


def long_tail_map(scores: Any, targets: Any, groups: Any) -> Dict[str, float]:
    """mAP in percent over all classes and over the head (0), medium (1) and tail (2) groups.

    ``groups`` holds one int per class.  Classes without positives are left out of the means;
    a group with no (evaluable) class gives ``NaN``.
    """
    s, t = _check_pair(scores, targets)
    g = _check_groups(groups, s.shape[1])
    return _group_means(_average_precision(s, t), g)


# --------------------------------------------------------------------------------------------
# F1
# --------------------------------------------------------------------------------------------
def _f1(s: np.ndarray, t: np.ndarray, threshold: float) -> Dict[str, float]:
    pred = s >= threshold
    pos = t > 0.5
    tp = (pred & pos).sum(axis=0).astype(np.float64)
    fp = (pred & ~pos).sum(axis=0).astype(np.float64)
    fn = (~pred & pos).sum(axis=0).astype(np.float64)
    support = tp + fn

    def ratio(num, den):
        num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)

    per_class = ratio(2.0 * tp, 2.0 * tp + fp + fn)
    micro = float(ratio(2.0 * tp.sum(), 2.0 * tp.sum() + fp.sum() + fn.sum()))
    macro = float(per_class.mean())
    weighted = float((per_class * support).sum() / support.sum()) if support.sum() > 0 else 0.0
    return {"weighted": weighted, "micro": micro, "macro": macro}


def f1_scores(scores: Any, targets: Any, threshold: float = 0.5) -> Dict[str, float]:
    """Weighted, micro and macro F1 (fractions in [0, 1]) of ``scores >= threshold``.

    ``scores`` are probabilities; a score equal to the threshold counts as a positive
    prediction.  Equals ``sklearn.metrics.f1_score(targets, scores >= threshold, average=...)``.
    """
    s, t = _check_pair(scores, targets)
    return _f1(s, t, float(threshold))


# --------------------------------------------------------------------------------------------
# everything at once
# --------------------------------------------------------------------------------------------
def _json_float(x: float) -> Optional[float]:
    x = float(x)
    return None if math.isnan(x) else x


def left_out_of_means(ap: np.ndarray, groups: Optional[np.ndarray], class_names: Optional[Sequence[str]] = None) -> Dict[str, List[Any]]:
    """The classes each mean leaves out (their AP is undefined: no positive), by name when
    ``class_names`` is given, else by index: ``{"total": [...], "head": [...], ...}``."""
    names = list(range(len(ap))) if class_names is None else list(class_names)
    undefined = np.isnan(ap)
    out = {"total": [names[c] for c in np.flatnonzero(undefined)]}
    for gid, gname in enumerate(GROUP_NAMES):
        out[gname] = [] if groups is None else [names[c] for c in np.flatnonzero(undefined & (groups == gid))]
    return out


def left_out_note(left_out: Optional[Dict[str, List[Any]]]) -> str:
    """One line saying which classes each mean leaves out ('' when none)."""
    if not left_out or not left_out.get("total"):
        return ""
    parts = [f"{mean}: {', '.join(map(str, classes))}" for mean, classes in left_out.items() if classes]
    return "left out of the means (no positive in the evaluation set, AP undefined) -- " + "; ".join(parts)


def evaluate_scores(scores: Any, targets: Any, groups: Any = None, threshold: float = 0.5,
                    class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """All evaluation metrics of a whole evaluation set, as a json-serialisable dict.

    Returns ``{"mAP": {"total", "head", "medium", "tail"} (percent), "f1": {"weighted",
    "micro", "macro"} (fractions), "per_class_ap": [C floats, percent], "left_out": {"total",
    "head", "medium", "tail"}}`` with every NaN (class without positives, empty group, or
    ``groups=None`` for the group means) as ``None``; ``left_out`` lists the classes each mean
    leaves out because their AP is undefined (by name with ``class_names``, else by index).
    """
    s, t = _check_pair(scores, targets)
    g = None if groups is None else _check_groups(groups, s.shape[1])
    if class_names is not None and len(class_names) != s.shape[1]:
        raise ValueError(f"class_names has {len(class_names)} names for {s.shape[1]} classes")
    ap = _average_precision(s, t)
    return {
        "mAP": {k: _json_float(v) for k, v in _group_means(ap, g).items()},
        "f1": {k: _json_float(v) for k, v in _f1(s, t, float(threshold)).items()},
        "per_class_ap": [_json_float(v * 100.0) for v in ap],
        "left_out": left_out_of_means(ap, g, class_names),
    }
