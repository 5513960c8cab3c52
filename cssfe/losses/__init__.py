"""Multi-label classification losses, built by name.

``build_loss(name, class_freq, num_train, **params)``; every loss maps ``(logits [B, C],
targets [B, C] bool/uint8/float)`` to a scalar. Names: ``asl``, ``bce``, ``focal``, ``db``,
``db_focal``, ``cb_focal``, ``pg`` (see each class docstring for formula and source).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, FrozenSet, Sequence

from torch import nn

from cssfe.registry import Registry

from .asl import AsymmetricLoss, FusedAsymmetricLoss
from .basic import BCELoss, FocalLoss
from .db import ClassBalancedFocalLoss, DistributionBalancedLoss
from .pg import ProbabilityGuidedLoss

__all__ = [
    "LOSSES",
    "build_loss",
    "AsymmetricLoss",
    "FusedAsymmetricLoss",
    "BCELoss",
    "FocalLoss",
    "DistributionBalancedLoss",
    "ClassBalancedFocalLoss",
    "ProbabilityGuidedLoss",
]

LOSSES: Registry[nn.Module] = Registry("loss")
LOSSES.register("asl")(AsymmetricLoss)
LOSSES.register("bce")(BCELoss)
LOSSES.register("focal")(FocalLoss)
LOSSES.register("db")(DistributionBalancedLoss)
LOSSES.register("db_focal")(functools.partial(DistributionBalancedLoss, focal=True))
LOSSES.register("cb_focal")(ClassBalancedFocalLoss)
LOSSES.register("pg")(ProbabilityGuidedLoss)

_STATS = ("class_freq", "num_train")


def _signature(factory: Callable[..., nn.Module]):
    """Constructor parameters a caller may set, and whether the factory takes class statistics."""
    params = inspect.signature(factory).parameters
    fixed = set(getattr(factory, "keywords", None) or ())  # pre-bound by functools.partial
    names = {
        name for name, p in params.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in fixed
    }
    needs_stats = all(s in names for s in _STATS)
    return frozenset(names - set(_STATS)), needs_stats


def loss_params(name: str) -> FrozenSet[str]:
    """The keyword parameters ``build_loss(name, ...)`` accepts."""
    return _signature(LOSSES.get(name))[0]


def build_loss(name: str, class_freq: Sequence[int], num_train: int, fused: bool = False, **params) -> nn.Module:
    """Build the loss registered as ``name``; with ``fused``, its fused-kernel form where it has one
    (a ``fused`` attribute of the class: ``asl``), the class itself otherwise.

    Raises ``KeyError`` (listing the choices) for an unknown name before anything else, and
    ``TypeError`` naming the keyword and the loss for a parameter the loss does not take.
    ``class_freq`` (positives per class) and ``num_train`` (training images) are passed to the losses
    that need them (``db``, ``db_focal``, ``cb_focal``, ``pg``) and ignored by the others.
    """
    factory = LOSSES.get(name)
    if fused:
        factory = getattr(factory, "fused", factory)
    accepted, needs_stats = _signature(factory)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise TypeError(
            f"loss {name!r} got unexpected parameter(s) {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(sorted(accepted)) or 'none'}"
        )
    if needs_stats:
        return factory(class_freq, num_train, **params)
    return factory(**params)
