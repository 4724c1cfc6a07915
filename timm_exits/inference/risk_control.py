"""Risk-controlled early exit, RC-EENN (Jazbec et al., "Fast yet Safe", 2024).

One global threshold lambda for every exit: a sample leaves at the first exit whose max-softmax is
strictly above lambda, else at the last. Going down a grid of lambdas (1.00 -> 0.00 in 0.01 steps,
i.e. more and more aggressive), each sample's loss of exiting early instead of at the last exit is
measured on a calibration set; a selection rule then picks the most aggressive lambda whose risk
(the mean loss) stays below a tolerated level epsilon:

* ``naive``: empirical risk < epsilon (no guarantee);
* ``crc`` (conformal risk control, in expectation): empirical risk <= ((n+1) epsilon - B) / n;
* ``ucb-wsr`` / ``ucb-hb`` (with probability 1 - delta): an upper confidence bound on the risk
  (Waudby-Smith–Ramdas betting, or Hoeffding–Bentkus) < epsilon;
* ``ltt`` (learn then test, with probability 1 - delta): fixed-sequence testing of "risk > epsilon"
  down the grid with Hoeffding–Bentkus p-values.

``naive`` and ``crc`` take the last qualifying lambda anywhere on the grid, as the reference does,
and take the empirical risk as it does: the mean in the losses' own dtype (float32 for the 0/1 losses,
which :func:`lambda_losses` keeps in float32 as the reference computes them), compared with epsilon in
float64, so a risk of exactly 3/100 (float32 0.029999999) passes epsilon = 0.03. The UCB and LTT
rules stop at the end of the first run of safe lambdas (losses need not be monotone in lambda). At
lambda = 1 nobody exits early, so every loss below is 0 there: index 0 of the grid is the safe
fallback of every rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import rel_entr
from scipy.stats import binom

from .anytime import check_exits_tensor
from .budgeted import assign_exits
from .policies import ExitPolicy, exit_scores

__all__ = ["RC_POLICY", "LAMBDAS", "LOSSES", "LOSS_BOUNDS", "SELECTION_RULES", "exits_at", "LambdaLosses", "lambda_losses",
           "wsr_upper_bound", "hb_p_value", "hb_upper_bound", "select_lambda", "RiskControl",
           "risk_controlled_thresholds"]

RC_POLICY = ExitPolicy("maxprob", "last", strict=True)  # RC-EENN's exit rule: max-softmax > lambda, else the last
LAMBDAS = torch.arange(100, -1, -1, dtype=torch.float64) / 100  # 1.00, 0.99, ..., 0.00
LOSS_BOUNDS = {
    "prediction-gap": 1.0,  # 1[early wrong] - 1[last wrong], in {-1, 0, 1}
    "consistency": 1.0,  # 1[early prediction != last prediction]
    "brier-gap": 2.0,  # Brier(early, label) - Brier(last, label), in [-2, 2]
    "brier-gap-final": 2.0,  # the same against the last exit's prediction instead of the label
}
LOSSES = tuple(LOSS_BOUNDS)
SELECTION_RULES = ("naive", "crc", "ucb-wsr", "ucb-hb", "ltt", "ltt-first-failing")


def _check_level(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value}")


def exits_at(confidence: torch.Tensor, lam: float) -> torch.Tensor:
    """The exit (0-based) of each sample: the first whose confidence is strictly above ``lam``, else
    the last (:data:`RC_POLICY`).

    Args:
        confidence: the max-softmax of every exit and sample, ``(exits, samples)``.
        lam: the global threshold.

    Returns:
        The exit of every sample, ``(samples,)`` long.
    """
    return assign_exits(confidence, torch.full((confidence.shape[0],), float(lam), dtype=torch.float64), RC_POLICY)


@dataclass
class LambdaLosses:
    """Per-sample losses of the global-lambda exit rule at every lambda of a descending grid.

    Args:
        lambdas: the grid, ``(K,)`` float64, from conservative to aggressive.
        losses: ``(K, samples)``: float32 for the 0/1 losses, float64 for the Brier gaps, as the
            reference.
        exits: ``(K, samples)`` long: the exit taken (0-based).
        loss: the loss's name, one of ``LOSSES``.
        loss_bound: the largest possible loss (``LOSS_BOUNDS[loss]``).
        num_exits: the model's number of exits.
    """

    lambdas: torch.Tensor
    losses: torch.Tensor
    exits: torch.Tensor
    loss: str
    loss_bound: float
    num_exits: int

    def subset(self, index: torch.Tensor) -> "LambdaLosses":
        """The same table for some samples (a calibration or test split)."""
        return LambdaLosses(self.lambdas, self.losses[:, index], self.exits[:, index], self.loss, self.loss_bound,
                            self.num_exits)


def _brier(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum_c (p_c - 1[c = target])^2 per sample, in float64."""
    one_hot = torch.nn.functional.one_hot(target, probs.shape[-1]).double()
    return ((probs.double() - one_hot) ** 2).sum(-1)


def lambda_losses(
        logits: Union[torch.Tensor, Any],
        labels: Optional[torch.Tensor] = None,
        loss: str = "prediction-gap",
        lambdas: Optional[Sequence[float]] = None,
) -> LambdaLosses:
    """The losses of exiting early at every lambda. Confidence is the max of the probabilities: the
    float32 softmax of raw logits (as ``ExitOutputs.probs``), or for outputs without raw logits (given
    as probabilities, or a product-anytime model's) their own ``.probs``, as given; predictions are
    the argmax of the same.

    Args:
        logits: raw logits ``(exits, samples, classes)``, or outputs with ``.logits`` / ``.probs`` and
            ``.labels`` (an :class:`ExitOutputs`).
        labels: the class index of each sample, ``(samples,)``; ``None`` takes the outputs' own.
            ``consistency`` and ``brier-gap-final`` do not need them.
        loss: one of ``LOSSES``.
        lambdas: the grid, in [0, 1] from conservative (large) to aggressive; ``None``: ``LAMBDAS``.

    Returns:
        The :class:`LambdaLosses` table.
    """
    if not isinstance(logits, torch.Tensor):
        labels = logits.labels if labels is None else labels
    probs, preds = _probs_and_preds(logits)
    if loss not in LOSS_BOUNDS:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    needs_labels = loss in ("prediction-gap", "brier-gap")
    if needs_labels and (labels is None or labels.shape != probs.shape[1:2]):
        raise ValueError(f"the {loss} loss needs labels of shape ({probs.shape[1]},), got "
                         f"{None if labels is None else tuple(labels.shape)}")
    lambdas = LAMBDAS if lambdas is None else torch.as_tensor(lambdas, dtype=torch.float64).flatten()
    if len(lambdas) == 0 or (lambdas.diff() > 0).any() or lambdas.min() < 0 or lambdas.max() > 1:
        raise ValueError("expected a non-empty grid of lambdas in [0, 1], from conservative (large) to aggressive")
    confidence = exit_scores(probs, "maxprob")
    samples = torch.arange(probs.shape[1])
    all_losses, all_exits = [], []
    for lam in lambdas.tolist():
        exits = exits_at(confidence, lam)
        early, last = preds[exits, samples], preds[-1]
        if loss == "prediction-gap":
            value = (early != labels).float() - (last != labels).float()
        elif loss == "consistency":
            value = (early != last).float()
        else:
            target = labels if loss == "brier-gap" else probs[-1].argmax(-1)
            value = _brier(probs[exits, samples], target) - _brier(probs[-1], target)
        all_losses.append(value)
        all_exits.append(exits)
    return LambdaLosses(lambdas, torch.stack(all_losses), torch.stack(all_exits), loss, LOSS_BOUNDS[loss],
                        probs.shape[0])


def _probs_and_preds(source: Union[torch.Tensor, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and predictions of raw logits (a tensor, or outputs' ``.logits`` when they are raw
    logits): their float32 softmax and their argmax; of other outputs: their ``.probs`` and its argmax."""
    if not isinstance(source, torch.Tensor):
        logits = getattr(source, "logits", None)
        if logits is None or not getattr(source, "raw_logits", True):
            probs = check_exits_tensor(getattr(source, "probs", None),
                                       "probabilities (.probs of outputs without raw logits)")
            return probs, probs.argmax(-1)
        source = logits
    return check_exits_tensor(source, "logits").float().softmax(-1), source.argmax(-1)


def wsr_upper_bound(losses: Sequence[float], delta: float, loss_bound: float = 1.0) -> float:
    """The Waudby-Smith–Ramdas upper confidence bound (level 1 - delta) on the mean of ``losses``,
    in the order given, as in RCPS (Bates et al. 2021):
    mu_t = (1/2 + sum_{i<=t} x_i) / (t + 1), s2_t = (1/4 + sum_{i<=t} (x_i - mu_i)^2) / (t + 1),
    nu_t = min(1 / B, sqrt(2 log(1/delta) / (n s2_{t-1}))) with s2_0 = 1/4; the bound is the m at
    which max_t sum_{i<=t} log(1 - nu_i (x_i - m)) = log(1/delta), searched in (0, 1).

    Args:
        losses: the calibration losses, at least one, each <= ``loss_bound``.
        delta: 1 - the confidence level, in (0, 1).
        loss_bound: B, the largest possible loss (caps the bets).

    Returns:
        The bound; ``loss_bound`` when it is 1 or more.
    """
    _check_level("delta", delta)
    x = np.asarray(losses, dtype=np.float64).ravel()
    n = len(x)
    if n == 0:
        raise ValueError("the calibration set is empty")
    if x.max() > loss_bound:
        raise ValueError(f"losses must be at most loss_bound={loss_bound}, got {x.max()}")
    t = np.arange(1, n + 1)
    mean = (0.5 + np.cumsum(x)) / (t + 1)
    var = (0.25 + np.cumsum((x - mean) ** 2)) / (t + 1)
    var_before = np.concatenate([[0.25], var[:-1]])
    nu = np.minimum(np.sqrt(2 * np.log(1 / delta) / (n * var_before)), 1 / loss_bound)

    def excess_log_wealth(m: float) -> float:
        return np.cumsum(np.log1p(-nu * (x - m))).max() - np.log(1 / delta)

    tiny = 1e-10
    if excess_log_wealth(1.0) < 0:
        return float(loss_bound)
    if excess_log_wealth(tiny) > 0:
        return tiny
    return float(brentq(excess_log_wealth, tiny, 1 - tiny, maxiter=1000))


def hb_p_value(risk: float, n: int, epsilon: float, binary_loss: bool = False) -> float:
    """The Hoeffding–Bentkus p-value of "the risk exceeds epsilon" for an empirical ``risk`` of ``n``
    losses in [0, 1]: min(exp(-n KL(min(risk, epsilon) || epsilon)), e P[Bin(n, epsilon) <= ceil(n risk)]).
    ``n risk`` is rounded to 9 decimals before the ceiling, so that k/n of a 0/1 loss counts k.

    Args:
        risk: the empirical risk (mean loss), in [0, 1].
        n: the number of losses.
        epsilon: the risk level tested, in [0, 1].
        binary_loss: the losses are 0/1: the p-value is the binomial tail alone.

    Returns:
        The p-value.
    """
    if not (0 <= risk <= 1 and 0 <= epsilon <= 1):
        raise ValueError(f"the Hoeffding–Bentkus p-value needs a risk and an epsilon in [0, 1], got {risk} and "
                         f"{epsilon}")
    tail = binom.cdf(math.ceil(round(n * risk, 9)), n, epsilon)
    if binary_loss:
        return float(tail)
    a = min(risk, epsilon)
    hoeffding = np.exp(-n * (rel_entr(a, epsilon) + rel_entr(1 - a, 1 - epsilon)))
    return float(min(hoeffding, math.e * tail))


def hb_upper_bound(risk: float, n: int, delta: float, binary_loss: bool = False) -> float:
    """The Hoeffding–Bentkus upper confidence bound (level 1 - delta): the largest alpha whose
    p-value :func:`hb_p_value` is still >= delta (it decreases in alpha).

    Args:
        risk: the empirical risk (mean loss), in [0, 1].
        n: the number of losses.
        delta: 1 - the confidence level, in (0, 1).
        binary_loss: the losses are 0/1 (see :func:`hb_p_value`).

    Returns:
        The bound, in [risk, 1].
    """
    _check_level("delta", delta)
    if hb_p_value(risk, n, 1.0, binary_loss) >= delta:
        return 1.0
    if hb_p_value(risk, n, risk, binary_loss) < delta:
        return float(risk)
    return float(brentq(lambda alpha: hb_p_value(risk, n, alpha, binary_loss) - delta, risk, 1.0, maxiter=1000))


def _end_of_first_run(safe: np.ndarray) -> int:
    """The last index of the run of safe grid points that starts at index 0 (0 if index 0 is unsafe)."""
    unsafe = np.flatnonzero(~safe)
    if len(unsafe) == 0:
        return len(safe) - 1
    return max(int(unsafe[0]) - 1, 0)


def _last(safe: np.ndarray) -> int:
    """The last safe index anywhere on the grid (0 if none)."""
    indices = np.flatnonzero(safe)
    return int(indices[-1]) if len(indices) else 0


def select_lambda(
        losses: Union[torch.Tensor, np.ndarray, LambdaLosses],
        epsilon: float,
        rule: str = "ucb-wsr",
        delta: float = 0.1,
        loss_bound: Optional[float] = None,
        binary_loss: bool = False,
        seed: Optional[int] = 0,
) -> int:
    """The index of the selected lambda.

    Args:
        losses: calibration losses ``(lambdas, samples)`` whose rows go from conservative to
            aggressive, or a :class:`LambdaLosses`.
        epsilon: the tolerated risk, in (0, 1).
        rule: one of ``SELECTION_RULES`` (see the module docstring). ``ltt`` is the textbook
            fixed-sequence rule: test index 0, 1, ... while the p-value is <= delta, and take the last
            rejected index. ``ltt-first-failing`` is the reference's rule: the first index whose
            p-value is > delta (one step more aggressive, and not certified); the last index if none.
        delta: 1 - the confidence level of the UCB and LTT rules, in (0, 1).
        loss_bound: B, the largest possible loss (CRC's correction, WSR's bet cap); the table's own
            bound for a :class:`LambdaLosses`, else 1.
        binary_loss: the losses are 0/1: the Hoeffding–Bentkus p-value is the binomial tail alone.
        seed: ``ucb-wsr`` is a sequential bound, valid for samples in random order; the samples are
            shuffled with this seed first (a dataset in class order would otherwise fool it: the
            bound of 170 zeros then 30 ones is 0.014). ``None`` keeps the order given (the
            reference's, whose calibration split is drawn at random).

    ``naive`` and ``crc`` take the mean loss in the losses' own dtype, as the reference (see the
    module docstring); the other rules compute in float64.

    The Hoeffding–Bentkus rules (``ucb-hb``, ``ltt*``) need losses in [0, 1]: they use
    ``max(loss, 0) / B`` against ``epsilon / B`` (the mean clipped loss bounds the mean loss from
    above, so the guarantee carries over).
    """
    if isinstance(losses, LambdaLosses):
        loss_bound = losses.loss_bound if loss_bound is None else loss_bound
        losses = losses.losses
    loss_bound = 1.0 if loss_bound is None else float(loss_bound)
    given = losses.detach().cpu().numpy() if isinstance(losses, torch.Tensor) else np.asarray(losses)
    x = given.astype(np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected losses of shape (lambdas, samples), got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("the calibration set is empty")
    _check_level("epsilon", epsilon)
    _check_level("delta", delta)
    if rule not in SELECTION_RULES:
        raise ValueError(f"rule must be one of {SELECTION_RULES}, got {rule!r}")
    if loss_bound <= 0 or x.max() > loss_bound:
        raise ValueError(f"losses must be at most loss_bound={loss_bound} (> 0), got a loss of {x.max()}")
    n = x.shape[1]
    # the reference's risk: the mean in the losses' own dtype (float32 ones stay float32), compared in float64
    risk = (given if given.dtype == np.float32 else x).mean(1).astype(np.float64)
    if rule == "naive":
        return _last(risk < epsilon)
    if rule == "crc":
        return _last(risk <= (n + 1) * epsilon / n - loss_bound / n)
    if rule == "ucb-wsr":
        shuffled = x if seed is None else x[:, np.random.default_rng(seed).permutation(n)]
        return _end_of_first_run(np.array([wsr_upper_bound(row, delta, loss_bound) < epsilon for row in shuffled]))
    unit_risk = (np.maximum(x, 0.0) / loss_bound).mean(1)
    unit_epsilon = epsilon / loss_bound
    if rule == "ucb-hb":
        return _end_of_first_run(np.array([hb_upper_bound(r, n, delta, binary_loss) < unit_epsilon
                                           for r in unit_risk]))
    p_values = np.array([hb_p_value(r, n, unit_epsilon, binary_loss) for r in unit_risk])
    if rule == "ltt":
        return _end_of_first_run(p_values <= delta)
    failing = np.flatnonzero(p_values > delta)  # ltt-first-failing
    return int(failing[0]) if len(failing) else len(p_values) - 1


@dataclass
class RiskControl:
    """A selected global threshold.

    Args:
        lambda_index: the index of ``lam`` in the grid.
        lam: the selected threshold.
        thresholds: ``(exits,)`` float64, all equal to ``lam`` (the last is never used: everything
            left exits there), meant for a **strict** test, score > threshold.
        rule: the selection rule.
        epsilon: the tolerated risk.
        delta: 1 - the confidence level.
        calibration_risk: the mean loss at ``lam`` on the calibration samples.
        mean_exit: the mean exit (0-based) at ``lam`` on the calibration samples.
        policy: what the thresholds are for: ``EarlyExitExecutor(model, rc.thresholds, rc.policy)``.
    """

    lambda_index: int
    lam: float
    thresholds: torch.Tensor
    rule: str
    epsilon: float
    delta: float
    calibration_risk: float
    mean_exit: float
    policy: ExitPolicy = RC_POLICY


def risk_controlled_thresholds(
        calibration: Union[torch.Tensor, Any, LambdaLosses],
        epsilon: float,
        labels: Optional[torch.Tensor] = None,
        loss: str = "prediction-gap",
        rule: str = "ucb-wsr",
        delta: float = 0.1,
        lambdas: Optional[Sequence[float]] = None,
        binary_loss: bool = False,
        seed: Optional[int] = 0,
) -> RiskControl:
    """Calibrate the global exit threshold on ``calibration`` so that the ``loss`` risk is at most
    ``epsilon``.

    Args:
        calibration: logits ``(exits, samples, classes)`` with ``labels``, outputs with ``.probs``
            and ``.labels``, or a :class:`LambdaLosses` (then ``labels``, ``loss`` and ``lambdas``
            are not used).
        epsilon: the tolerated risk, in (0, 1).
        labels: the class index of each sample, ``(samples,)``; ``None`` takes the outputs' own.
        loss: one of ``LOSSES``.
        rule: one of ``SELECTION_RULES`` (see :func:`select_lambda`).
        delta: 1 - the confidence level of the UCB and LTT rules, in (0, 1).
        lambdas: the grid, from conservative to aggressive; ``None``: ``LAMBDAS``.
        binary_loss: the losses are 0/1 (see :func:`select_lambda`).
        seed: the shuffle seed of ``ucb-wsr`` (see :func:`select_lambda`).

    Returns:
        The selected threshold; its per-exit ``thresholds`` are for a strict comparison: exit where
        max-softmax > threshold.
    """
    table = calibration if isinstance(calibration, LambdaLosses) else lambda_losses(calibration, labels, loss, lambdas)
    index = select_lambda(table, epsilon, rule, delta, binary_loss=binary_loss, seed=seed)
    lam = float(table.lambdas[index])
    return RiskControl(index, lam, torch.full((table.num_exits,), lam, dtype=torch.float64), rule, epsilon, delta,
                       float(table.losses[index].mean()), float(table.exits[index].double().mean()))
