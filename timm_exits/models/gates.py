"""Learned exit gates: per exit, a logistic gate over the confidence of that exit's prediction.

JEI-DNN (Regol et al., ICLR 2024) decides at each exit whether a sample leaves with a tiny learned
gate: a linear layer over four features of the exit's softmax probabilities p, none of which carry
a gradient back into the network,

* the largest probability, ``max_c p_c``;
* the entropy, ``-sum_c p_c log p_c`` (natural log);
* the margin, the largest minus the second largest probability;
* the entropy of the squared probabilities renormalised, ``q = p**2 / sum(p**2)``,

and a sigmoid: the gate's probability of exiting. Exits 0..K-2 have a gate; the last exit takes
every sample left. :func:`gate_features` computes the features and :class:`ExitGates` holds the
gates (:class:`~timm_exits.models.jei_gates.JEIGatesModel` keeps them beside the network they were
trained on). The early-exit policy that runs them is ``ExitPolicy("gate", params=...)``
(:mod:`timm_exits.inference.policies`).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

__all__ = ["GATE_FEATURES", "GATE_POWER", "gate_features", "gate_scores", "ExitGates"]

GATE_FEATURES = ("max_prob", "entropy", "margin", "entropy_of_powered")
GATE_POWER = 2  # the power the last feature raises the probabilities to (the reference's)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


def gate_features(probs: torch.Tensor) -> torch.Tensor:
    """The gate's four inputs (:data:`GATE_FEATURES`) of every sample, detached.

    Args:
        probs: one exit's softmax probabilities, ``(samples, classes)``, at least 2 classes.

    Returns:
        ``(samples, 4)``, in the dtype of ``probs``, without gradient.
    """
    if probs.dim() != 2 or probs.shape[-1] < 2:
        raise ValueError(f"gate features need probabilities of shape (samples, classes) with at least 2 classes, "
                         f"got {tuple(probs.shape)}")
    p = probs.detach()
    top2 = p.topk(2, dim=-1).values
    powered = p ** GATE_POWER
    powered = powered / powered.sum(-1, keepdim=True)
    return torch.stack([top2[:, 0], _entropy(p), top2[:, 0] - top2[:, 1], _entropy(powered)], -1)


def gate_scores(probs: torch.Tensor, params: Sequence[float]) -> torch.Tensor:
    """One gate's probability of exiting, from its parameters as numbers (the form an exit policy and a
    thresholds file keep them in), computed in float64.

    Args:
        probs: the exit's probabilities, ``(samples, classes)``.
        params: the gate's 4 weights then its bias (:meth:`ExitGates.params`).

    Returns:
        ``sigmoid(w . features + b)`` per sample, ``(samples,)`` float64.
    """
    if len(params) != len(GATE_FEATURES) + 1:
        raise ValueError(f"a gate has {len(GATE_FEATURES)} weights and a bias, got {len(params)} numbers")
    w = torch.tensor(params, dtype=torch.float64, device=probs.device)
    features = gate_features(probs).double()
    return torch.sigmoid(features @ w[:-1] + w[-1])


class ExitGates(nn.Module):
    """The gates of exits 0..``num_exits``-2: one ``Linear(4, 1)`` each over :func:`gate_features`.

    Args:
        num_exits: the network's exits (the last has no gate).
        device, dtype: where and as what the parameters are created.
    """

    def __init__(self, num_exits: int, device=None, dtype=None):
        super().__init__()
        if num_exits < 2:
            raise ValueError(f"gates decide between exits: the network needs at least 2 exits, got {num_exits}")
        self.linear = nn.ModuleList([nn.Linear(len(GATE_FEATURES), 1, device=device, dtype=dtype)
                                     for _ in range(num_exits - 1)])

    def forward(self, exit_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The gates' logits (before the sigmoid) from the exits' logits.

        Args:
            exit_logits: every exit's logits (the last one's is not read), each ``(samples, classes)``.

        Returns:
            ``(samples, num_exits - 1)``.
        """
        if len(exit_logits) != len(self.linear) + 1:
            raise ValueError(f"{len(self.linear)} gates need the logits of {len(self.linear) + 1} exits, "
                             f"got {len(exit_logits)}")
        return torch.cat([gate(gate_features(z.float().softmax(-1)).to(gate.weight.dtype))
                          for gate, z in zip(self.linear, exit_logits)], -1)

    def params(self) -> List[List[float]]:
        """Every gate's 4 weights then its bias, as numbers (for ``ExitPolicy("gate", params=...)``)."""
        return [gate.weight.detach().flatten().double().tolist() + [float(gate.bias.detach())] for gate in self.linear]
