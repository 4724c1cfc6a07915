"""Anytime predictions from cached exits, and conditional monotonicity (Jazbec et al., NeurIPS 2023).

* **Product anytime (PA)**: exit l answers pi_l(c) ∝ prod_{m<=l} g(z_{m,c})^{w_m}, a product of
  experts over the exits so far, with g = ReLU (optionally clipped from above) or softplus on the
  raw logits z and weights w_m = m/L by default (the paper's plots). A class that any exit so far
  gives a non-positive logit is ruled out for good, so the ground-truth probability tends not to
  drop from one exit to the next. Computed in float64 in log space.
* **Caching anytime (CA)**: exit l answers with the probabilities of the most confident exit so far.
* **Conditional monotonicity**: the % of samples whose ground-truth probability drops by more than
  delta between some exit and a later one; and the mean ground-truth probability per exit.

PA needs raw logits (ReLU is not shift-invariant, so it cannot be rebuilt from softmaxes); CA and the
metrics need only probabilities. Every function takes tensors (``exits x samples x classes``) or an
``ExitOutputs``-like object (``.logits`` / ``.probs`` and ``.labels``).

:class:`~timm_exits.models.product_anytime.ProductAnytimeModel` answers PA online: a multi-exit model
whose exit l outputs PA's log-probabilities, the running log-product carried in its exit-history state,
so the early-exit executor (with batch compaction) and every evaluation run on PA's answers.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from ..models.product_anytime import log_terms, product_log_probs, product_weights

__all__ = ["MONOTONICITY_DELTAS", "product_anytime", "caching_anytime", "conditional_monotonicity",
           "ground_truth_probability", "check_exits_tensor"]

MONOTONICITY_DELTAS = (0.01, 0.05, 0.1, 0.2, 0.5)  # the paper's decrease thresholds

Source = Union[torch.Tensor, Any]  # a tensor, or an object with .logits / .probs and .labels


def check_exits_tensor(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x``, checked to be a tensor of shape (exits, samples, classes) with an exit and a sample.

    Args:
        x: the tensor to check.
        what: what it holds (e.g. ``"logits"``), to name it in the error.

    Returns:
        ``x`` itself.

    Raises:
        ValueError: ``x`` is not a tensor of that shape, or has no exit or no sample.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] == 0 or x.shape[1] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected {what} of shape (exits, samples, classes) with at least one exit and one sample, "
                         f"got {shape}")
    return x


def _logits_of(source: Source) -> torch.Tensor:
    """The raw logits of a tensor or of outputs that keep them (``.logits``)."""
    if isinstance(source, torch.Tensor):
        return source
    logits = getattr(source, "logits", None)
    if logits is None or not getattr(source, "raw_logits", True):
        raise ValueError("these outputs keep no raw logits (outputs given as probabilities have none, a product-anytime "
                         "model's are log-probabilities): product anytime needs the model's own logits")
    return logits


def _probs_and_labels(source: Source, labels: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(source, torch.Tensor):
        source, labels = source.probs, source.labels if labels is None else labels
    probs = check_exits_tensor(source, "probabilities")
    if labels is None or labels.shape != probs.shape[1:2]:
        raise ValueError(f"expected labels of shape ({probs.shape[1]},), got "
                         f"{None if labels is None else tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= probs.shape[-1]:
        raise ValueError(f"labels must be class indices in [0, {probs.shape[-1]}), got {labels.min()}..{labels.max()}")
    return probs, labels.long()


def _truth(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The probability of the true class at every exit (exits x samples)."""
    return probs.gather(-1, labels.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(-1)


def _check_probabilities(probs: torch.Tensor) -> None:
    if probs.isnan().any():
        raise ValueError("the probabilities contain NaN (a product anytime without fallback collapses to 0/0: "
                         "use fallback=True)")
    if probs.min() < 0 or not torch.allclose(probs.sum(-1).double(), torch.ones((), dtype=torch.float64), atol=1e-3):
        raise ValueError("expected probabilities (non-negative, summing to 1 over classes); for logits pass "
                         "logits.softmax(-1)")


def product_anytime(
        logits: Source,
        weights: Optional[Sequence[float]] = None,
        softplus: bool = False,
        floor: float = 0.0,
        ceiling: Optional[float] = None,
        fallback: bool = True,
) -> torch.Tensor:
    """Product-anytime probabilities (``exits x samples x classes``, float32) from raw logits.

    Args:
        logits: raw logits ``(exits, samples, classes)``, or outputs with ``.logits``.
        weights: one non-negative exponent per exit; default ``w_m = m / L`` (m = 1..L), as in the
            paper's plots (the reference function's own default is all ones). A zero weight makes its
            exit's factor 1 (``0 ** 0 = 1``, as ``torch.pow``).
        softplus: use softplus instead of ReLU (then ``floor`` and ``ceiling`` do not apply).
        floor: the ReLU's threshold, ``max(z, floor)``; 0 is the plain ReLU.
        ceiling: clip the logits from above at this value first (``None``: no clipping).
        fallback: where the product is zero for every class (no class has had a positive logit at
            every exit so far), answer ``softmax(z_l)`` of the current exit. The reference's default
            is no fallback, which leaves such rows 0/0 = NaN; ``fallback=False`` does the same.
    """
    z = check_exits_tensor(_logits_of(logits), "logits").double()
    w = product_weights(weights, z.shape[0], softplus, floor, ceiling).view(-1, 1, 1)
    log_product = log_terms(z, w, softplus, floor, ceiling).cumsum(0)
    return product_log_probs(log_product, z, fallback).exp().float()


def caching_anytime(probs: Source) -> torch.Tensor:
    """Caching-anytime probabilities: at exit l, those of the exit m <= l with the largest max-softmax
    (ties: the later exit, as the reference). Takes probabilities ``(exits, samples, classes)`` or
    outputs with ``.probs``; returns a tensor of the same shape and dtype."""
    if not isinstance(probs, torch.Tensor):
        probs = probs.probs
    _check_probabilities(check_exits_tensor(probs, "probabilities"))
    confidence = probs.max(-1).values
    best = torch.zeros(probs.shape[1], dtype=torch.long)
    samples = torch.arange(probs.shape[1])
    cached = torch.empty_like(probs)
    for exit_index in range(probs.shape[0]):
        best = torch.where(confidence[exit_index] >= confidence[best, samples], exit_index, best)
        cached[exit_index] = probs[best, samples]
    return cached


def conditional_monotonicity(
        probs: Source,
        labels: Optional[torch.Tensor] = None,
        deltas: Sequence[float] = MONOTONICITY_DELTAS,
) -> Dict[float, float]:
    """The % of samples whose ground-truth probability decreases by more than ``delta`` between some
    exit i and a later exit j, i.e. ``p_j(y) - p_i(y) < -delta`` (0 for a monotone model).

    Args:
        probs: probabilities ``(exits, samples, classes)``, or outputs with ``.probs`` and ``.labels``.
        labels: the class index of each sample, ``(samples,)``; ``None`` takes the outputs' own.
        deltas: the decrease thresholds, each in [0, 1); default the paper's.

    Returns:
        ``{delta: % of samples}``, one entry per threshold.
    """
    probs, labels = _probs_and_labels(probs, labels)
    _check_probabilities(probs)
    if len(deltas) == 0 or any(not 0 <= d < 1 for d in deltas):
        raise ValueError(f"expected decrease thresholds delta in [0, 1), got {list(deltas)}")
    truth = _truth(probs, labels)
    # the largest drop max_{i<j} p_i - p_j, from the running maximum of the earlier exits
    drops = truth.cummax(0).values[:-1] - truth[1:]
    largest = drops.amax(0) if len(drops) else torch.zeros_like(truth[0])
    return {float(d): 100 * (largest > d).double().mean().item() for d in deltas}


def ground_truth_probability(probs: Source, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The mean probability of the true class per exit, ``(exits,)`` float64.

    Args:
        probs: probabilities ``(exits, samples, classes)``, or outputs with ``.probs`` and ``.labels``.
        labels: the class index of each sample, ``(samples,)``; ``None`` takes the outputs' own.

    Returns:
        A float64 tensor with one mean per exit.
    """
    probs, labels = _probs_and_labels(probs, labels)
    return _truth(probs, labels).double().mean(1)
