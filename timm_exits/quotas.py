"""How many samples leave at each exit under the MSDNet / IMTA budgeted protocol: the geometric exit
distribution P_k ∝ q^k and the quotas floor(n P_k), computed as the reference computes them (in
float32: the quotas depend on the rounding). Budgeted evaluation (:mod:`timm_exits.inference.budgeted`)
and L2W's training targets (:mod:`timm_exits.train.l2w`) share them."""
from __future__ import annotations

import math
from typing import List, Sequence

import torch

__all__ = ["geometric_fractions", "exit_quotas"]


def geometric_fractions(q: float, num_exits: int) -> List[float]:
    """Target fraction of samples per exit, P_k = q^k / sum_j q^j (k = 1..N), computed as the reference
    computes it: exp(k log q), normalised, in float32 (the quotas floor(n P_k) depend on the rounding).

    Args:
        q: the ratio of an exit's fraction to the one before, > 0.
        num_exits: N.

    Returns:
        P_1 .. P_N.
    """
    weights = torch.exp(torch.log(torch.tensor(q, dtype=torch.float32)) *
                        torch.arange(1, num_exits + 1, dtype=torch.float32))
    return (weights / weights.sum()).tolist()


def exit_quotas(n: int, fractions: Sequence[float]) -> List[int]:
    """floor(n P_k) per exit, with the product in float32 as in the reference.

    Args:
        n: the number of samples.
        fractions: P_k per exit (:func:`geometric_fractions`).

    Returns:
        The quotas, one per exit.
    """
    return [math.floor(n * torch.tensor(p, dtype=torch.float32)) for p in fractions]
