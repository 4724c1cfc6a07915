"""Losses of multi-exit training, as plain functions of the exits' logits.

* :func:`multi_exit_cross_entropy`: weighted sum of per-exit cross-entropies (the MSDNet baseline),
  with hard labels or soft targets (label smoothing, mixup / cutmix).
* :func:`one_for_all_distillation`: IMTA's phase-II loss, every exit but the last distilled from the
  frozen phase-I final head.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["exit_cross_entropies", "multi_exit_cross_entropy", "distillation_kl", "one_for_all_distillation"]


def exit_cross_entropies(
        logits: Sequence[torch.Tensor],
        target: torch.Tensor,
        weights: Optional[Sequence[float]] = None,
        label_smoothing: float = 0.0,
) -> List[torch.Tensor]:
    """[w_k CE(logits_k, target)] per exit.

    Args:
        logits: every exit's logits, each (B, C).
        target: class indices (B,), or class probabilities (B, C) as mixup / cutmix produce.
        weights: one weight per exit (default: 1 each).
        label_smoothing: ``F.cross_entropy``'s.

    Returns:
        The weighted cross-entropies, one scalar per exit.
    """
    weights = [1.0] * len(logits) if weights is None else list(weights)
    if len(weights) != len(logits):
        raise ValueError(f"{len(weights)} exit weights for {len(logits)} exits")
    return [w * F.cross_entropy(z, target, label_smoothing=label_smoothing) for w, z in zip(weights, logits)]


def multi_exit_cross_entropy(
        logits: Sequence[torch.Tensor],
        target: torch.Tensor,
        weights: Optional[Sequence[float]] = None,
        label_smoothing: float = 0.0,
) -> torch.Tensor:
    """sum_k w_k CE(logits_k, target): the MSDNet baseline loss.

    Args:
        logits, target, weights, label_smoothing: as in :func:`exit_cross_entropies`.

    Returns:
        The loss, a scalar.
    """
    return sum(exit_cross_entropies(logits, target, weights, label_smoothing))


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                    reduction: str = "batchmean") -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)); the teacher is detached.

    Args:
        student, teacher: logits, (B, C) each.
        temperature: T.
        reduction: ``'batchmean'``, the per-sample KL averaged over the batch, or ``'mean'``,
            divided by batch x classes as ``nn.KLDivLoss()``'s default does in the IMTA reference
            (1/C of the former).

    Returns:
        The loss, a scalar.
    """
    if reduction not in ("batchmean", "mean"):
        raise ValueError(f"reduction must be 'batchmean' or 'mean', got {reduction!r}")
    log_p = F.log_softmax(student / temperature, -1)
    q = F.softmax(teacher.detach() / temperature, -1)
    return temperature ** 2 * F.kl_div(log_p, q, reduction=reduction)


def one_for_all_distillation(
        logits: List[torch.Tensor],
        teacher: torch.Tensor,
        target: torch.Tensor,
        temperature: float = 3.0,
        gamma: float = 0.9,
        reduction: str = "batchmean",
) -> torch.Tensor:
    """IMTA's One-for-all KD: CE(z_N, y) + sum_{i<N} [(1 - gamma) CE(z_i, y) + gamma T^2 KL(t || z_i)].

    Defaults are the reference code's (T = 3, gamma = 0.9); its ImageNet script uses T = 1,
    gamma = 0.1.

    Args:
        logits: the N exits' logits, each (B, C).
        teacher: the frozen phase-I final head's logits, (B, C).
        target: class indices, (B,).
        temperature: T.
        gamma: the weight of the distillation against the labels, in [0, 1].
        reduction: as in :func:`distillation_kl`; ``'mean'`` reproduces the reference's KL scaling
            (divided by the number of classes too).

    Returns:
        The loss, a scalar.
    """
    loss = F.cross_entropy(logits[-1], target)
    for z in logits[:-1]:
        loss = loss + (1 - gamma) * F.cross_entropy(z, target) + gamma * distillation_kl(z, teacher, temperature, reduction)
    return loss
