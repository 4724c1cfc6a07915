"""JEI-DNN's gate training (Regol et al., ICLR 2024): oracle exits, cumulative gate targets and the
gates' weighted binary cross-entropy.

For a sample with per-exit cross-entropies ``CE_l`` and cumulative costs ``c_l`` (l = 0..K-1), the
**oracle exit** is ``argmin_l CE_l + lambda * c_l / c_{K-1}`` (the last exit included; the first on
ties). Gate l (l = 0..K-2) should fire from the oracle exit on: its target is 1 when the oracle exit
is <= l (**cumulative one-hot**). The loss is the mean over samples and gates of
``BCE(gate logit, target)``, with a positive target's term multiplied by gate l's **positive weight**
(:func:`oracle_pos_weights`: the reference's ``#0 / #1`` ratio of how often l is the oracle exit,
clipped at 5).

The reference's schedule alternates the gates' training with the classifiers' (the heads of the
exits but the last, on a frozen backbone): turns of N optimizer updates, the gates' first
(:func:`alternation_turn`). The classifiers' loss is the reference's gate-weighted one, which equals
:func:`classifier_loss`, the mean over the G = K - 1 gated exits of their cross-entropies: the gate
weights cancel per sample, in value and in gradient.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .losses import exit_cross_entropies

__all__ = ["oracle_exits", "gate_targets", "gate_loss", "oracle_pos_weights", "classifier_loss", "alternation_turn"]


def oracle_exits(exit_logits: Sequence[torch.Tensor], target: torch.Tensor, costs: Sequence[float],
                 tradeoff: float) -> torch.Tensor:
    """The exit each sample should take: ``argmin_l CE_l + tradeoff * costs_l / costs_last``.

    Args:
        exit_logits: every exit's logits, each ``(samples, classes)``.
        target: class indices ``(samples,)``, or soft targets ``(samples, classes)``.
        costs: the cumulative cost of each exit (any unit; divided by the last).
        tradeoff: lambda, the weight of the normalised cost against the cross-entropy.

    Returns:
        The oracle exit (0-based) of every sample, ``(samples,)`` long.
    """
    if len(costs) != len(exit_logits) or not costs[-1] > 0:
        raise ValueError(f"expected one cumulative cost per exit ({len(exit_logits)}), the last > 0, got {list(costs)}")
    ce = torch.stack([F.cross_entropy(z.float(), target, reduction="none") for z in exit_logits], 1)
    cost = torch.as_tensor(costs, dtype=ce.dtype, device=ce.device) / float(costs[-1])
    return (ce + tradeoff * cost).argmin(1)


def gate_targets(oracle: torch.Tensor, num_gates: int) -> torch.Tensor:
    """Gate l's target: 1 where the oracle exit is <= l.

    Args:
        oracle: the oracle exit of every sample, ``(samples,)``.
        num_gates: the gates (the exits but the last).

    Returns:
        ``(samples, num_gates)`` float, 0 or 1.
    """
    return (oracle.view(-1, 1) <= torch.arange(num_gates, device=oracle.device)).float()


def gate_loss(gate_logits: torch.Tensor, targets: torch.Tensor, pos_weights: torch.Tensor) -> torch.Tensor:
    """The mean over samples and gates of the binary cross-entropy, a positive target's term times
    its gate's positive weight.

    Args:
        gate_logits: ``(samples, gates)``, before the sigmoid.
        targets: :func:`gate_targets`, of the same shape.
        pos_weights: one per gate, ``(gates,)``.

    Returns:
        The scalar loss.
    """
    bce = F.binary_cross_entropy_with_logits(gate_logits, targets.to(gate_logits.dtype), reduction="none")
    multiplier = targets * pos_weights.to(targets).view(1, -1) + (1 - targets)
    return (bce * multiplier.to(bce.dtype)).mean()


def oracle_pos_weights(counts: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """Each gate's positive weight from how often each exit was the oracle exit: ``(n - c_l) / c_l``
    with ``c_l = max(count_l, 0.1)`` and n the samples counted, clipped at ``clip``.

    As in the reference, ``count_l`` counts the samples whose oracle exit *is* l, although gate l's
    positives are those whose oracle exit is l *or earlier*.

    Args:
        counts: how many samples had each exit (0..K-1) as their oracle exit, ``(K,)``.
        clip: the largest weight.

    Returns:
        One weight per gate, ``(K - 1,)`` float64.
    """
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        raise ValueError("no samples counted: the positive weights come from the oracle exits of some samples")
    c = counts[:-1].clamp_min(0.1)
    return ((total - c) / c).clamp_max(clip)


def classifier_loss(exit_logits: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """The classifiers' turn: ``(1 / G) sum_l CE_l`` over the G gated exits (the exits but the last),
    each cross-entropy the mean over samples; the reference's gate-weighted loss in value and gradient.

    Args:
        exit_logits: the logits of the exits but the last, each ``(samples, classes)``.
        target: class indices ``(samples,)``, or soft targets ``(samples, classes)``.

    Returns:
        The scalar loss.
    """
    if not exit_logits:
        raise ValueError("the classifier loss needs the logits of at least one gated exit (a model with >= 2 exits)")
    return sum(exit_cross_entropies(exit_logits, target, [1.0 / len(exit_logits)] * len(exit_logits)))


def alternation_turn(updates: int, every: int) -> str:
    """Which part trains after ``updates`` optimizer updates: turns of ``every`` updates, the gates'
    first (``'gates'`` for updates 0..every-1, then ``'classifiers'``, ...).

    Args:
        updates: the optimizer updates taken so far, >= 0.
        every: the updates of one turn, >= 1 (the reference's 200).

    Returns:
        ``'gates'`` or ``'classifiers'``.
    """
    if every < 1 or updates < 0:
        raise ValueError(f"expected updates >= 0 and a turn of every >= 1 updates, got updates={updates}, every={every}")
    return "gates" if (updates // every) % 2 == 0 else "classifiers"
