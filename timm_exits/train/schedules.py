"""Per-exit loss weights, fixed or changing with the epoch: the ``exit_weights`` of ``loss='ce'``.

``exit_weights`` is one of

* ``None``: every exit weighs 1 (the MSDNet baseline);
* a list of numbers, one per exit;
* ``'pabee'``: PABEE's depth weighting (Zhou et al., NeurIPS 2020), exit i (0-based) of N weighs
  ``(i + 1) / sum_j (j + 1)``, so the loss is the depth-weighted mean of the exits' cross-entropies;
* ``'sdn'``: SDN's warm-up (Kaya et al., ICML 2019): the internal classifier i weighs
  ``tau_i(e) = min(C_i, 0.01 + e * C_i / E)`` at the 1-based epoch e of E, the final exit 1. The caps
  C_i are SDN's target cost fractions: ``0.9 * (i + 1) / (N - 1)`` by default, which is SDN's
  (0.15, 0.30, ..., 0.90) for its six internal classifiers; ``dict(schedule='sdn', caps=[...])`` sets
  them (e.g. to the cost fractions the exits were placed at).

The weights are computed here only; a trainer tells the technique the epoch at its start
(:meth:`~timm_exits.train.techniques.Technique.set_epoch`), the technique asks :class:`ExitWeights`.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, List, Optional, Sequence

__all__ = ["SCHEDULES", "ExitWeights", "sdn_weights", "pabee_weights"]

SCHEDULES = ("sdn", "pabee")


def sdn_weights(num_exits: int, epoch: int, epochs: int, caps: Optional[Sequence[float]] = None) -> List[float]:
    """SDN's weights at an epoch: ``min(C_i, 0.01 + e * C_i / E)`` with e = ``epoch + 1`` for each
    internal classifier, 1 for the final exit.

    Args:
        num_exits: the number of exits N.
        epoch: the 0-based epoch, in [0, ``epochs``).
        epochs: the run's number of epochs E.
        caps: the N - 1 caps C_i (default: evenly spread up to 0.9, SDN's).

    Returns:
        One weight per exit.
    """
    caps = default_sdn_caps(num_exits) if caps is None else list(caps)
    if len(caps) != num_exits - 1:
        raise ValueError(f"the sdn schedule has {len(caps)} caps for {num_exits - 1} internal classifiers "
                         f"({num_exits} exits)")
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch must be in [0, {epochs}) (0-based, of {epochs}), got {epoch}")
    e = epoch + 1
    return [min(c, 0.01 + e * c / epochs) for c in caps] + [1.0]


def default_sdn_caps(num_exits: int) -> List[float]:
    """SDN's caps for ``num_exits - 1`` internal classifiers: evenly spread up to 0.9."""
    return [0.9 * (i + 1) / (num_exits - 1) for i in range(num_exits - 1)]


def pabee_weights(num_exits: int) -> List[float]:
    """PABEE's depth weights ``(i + 1) / sum_j (j + 1)``."""
    total = num_exits * (num_exits + 1) / 2
    return [(i + 1) / total for i in range(num_exits)]


def _numbers(values: Any, what: str) -> List[float]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, Real) and not isinstance(v, bool)
                                                        for v in values):
        raise ValueError(f"{what} must be a list of numbers, got {values!r}")
    return [float(v) for v in values]


class ExitWeights:
    """The loss weight of every exit (see the module docstring for ``spec``)."""

    def __init__(self, spec: Any = None):
        self.spec, self.name, self.caps, self.fixed = spec, None, None, None
        if spec is None:
            return
        if isinstance(spec, dict):
            unknown = set(spec) - {"schedule", "caps"}
            if unknown or spec.get("schedule") != "sdn":
                raise ValueError(f"exit_weights as a dict is dict(schedule='sdn', caps=[...]), got {spec!r}")
            self.name = "sdn"
            if spec.get("caps") is not None:
                self.caps = _numbers(spec["caps"], "exit_weights caps")
                if not all(0 < c <= 1 for c in self.caps):
                    raise ValueError(f"the sdn caps are cost fractions in (0, 1], got {self.caps}")
        elif isinstance(spec, str):
            if spec not in SCHEDULES:
                raise ValueError(f"exit_weights must be None, a list of numbers (one per exit) or one of "
                                 f"{SCHEDULES}, got {spec!r}")
            self.name = spec
        else:
            self.fixed = _numbers(spec, "exit_weights")
            if not all(math.isfinite(w) and w >= 0 for w in self.fixed):
                raise ValueError(f"exit_weights must be finite and >= 0 (a negative weight ascends that exit's loss), "
                                 f"got {self.fixed}")

    @property
    def per_epoch(self) -> bool:
        """Whether the weights change with the epoch (the trainer must then tell it)."""
        return self.name == "sdn"

    def __call__(self, num_exits: int, epoch: Optional[int] = None, epochs: Optional[int] = None) -> List[float]:
        """The weights of ``num_exits`` exits at the 0-based ``epoch`` of ``epochs``."""
        if self.name == "sdn":
            if epoch is None or epochs is None:
                raise ValueError("exit_weights='sdn' changes with the epoch: give the epoch and the number of epochs")
            return sdn_weights(num_exits, epoch, epochs, self.caps)
        if self.name == "pabee":
            return pabee_weights(num_exits)
        weights = [1.0] * num_exits if self.fixed is None else list(self.fixed)
        if len(weights) != num_exits:
            raise ValueError(f"{len(weights)} exit weights for {num_exits} exits")
        return weights
