"""JEI-DNN's gate training (Regol et al., ICLR 2024): oracle exits, cumulative gate targets and the
gates' weighted binary cross-entropy.

For a sample with per-exit cross-entropies ``CE_l`` and cumulative costs ``c_l`` (l = 0..K-1), the
**oracle exit** is ``argmin_l CE_l + lambda * c_l / c_{K-1}`` (the last exit included; the first on
ties). Gate l (l = 0..K-2) should fire from the oracle exit on: its target is 1 when the oracle exit
is <= l (**cumulative one-hot**). The loss is the mean over samples and gates of
``BCE(gate logit, target)``, with a positive target's term multiplied by gate l's **positive weight**
(:func:`oracle_pos_weights`: the reference's ``#0 / #1`` ratio of how often l is the oracle exit,
clipped at 5).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["oracle_exits", "gate_targets", "gate_loss", "oracle_pos_weights"]


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
