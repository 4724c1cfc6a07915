"""Budgeted batch classification, exactly as the MSDNet / IMTA references evaluate it.

For each q of a grid, the target exit distribution is P_k ∝ q^k. On a validation split, exit k's
threshold is the score of the floor(n P_k)-th most confident sample among those that have not
exited yet (ties: every sample with score >= T_k exits); the last exit takes the rest. The
thresholds are applied to the test split, reporting accuracy and the expected cumulative cost
sum_k (fraction of test samples leaving at k) x cost_k.

Also: threshold search for a target average cost or a target accuracy, and threshold files that
record the model they belong to.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

import torch

from ..files import write_json
from .outputs import ExitOutputs
from .policies import POLICIES, exit_scores

__all__ = ["REFERENCE_Q", "IMTA_Q", "geometric_fractions", "exit_quotas", "fit_thresholds", "assign_exits", "BudgetPoint",
           "budgeted_curve", "thresholds_for_cost", "thresholds_for_accuracy", "Thresholds", "check_thresholds"]

REFERENCE_Q = [p / 20 for p in range(1, 40)]  # MSDNet-PyTorch: 0.05 .. 1.95
IMTA_Q = [p / 20 for p in range(1, 41)]  # IMTA: 0.05 .. 2.0
NEVER, ALWAYS = 1e8, -1e8  # the reference's sentinel thresholds


def geometric_fractions(q: float, num_exits: int) -> List[float]:
    """Target fraction of samples per exit, P_k = q^k / sum_j q^j (k = 1..N), computed as the reference
    computes it: exp(k log q), normalised, in float32 (the quotas floor(n P_k) depend on the rounding)."""
    weights = torch.exp(torch.log(torch.tensor(q, dtype=torch.float32)) *
                        torch.arange(1, num_exits + 1, dtype=torch.float32))
    return (weights / weights.sum()).tolist()


def exit_quotas(n: int, fractions: Sequence[float]) -> List[int]:
    """floor(n P_k) per exit, with the product in float32 as in the reference."""
    return [math.floor(n * torch.tensor(p, dtype=torch.float32)) for p in fractions]


def fit_thresholds(scores: torch.Tensor, fractions: Sequence[float]) -> torch.Tensor:
    """Per-exit thresholds from validation ``scores`` (exits x samples) and target ``fractions``."""
    num_exits, n = scores.shape
    thresholds = torch.full((num_exits,), NEVER, dtype=torch.float64)
    exited = torch.zeros(n, dtype=torch.bool)
    quotas = exit_quotas(n, fractions)
    for k in range(num_exits - 1):
        quota = quotas[k]
        order = scores[k].argsort(descending=True, stable=True)
        remaining = order[~exited[order]]
        if 0 < quota <= len(remaining):
            thresholds[k] = scores[k, remaining[quota - 1]].item()
        exited |= scores[k] >= thresholds[k]
    thresholds[-1] = ALWAYS
    return thresholds


def assign_exits(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Index of the first exit whose score reaches its threshold, per sample."""
    passed = scores.double() >= thresholds.view(-1, 1)
    passed[-1] = True
    return passed.int().argmax(0)


@dataclass
class BudgetPoint:
    """One point of a budgeted curve."""

    q: float
    thresholds: List[float]
    accuracy: float  # test top-1 (%)
    cost: float  # expected cumulative cost per test sample
    exit_fractions: List[float]
    val_accuracy: float
    val_cost: float


def _evaluate(outputs: ExitOutputs, scores: torch.Tensor, thresholds: torch.Tensor, costs: Sequence[float]):
    exits = assign_exits(scores, thresholds)
    preds = outputs.probs.argmax(-1)
    correct = preds.gather(0, exits.view(1, -1)).squeeze(0) == outputs.labels
    fractions = torch.bincount(exits, minlength=outputs.num_exits).double() / outputs.num_samples
    cost = float((fractions * torch.tensor(costs, dtype=torch.float64)).sum())
    return 100 * correct.double().mean().item(), cost, fractions.tolist()


def _point(val: ExitOutputs, test: ExitOutputs, costs, q: float, val_scores, test_scores) -> BudgetPoint:
    thresholds = fit_thresholds(val_scores, geometric_fractions(q, val.num_exits))
    val_acc, val_cost, _ = _evaluate(val, val_scores, thresholds, costs)
    acc, cost, fractions = _evaluate(test, test_scores, thresholds, costs)
    return BudgetPoint(q, thresholds.tolist(), acc, cost, fractions, val_acc, val_cost)


def _check(val: ExitOutputs, test: ExitOutputs, costs: Sequence[float]) -> None:
    if val.num_exits != test.num_exits or len(costs) != val.num_exits:
        raise ValueError(f"validation, test and costs must cover the same exits, got {val.num_exits}, "
                         f"{test.num_exits} and {len(costs)}")


def budgeted_curve(
        val: ExitOutputs,
        test: ExitOutputs,
        costs: Sequence[float],
        q_grid: Sequence[float] = REFERENCE_Q,
        policy: str = "maxprob",
) -> List[BudgetPoint]:
    """The reference budgeted evaluation: thresholds fitted on ``val`` for each q, applied to ``test``."""
    _check(val, test, costs)
    val_scores, test_scores = exit_scores(val.probs, policy), exit_scores(test.probs, policy)
    return [_point(val, test, costs, q, val_scores, test_scores) for q in q_grid]


_SEARCH_Q = [10 ** (k / 100) for k in range(-250, 251)]  # q from 0.003 to 316, log-spaced


def thresholds_for_cost(val: ExitOutputs, costs: Sequence[float], target: float, policy: str = "maxprob") -> BudgetPoint:
    """The most accurate (on ``val``) geometric-distribution thresholds whose average cost on ``val``
    is at most ``target``."""
    points = [p for p in budgeted_curve(val, val, costs, _SEARCH_Q, policy) if p.val_cost <= target]
    if not points:
        raise ValueError(f"no thresholds reach an average cost of {target:g}; the first exit alone costs {costs[0]:g}")
    return max(points, key=lambda p: (p.val_accuracy, -p.val_cost))


def thresholds_for_accuracy(val: ExitOutputs, costs: Sequence[float], target: float, policy: str = "maxprob") -> BudgetPoint:
    """The cheapest (on ``val``) geometric-distribution thresholds whose accuracy on ``val`` is at
    least ``target`` (%)."""
    points = [p for p in budgeted_curve(val, val, costs, _SEARCH_Q, policy) if p.val_accuracy >= target]
    if not points:
        per_exit = [round(100 * (p.argmax(-1) == val.labels).double().mean().item(), 2) for p in val.probs]
        raise ValueError(f"no thresholds reach {target:g}% on the validation split (single exits reach {per_exit})")
    return min(points, key=lambda p: (p.val_cost, -p.val_accuracy))


def check_thresholds(thresholds: Sequence[float], num_exits: int) -> None:
    """One finite threshold per exit (the reference's never / always sentinels are +-1e8, finite)."""
    if len(thresholds) != num_exits:
        raise ValueError(f"{len(thresholds)} thresholds for {num_exits} exits")
    if any(not math.isfinite(float(t)) for t in thresholds):
        raise ValueError(f"thresholds must be finite numbers (use {NEVER:g} for an exit nobody takes), got "
                         f"{list(thresholds)}")


@dataclass
class Thresholds:
    """Exit thresholds with what they belong to, stored as JSON: the model, its number of exits, the
    policy, the cumulative cost of each exit and the input size (C, H, W) the costs were measured at
    (files written before it was recorded load with ``input_size=None``)."""

    model: str
    num_exits: int
    policy: str
    thresholds: List[float]
    costs: List[float] = field(default_factory=list)
    note: str = ""
    input_size: Optional[List[int]] = None

    def __post_init__(self):
        check_thresholds(self.thresholds, self.num_exits)
        if self.input_size is not None:
            if len(self.input_size) != 3 or any(not isinstance(s, int) or s < 1 for s in self.input_size):
                raise ValueError(f"input_size must be (C, H, W), three positive integers, got {self.input_size}")
            self.input_size = list(self.input_size)
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.costs:
            if len(self.costs) != self.num_exits:
                raise ValueError(f"{len(self.costs)} costs for {self.num_exits} exits (one cumulative cost per exit)")
            if any(not math.isfinite(c) or c < 0 for c in self.costs) or any(
                    b < a for a, b in zip(self.costs, self.costs[1:])):
                raise ValueError(f"costs must be finite, non-negative and cumulative (non-decreasing), got {self.costs}")

    def save(self, path: str) -> None:
        """Write atomically (a temporary file, then a rename)."""
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str, model: Optional[str] = None, num_exits: Optional[int] = None) -> "Thresholds":
        """Read a thresholds file; if ``model`` / ``num_exits`` are given they must match it."""
        try:
            with open(path) as f:
                data = json.load(f)
            loaded = cls(**data)
        except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a valid thresholds file written by timm_exits ({e})") from None
        if model is not None and loaded.model != model:
            raise ValueError(f"{path} holds thresholds for {loaded.model!r}, not for {model!r}")
        if num_exits is not None and loaded.num_exits != num_exits:
            raise ValueError(f"{path} holds {loaded.num_exits} thresholds, the model has {num_exits} exits")
        return loaded
