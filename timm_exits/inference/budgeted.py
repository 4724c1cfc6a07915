"""Budgeted batch classification, exactly as the MSDNet / IMTA references evaluate it.

For each q of a grid, the target exit distribution is P_k ∝ q^k. On a validation split, exit k's
threshold is the score of the floor(n P_k)-th most confident sample among those that have not
exited yet (ties: every sample with score >= T_k exits); the last exit takes the rest. The
thresholds are applied to the test split, reporting accuracy and the expected cumulative cost
sum_k (fraction of test samples leaving at k) x cost_k. The split the thresholds are fitted on is
whatever ``val`` is (DVT fits on the training split); ``envelope`` gives BoostNet's validation-monotone
curve (its ``--flat_curve``).

Every function takes an exit policy (:mod:`.policies`; a score name is the MSDNet rule). With a
``strict`` policy the quota-th sample itself (and its ties) does not exit, as ``>`` says.

Also: threshold search for a target average cost or a target accuracy, and threshold files that
record the model they belong to.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..files import read_json, write_json
from ..quotas import exit_quotas, geometric_fractions
from ..models.predictors import known_predictor, predictor_choices
from .outputs import ExitOutputs
from .policies import ExitPolicy, PolicyLike, resolve_policy

__all__ = ["REFERENCE_Q", "IMTA_Q", "Q_GRIDS", "fit_thresholds", "assign_exits", "exit_metrics", "BudgetPoint",
           "budgeted_curve", "flat_envelope", "thresholds_for_cost", "thresholds_for_accuracy", "Thresholds",
           "check_thresholds"]

REFERENCE_Q = [p / 20 for p in range(1, 40)]  # MSDNet-PyTorch: 0.05 .. 1.95
IMTA_Q = [p / 20 for p in range(1, 41)]  # IMTA: 0.05 .. 2.0
Q_GRIDS = {"reference": REFERENCE_Q, "imta": IMTA_Q}
NEVER, ALWAYS = 1e8, -1e8  # the reference's sentinel thresholds


def fit_thresholds(scores: torch.Tensor, fractions: Sequence[float], policy: PolicyLike = "maxprob") -> torch.Tensor:
    """Per-exit thresholds from validation ``scores`` (exits x samples) and target ``fractions``.

    Args:
        scores: the policy's score of every exit and sample, ``(exits, samples)``.
        fractions: the target fraction of samples leaving at each exit (e.g.
            :func:`~timm_exits.quotas.geometric_fractions`); exit k's quota is ``floor(n P_k)``.
        policy: an :class:`ExitPolicy` or a score name (see :mod:`.policies`).

    Returns:
        One float64 threshold per exit: an exit whose quota is 0, or more than the samples left, gets
        the never-passed 1e8; the last exit gets the always-passed -1e8.
    """
    accepts = resolve_policy(policy).accepts
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
        exited |= accepts(scores[k], thresholds[k])
    thresholds[-1] = ALWAYS
    return thresholds


def assign_exits(scores: torch.Tensor, thresholds: torch.Tensor, policy: PolicyLike = "maxprob") -> torch.Tensor:
    """Exit of every sample: the first whose score passes its threshold, else the policy's fallback
    (see :meth:`ExitPolicy.assign`).

    Args:
        scores: the policy's score of every exit and sample, ``(exits, samples)``.
        thresholds: one per exit (the last is not used).
        policy: an :class:`ExitPolicy` or a score name (see :mod:`.policies`).

    Returns:
        The exit (0-based) of every sample, ``(samples,)`` long.
    """
    return resolve_policy(policy).assign(scores, thresholds)


def exit_metrics(outputs: ExitOutputs, exits: torch.Tensor, costs: Sequence[float]) -> Tuple[float, float, List[float]]:
    """Top-1 accuracy (%) of the predictions of the exits taken, the mean cumulative cost paid and the
    fraction of samples leaving at each exit.

    Args:
        outputs: every exit's outputs and the labels.
        exits: the exit (0-based) each sample takes, ``(samples,)``.
        costs: the cumulative cost of each exit.

    Returns:
        ``(accuracy, cost, exit_fractions)``.
    """
    correct = outputs.preds.gather(0, exits.view(1, -1)).squeeze(0) == outputs.labels
    fractions = torch.bincount(exits, minlength=outputs.num_exits).double() / outputs.num_samples
    cost = float((fractions * torch.tensor(costs, dtype=torch.float64)).sum())
    return 100 * correct.double().mean().item(), cost, fractions.tolist()


@dataclass
class BudgetPoint:
    """One point of a budgeted curve.

    Args:
        q: the ratio of the target exit distribution, P_k ∝ q^k.
        thresholds: the per-exit thresholds fitted for it.
        accuracy: test top-1 (%).
        cost: expected cumulative cost per test sample.
        exit_fractions: the fraction of test samples leaving at each exit.
        val_accuracy: top-1 (%) on the split the thresholds were fitted on.
        val_cost: the mean cost per sample on that split.
    """

    q: float
    thresholds: List[float]
    accuracy: float
    cost: float
    exit_fractions: List[float]
    val_accuracy: float
    val_cost: float


def _point(val: ExitOutputs, test: ExitOutputs, costs, q: float, val_scores, test_scores, policy: ExitPolicy) -> BudgetPoint:
    thresholds = fit_thresholds(val_scores, geometric_fractions(q, val.num_exits), policy)
    val_acc, val_cost, _ = exit_metrics(val, policy.assign(val_scores, thresholds), costs)
    acc, cost, fractions = exit_metrics(test, policy.assign(test_scores, thresholds), costs)
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
        policy: PolicyLike = "maxprob",
        envelope: bool = False,
) -> List[BudgetPoint]:
    """The reference budgeted evaluation: thresholds fitted on ``val`` for each q, applied to ``test``.

    Args:
        val: the outputs the thresholds are fitted on.
        test: the outputs they are applied to.
        costs: the cumulative cost of each exit (MACs, or any unit).
        q_grid: the q of each point; exit k's target fraction is ∝ q^k.
        policy: an :class:`ExitPolicy` or a score name (see :mod:`.policies`).
        envelope: make the curve validation-monotone with :func:`flat_envelope`.

    Returns:
        One :class:`BudgetPoint` per q, in the grid's order.
    """
    _check(val, test, costs)
    policy = resolve_policy(policy)
    val_scores, test_scores = policy.scores(val.probs), policy.scores(test.probs)
    points = [_point(val, test, costs, q, val_scores, test_scores, policy) for q in q_grid]
    return flat_envelope(points) if envelope else points


def flat_envelope(points: Sequence[BudgetPoint]) -> List[BudgetPoint]:
    """BoostNet's ``--flat_curve``: along the q grid, a point whose validation accuracy is not above
    the best earlier one takes that point's validation and test accuracy (a budget of this cost can
    afford the cheaper thresholds); its q, thresholds, costs and exit fractions stay its own."""
    out, best = [], None
    for p in points:
        if best is None or p.val_accuracy > best.val_accuracy:
            best = p
        out.append(dataclasses.replace(p, accuracy=best.accuracy, val_accuracy=best.val_accuracy))
    return out


_SEARCH_Q = [10 ** (k / 100) for k in range(-250, 251)]  # q from 0.003 to 316, log-spaced


def thresholds_for_cost(val: ExitOutputs, costs: Sequence[float], target: float,
                        policy: PolicyLike = "maxprob") -> BudgetPoint:
    """The most accurate (on ``val``) geometric-distribution thresholds whose average cost on ``val``
    is at most ``target``.

    Args:
        val: the outputs the thresholds are fitted and measured on.
        costs: the cumulative cost of each exit.
        target: the largest average cost per sample, in the unit of ``costs``.
        policy: an :class:`ExitPolicy` or a score name (see :mod:`.policies`).

    Returns:
        The chosen :class:`BudgetPoint` (its ``val_accuracy`` and ``val_cost`` are measured on ``val``).

    Raises:
        ValueError: no thresholds reach the target.
    """
    points = [p for p in budgeted_curve(val, val, costs, _SEARCH_Q, policy) if p.val_cost <= target]
    if not points:
        raise ValueError(f"no thresholds reach an average cost of {target:g}; the first exit alone costs {costs[0]:g}")
    return max(points, key=lambda p: (p.val_accuracy, -p.val_cost))


def thresholds_for_accuracy(val: ExitOutputs, costs: Sequence[float], target: float,
                            policy: PolicyLike = "maxprob") -> BudgetPoint:
    """The cheapest (on ``val``) geometric-distribution thresholds whose accuracy on ``val`` is at
    least ``target`` (%).

    Args:
        val: the outputs the thresholds are fitted and measured on.
        costs: the cumulative cost of each exit.
        target: the smallest top-1 accuracy, in %.
        policy: an :class:`ExitPolicy` or a score name (see :mod:`.policies`).

    Returns:
        The chosen :class:`BudgetPoint` (its ``val_accuracy`` and ``val_cost`` are measured on ``val``).

    Raises:
        ValueError: no thresholds reach the target.
    """
    points = [p for p in budgeted_curve(val, val, costs, _SEARCH_Q, policy) if p.val_accuracy >= target]
    if not points:
        per_exit = [round(100 * (p == val.labels).double().mean().item(), 2) for p in val.preds]
        raise ValueError(f"no thresholds reach {target:g}% on the validation split (single exits reach {per_exit})")
    return min(points, key=lambda p: (p.val_cost, -p.val_accuracy))


def check_thresholds(thresholds: Sequence[float], num_exits: int) -> None:
    """One finite threshold per exit (the reference's never / always sentinels are +-1e8, finite).

    Args:
        thresholds: the thresholds to check.
        num_exits: the number of exits they must cover.

    Raises:
        ValueError: the count differs, or a threshold is not a finite number.
    """
    if len(thresholds) != num_exits:
        raise ValueError(f"{len(thresholds)} thresholds for {num_exits} exits")
    if any(not math.isfinite(float(t)) for t in thresholds):
        raise ValueError(f"thresholds must be finite numbers (use {NEVER:g} for an exit nobody takes), got "
                         f"{list(thresholds)}")


@dataclass
class Thresholds:
    """Exit thresholds with what they belong to, stored as JSON. Files written before a field was
    recorded load with the old behaviour: ``input_size=None``, fallback ``last``, non-strict, the
    exits, weights unchecked, no learned parameters.

    Args:
        model: the model's name.
        num_exits: its number of exits.
        policy: the policy's score name, or an :class:`ExitPolicy`, which sets ``fallback``,
            ``strict`` and ``params`` too.
        thresholds: one finite threshold per exit.
        costs: the cumulative cost of each exit (non-decreasing); empty: unknown.
        note: free text, e.g. how the thresholds did on the validation split.
        input_size: (C, H, W) the costs were measured and the thresholds fitted at; ``None``: any.
        fallback: the policy's fallback, one of ``FALLBACKS``.
        strict: the policy's comparison is ``>`` instead of ``>=``.
        predictor: what answers at the exits: ``'exits'``, the model's own exits, or a registered
            predictor around them (``'product_anytime'``, ``'mie'``, ...; see
            :mod:`timm_exits.models.predictors`).
        weights: the identity of the weights they were fitted on
            (:func:`~timm_exits.inference.executor.weights_sha256` of the model; the executor refuses
            other weights); ``None``: unchecked.
        params: a learned score's parameters (:class:`ExitPolicy`), one row per exit but the last;
            ``None`` for the other scores.
    """

    model: str
    num_exits: int
    policy: Union[str, ExitPolicy]
    thresholds: List[float]
    costs: List[float] = field(default_factory=list)
    note: str = ""
    input_size: Optional[List[int]] = None
    fallback: str = "last"
    strict: bool = False
    predictor: str = "exits"
    weights: Optional[str] = None
    params: Optional[List[List[float]]] = None

    def __post_init__(self):
        if isinstance(self.policy, ExitPolicy):
            self.policy, self.fallback, self.strict, self.params = (self.policy.score, self.policy.fallback,
                                                                    self.policy.strict, self.policy.params)
        # refuses an unknown score, fallback or strictness, and parameters that do not fit
        policy = ExitPolicy(self.policy, self.fallback, self.strict, self.params)
        policy.check_exits(self.num_exits)
        self.params = policy.as_dict().get("params")
        check_thresholds(self.thresholds, self.num_exits)
        if not known_predictor(self.predictor):
            raise ValueError(f"predictor must be {predictor_choices()}, got {self.predictor!r}")
        if self.weights is not None and not (isinstance(self.weights, str) and len(self.weights) == 64
                                             and all(c in "0123456789abcdef" for c in self.weights)):
            raise ValueError(f"weights must be the SHA-256 of the model's weights (64 hex digits), got {self.weights!r}")
        if self.input_size is not None:
            if len(self.input_size) != 3 or any(not isinstance(s, int) or s < 1 for s in self.input_size):
                raise ValueError(f"input_size must be (C, H, W), three positive integers, got {self.input_size}")
            self.input_size = list(self.input_size)
        if self.costs:
            if len(self.costs) != self.num_exits:
                raise ValueError(f"{len(self.costs)} costs for {self.num_exits} exits (one cumulative cost per exit)")
            if any(not math.isfinite(c) or c < 0 for c in self.costs) or any(
                    b < a for a, b in zip(self.costs, self.costs[1:])):
                raise ValueError(f"costs must be finite, non-negative and cumulative (non-decreasing), got {self.costs}")

    @property
    def exit_policy(self) -> ExitPolicy:
        return ExitPolicy(self.policy, self.fallback, self.strict, self.params)

    def save(self, path: str) -> None:
        """Write atomically (a temporary file, then a rename)."""
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str, model: Optional[str] = None, num_exits: Optional[int] = None) -> "Thresholds":
        """Read a thresholds file.

        Args:
            path: the JSON file written by :meth:`save`.
            model: the model name the file must record; ``None`` does not check it.
            num_exits: the number of exits the file must record; ``None`` does not check it.

        Returns:
            The thresholds.

        Raises:
            ValueError: the file is unreadable or invalid, or records another model or number of exits.
        """
        try:
            data = read_json(path)
            if not isinstance(data, dict):
                raise ValueError(f"it holds a {type(data).__name__}, not a mapping")
            loaded = cls(**data)
        except (OSError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a valid thresholds file written by timm_exits ({e})") from None
        if model is not None and loaded.model != model:
            raise ValueError(f"{path} holds thresholds for {loaded.model!r}, not for {model!r}")
        if num_exits is not None and loaded.num_exits != num_exits:
            raise ValueError(f"{path} holds {loaded.num_exits} thresholds, the model has {num_exits} exits")
        return loaded
