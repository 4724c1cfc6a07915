"""Deep Feature Surgery's optional distillation (Gong et al., ECCV 2024): every exit but the last
learns from the labels and from the last exit (the teacher, detached) at a temperature T:

    L = CE(z_N, y) + sum_{i<N} [ (1 - gamma) CE(z_i, y) + gamma H(softmax(sg(z_N) / T), softmax(z_i / T)) ]

H(q, p) = -sum_c q_c log p_c is the soft-target cross-entropy, averaged over the batch (KL's gradient,
plus the teacher's entropy in its value). Unlike IMTA's and Phuong & Lampert's distillation, the
reference does not multiply it by T^2, and the last exit's cross-entropy has weight 1.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["dfs_distillation_loss"]


def dfs_distillation_loss(logits: Sequence[torch.Tensor], target: torch.Tensor, temperature: float = 3.0,
                          gamma: float = 0.9) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loss's two parts: ``CE(z_N, y) + (1 - gamma) sum_{i<N} CE(z_i, y)`` and
    ``gamma sum_{i<N} H(softmax(sg(z_N) / T), softmax(z_i / T))``.

    Args:
        logits: the N >= 2 exits' logits, each (B, classes); the last is the teacher.
        target: class indices (B,), or class probabilities (B, classes) as mixup produces.
        temperature: T, > 0 (the reference's 3).
        gamma: the distillation's weight, in [0, 1] (the reference's 0.9).

    Returns:
        The cross-entropy part and the distillation part, scalars; their sum is the loss.
    """
    if len(logits) < 2:
        raise ValueError(f"distillation from the last exit needs at least 2 exits, got {len(logits)}")
    if not temperature > 0 or not 0 <= gamma <= 1:
        raise ValueError(f"expected temperature > 0 and gamma in [0, 1], got temperature={temperature}, gamma={gamma}")
    *students, last = logits
    teacher = F.softmax(last.detach() / temperature, -1)
    ce = F.cross_entropy(last, target) + (1 - gamma) * sum(F.cross_entropy(z, target) for z in students)
    soft = sum(-(teacher * F.log_softmax(z / temperature, -1)).sum(-1).mean() for z in students)
    return ce, gamma * soft
