"""Training regimes: which part of a backbone with exits trains, and which exits enter the loss.

* ``joint``: everything trains on every exit's loss (the default; SDN training, MSDNet, IMTA phase I).
* ``heads_only``: the backbone, its own head included, is frozen (``requires_grad=False``, so it
  takes no gradient and no optimizer slot); the exit heads train on their own losses, the final
  exit is left out of the loss (SDN's IC-only training; ZTW's and Kubaty et al.'s disjoint regime).
  As in SDN's code the frozen backbone stays in training mode, so its batch-norm running statistics
  keep moving; ``freeze_bn_stats=True`` keeps it in eval mode instead (statistics and dropout fixed).
* ``backbone``: the backbone trains alone on its own head's loss, the exit heads are frozen (the
  first phase of Kubaty et al.'s phase-wise protocol).

Phase-wise training (backbone, then joint, then heads) is a list of ``phases`` in a config, each
starting from the weights of the one before (see ``recipes/_base_/techniques/phasewise.py``).
"""
from __future__ import annotations

from typing import List

from torch import nn

from ..models.exits import BackboneWithExits

__all__ = ["REGIMES", "apply_regime", "check_regime", "regime_exits"]

REGIMES = ("joint", "heads_only", "backbone")


def check_regime(regime: str) -> None:
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")


def apply_regime(model: nn.Module, regime: str, freeze_bn_stats: bool = False) -> nn.Module:
    """Freeze what ``regime`` does not train (a no-op for ``joint``).

    Args:
        model: the model; the partial regimes need a backbone with exit heads
            (:func:`~timm_exits.add_exits`).
        regime: one of :data:`REGIMES`.
        freeze_bn_stats: for ``heads_only``: keep the frozen backbone in eval mode (batch-norm
            statistics and dropout fixed).

    Returns:
        ``model``.
    """
    check_regime(regime)
    if regime == "joint":
        return model
    if not isinstance(model, BackboneWithExits):
        raise ValueError(f"regime={regime!r} trains part of a backbone with exit heads (timm_exits.add_exits); "
                         f"{type(model).__name__} has no separate backbone: use regime='joint'")
    model.backbone.requires_grad_(regime == "backbone")
    model.exits.requires_grad_(regime == "heads_only")
    model.backbone_eval = regime == "heads_only" and freeze_bn_stats
    return model.train(model.training)


def regime_exits(regime: str, num_exits: int) -> List[int]:
    """The exits (0-based) whose losses train in ``regime``.

    Args:
        regime: one of :data:`REGIMES`.
        num_exits: the model's number of exits.

    Returns:
        The exits' indices, in order.
    """
    check_regime(regime)
    if regime == "heads_only":
        return list(range(num_exits - 1))
    if regime == "backbone":
        return [num_exits - 1]
    return list(range(num_exits))
