"""Model-internal ensembling (MIE; Meronen et al., WACV 2024): exit k answers with the cost-weighted
mean of the probabilities of exits 0..k,

    p_MIE,k = sum_{j<=k} c_j p_j / sum_{j<=k} c_j,

with c_j the cumulative cost of exit j over the last exit's (the deeper exits, which cost more, weigh
more). :class:`MIEModel` carries the running weighted sum in its exit-history state, so the early-exit
executor (with batch compaction), ``forward_exits`` and the cached evaluation all give MIE's answers;
it is the registered predictor ``'mie'``. The weights are its arguments (a model does not profile
itself): :func:`timm_exits.inference.calibrated.mie_model` takes them from
:func:`timm_exits.profile.profile_exits`. Registered with timm as ``mie``
(:mod:`timm_exits.models.wrappers`).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .history import ExitHistoryModel
from .predictors import register_predictor
from .wrappers import create_wrapper, record_wrapper_args, wrapper_cfg

__all__ = ["MIEModel", "mie_weights"]  # + the entrypoint


def mie_weights(costs: Sequence[float], num_exits: int) -> List[float]:
    """MIE's weights c_j: each exit's cumulative cost over the last exit's.

    Args:
        costs: the cumulative cost of every exit (MACs, FLOPs, ...: any unit), positive and
            non-decreasing.
        num_exits: the number of exits.

    Returns:
        ``costs[j] / costs[-1]`` for every exit.

    Raises:
        ValueError: not one positive, finite, non-decreasing cost per exit.
    """
    c = [float(v) for v in costs] if isinstance(costs, (list, tuple)) else None
    if c is None or len(c) != num_exits or not all(math.isfinite(v) and v > 0 for v in c) or \
            any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"expected {num_exits} positive, finite, non-decreasing cumulative costs (one per exit), "
                         f"got {costs!r}")
    return [v / c[-1] for v in c]


@register_predictor
class MIEModel(ExitHistoryModel):
    """MIE online: exit k of ``model`` answers ``log p_MIE,k`` (the cost-weighted running mean of the
    exits' probabilities; ``softmax`` of the output is p_MIE,k).

    The probabilities of an exit are the softmax of what the wrapped model answers there: its logits,
    or a predictor's log-probabilities (MIE around :class:`~timm_exits.models.laplace.LaplaceExits`
    is Laplace + MIE). The running sum ``sum_{j<=k} c_j p_j`` (float64) is the exit-history state.
    An inference wrapper: it adds no parameters; its outputs are log-probabilities, not raw logits.

    Args:
        model: the multi-exit model wrapped.
        costs: the cumulative cost of each exit (see :func:`mie_weights`; only their ratios count).
    """

    predictor = "mie"

    def __init__(self, model: nn.Module, costs: Sequence[float]):
        super().__init__(model)
        self.weights: List[float] = mie_weights(costs, self.num_exits)
        self.totals = [sum(self.weights[:k + 1]) for k in range(self.num_exits)]  # sum_{j<=k} c_j
        record_wrapper_args(self, model, "mie", costs=self.weights)
        self.train(model.training)  # a wrapper of a model in evaluation mode evaluates

    def combine(self, logits: torch.Tensor, history: List[torch.Tensor],
                index: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        weighted = self.weights[index] * logits.double().softmax(-1)
        running = history[0] + weighted if history else weighted
        return (running * (1 / self.totals[index])).log().to(logits.dtype), [running]  # mul: exportable


default_cfgs = generate_default_cfgs({
    "mie": wrapper_cfg("MIE: a multi-exit network's exits as a cost-weighted running ensemble."),
})


@register_model
def mie(pretrained: bool = False, **kwargs) -> MIEModel:
    """MIE around a multi-exit network: ``model`` (its timm name), ``model_args`` (its arguments),
    ``costs`` (see :class:`MIEModel`)."""
    return create_wrapper(MIEModel, "mie", pretrained, **kwargs)
