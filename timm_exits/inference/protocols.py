"""Evaluation protocols of later early-exit papers, beside MSDNet's budgeted batch
(:mod:`.budgeted`): one global threshold swept over a grid (ZTW, SDN), the patience sweep (ZTW's
PBEE), accuracy read off a curve at fractions of the full cost (ZTW's tables), and the latency and
throughput of the early-exit executor.

Sweeps work on cached outputs with an :class:`ExitPolicy`, so their points are what the executor
does with the same thresholds. Accuracy is top-1 in %, cost the mean cumulative cost of the exits
taken.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from .budgeted import exit_metrics
from .executor import EarlyExitExecutor
from .outputs import ExitOutputs
from .policies import ExitPolicy, PolicyLike, resolve_policy

__all__ = ["ZTW_GRID", "SDN_GRID", "SWEEP_GRIDS", "ZTW_POLICY", "SDN_POLICY", "COST_FRACTIONS", "SweepPoint", "threshold_sweep",
           "patience_policy", "patience_sweep", "accuracy_at_cost", "measure_latency"]

ZTW_GRID = torch.linspace(0, 1, 100).tolist()  # ZTW eval.py: torch.linspace(0, 1, 100), float32 values
SDN_GRID = [0.1, 0.15, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999]  # SDN early_exit_experiments.py
ZTW_POLICY = ExitPolicy("maxprob", fallback="last", strict=True)
SDN_POLICY = ExitPolicy("maxprob", fallback="most_confident", strict=False)
SWEEP_GRIDS = {"ztw": ZTW_GRID, "sdn": SDN_GRID}
COST_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # ZTW's table columns


@dataclass
class SweepPoint:
    """One point of a sweep.

    Args:
        threshold: the global threshold (or patience).
        accuracy: top-1 (%).
        cost: the mean cumulative cost per sample.
        exit_fractions: the fraction of samples leaving at each exit.
    """

    threshold: float
    accuracy: float
    cost: float
    exit_fractions: List[float]


def _sweep(outputs: ExitOutputs, costs: Sequence[float], grid: Sequence[float], policy: ExitPolicy) -> List[SweepPoint]:
    if len(costs) != outputs.num_exits:
        raise ValueError(f"{len(costs)} costs for {outputs.num_exits} exits (one cumulative cost per exit)")
    scores = policy.scores(outputs.probs)
    points = []
    for t in grid:
        exits = policy.assign(scores, torch.full((outputs.num_exits,), float(t), dtype=torch.float64))
        points.append(SweepPoint(float(t), *exit_metrics(outputs, exits, costs)))
    return points


def threshold_sweep(
        outputs: ExitOutputs,
        costs: Sequence[float],
        grid: Sequence[float] = ZTW_GRID,
        policy: PolicyLike = ZTW_POLICY,
) -> List[SweepPoint]:
    """One threshold for all exits, for each value of ``grid``. The defaults are ZTW's protocol:
    linspace(0, 1, 100), max-softmax, strict ``>``, fallback to the last exit (SDN's: ``SDN_GRID``
    with ``SDN_POLICY``).

    Args:
        outputs: every exit's outputs and the labels.
        costs: the cumulative cost of each exit.
        grid: the thresholds to try.
        policy: an :class:`ExitPolicy` or a score name; a probability score, not ``patience``.

    Returns:
        One :class:`SweepPoint` per grid value, in the grid's order.
    """
    policy = resolve_policy(policy)
    if policy.score == "patience":
        raise ValueError("a threshold sweep needs a probability score (maxprob, entropy, margin); for patience use "
                         "patience_sweep")
    return _sweep(outputs, costs, grid, policy)


def patience_policy(fallback: str = "last") -> ExitPolicy:
    """ZTW's patience rule: leave when the count of consecutive agreeing exits is above t."""
    return ExitPolicy("patience", fallback, strict=True)


def patience_sweep(outputs: ExitOutputs, costs: Sequence[float], fallback: str = "last") -> List[SweepPoint]:
    """ZTW's PBEE evaluation: for patience t = 0..K-1, a sample leaves at the first exit where the
    number of consecutive exits agreeing with its prediction (1 at the first exit) is above t, so t=0
    exits everything at the first exit.

    Args:
        outputs: every exit's outputs and the labels.
        costs: the cumulative cost of each exit.
        fallback: where the samples no exit accepts go, one of ``FALLBACKS`` (ZTW: ``"last"``).

    Returns:
        One :class:`SweepPoint` per patience t (its ``threshold``).
    """
    return _sweep(outputs, costs, range(outputs.num_exits), patience_policy(fallback))


def accuracy_at_cost(
        curve: Sequence[Any],
        full_cost: float,
        fractions: Sequence[float] = COST_FRACTIONS,
        rule: str = "best",
) -> Dict[str, Any]:
    """Accuracy of a curve within each budget ``fraction x full_cost``, plus the best and the last
    point's accuracy.

    Args:
        curve: points with ``.accuracy`` and ``.cost``: a sweep or a budgeted curve.
        full_cost: the cost the fractions are of (the last exit's), > 0.
        fractions: the budgets as fractions of ``full_cost``, each > 0.
        rule: ``"best"``: the most accurate point within the budget. ``"ztw"``: ZTW's table reading
            (``cost_vs_table.py``): the point just before the first one (in curve order) whose cost
            exceeds the budget, or the last point when none does. On a threshold sweep, whose cost
            rises with the threshold, that is the highest threshold within the budget.

    Returns:
        ``{"rule", "full_cost", "fractions", "accuracy", "max_accuracy", "last_accuracy"}``, with
        one accuracy per fraction (None when no point is within it).
    """
    if rule not in ("best", "ztw"):
        raise ValueError(f"rule must be 'best' or 'ztw', got {rule!r}")
    if not curve:
        raise ValueError("the curve has no points")
    if not (math.isfinite(full_cost) and full_cost > 0) or any(not (math.isfinite(f) and f > 0) for f in fractions):
        raise ValueError(f"full_cost and the cost fractions must be positive numbers, got {full_cost} and "
                         f"{list(fractions)}")
    accuracy: List[Optional[float]] = []
    for f in fractions:
        budget = f * full_cost
        if rule == "best":
            within = [p.accuracy for p in curve if p.cost <= budget]
            accuracy.append(max(within) if within else None)
        else:
            over = next((i for i, p in enumerate(curve) if p.cost > budget), len(curve))
            accuracy.append(curve[over - 1].accuracy if over > 0 else None)
    return {"rule": rule, "full_cost": float(full_cost), "fractions": [float(f) for f in fractions],
            "accuracy": accuracy, "max_accuracy": max(p.accuracy for p in curve), "last_accuracy": curve[-1].accuracy}


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def measure_latency(
        executor: EarlyExitExecutor,
        images: torch.Tensor,
        batch_size: int = 64,
        warmup: int = 2,
        repeats: int = 5,
) -> Dict[str, Any]:
    """Wall-clock time of the early-exit executor on ``images``: per image at batch 1 (p50 / p95 over
    all ``repeats x N`` calls, percentiles by linear interpolation) and the throughput at
    ``batch_size`` (images per second, median over ``repeats`` passes). Times use
    ``time.perf_counter``, with ``torch.cuda.synchronize`` around each timed call on a GPU.

    Args:
        executor: the executor to time.
        images: a batch ``(N, C, H, W)`` on the model's device.
        batch_size: the batch size of the throughput passes, >= 1.
        warmup: untimed calls of each kind made first, >= 0.
        repeats: timed passes over the images, >= 1.

    Returns:
        The settings and results: ``batch1_p50_ms``, ``batch1_p95_ms``, ``throughput``,
        ``exit_fractions`` and, when the executor knows the costs, ``mean_cost``.
    """
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be a non-empty batch (N, C, H, W), got shape {tuple(images.shape)}")
    if batch_size < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be >= 1 and warmup >= 0, got {batch_size}, {repeats}, {warmup}")
    n = images.shape[0]
    singles, batches = images.split(1), images.split(batch_size)
    for i in range(warmup):
        executor(singles[i % n])
        executor(batches[i % len(batches)])
    _sync(images)
    per_image = []
    for _ in range(repeats):
        for x in singles:
            start = time.perf_counter()
            executor(x)
            _sync(x)
            per_image.append(time.perf_counter() - start)
    passes, exits = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        exits = [executor(x).exits for x in batches]
        _sync(images)
        passes.append(time.perf_counter() - start)
    exits = torch.cat(exits).cpu()
    quantiles = statistics.quantiles(per_image, n=100, method="inclusive") if len(per_image) > 1 else per_image * 99
    result = {"images": n, "repeats": repeats, "warmup": warmup, "batch_size": batch_size, "device": str(images.device),
              "threads": torch.get_num_threads(), "batch1_p50_ms": 1e3 * statistics.median(per_image),
              "batch1_p95_ms": 1e3 * quantiles[94], "throughput": n / statistics.median(passes),
              "exit_fractions": (torch.bincount(exits, minlength=executor.model.num_exits).double() / n).tolist()}
    if executor.costs is not None:
        result["mean_cost"] = float(executor.costs[exits].mean())
    return result
