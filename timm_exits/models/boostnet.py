"""BoostNet (Yu et al., AAAI 2023): the exits of a multi-exit network trained as a boosted ensemble.

With f_i the logits of exit i (0-based) and r_i the reweight factor (0.5 in every reference script),
the ensemble state is E_{-1} = 0, E_i = r_i (f_i + E_{i-1}); exit i answers with ``f_i + E_{i-1}`` and
trains on ``CE(f_i + sg(E_{i-1}), y)`` (sg: no gradient flows into the earlier exits through E), the
loss being the sum over the exits.

:class:`BoostedExits` makes this a multi-exit model: its state carries E (the exit history,
:mod:`timm_exits.models.history`), so ``forward_exits``, the early-exit executor with batch compaction
and profiling all give the ensembles, and training it with the plain sum of the exits'
cross-entropies is BoostNet's loss (technique ``boostnet``). It is registered with timm as ``boostnet``
(:mod:`timm_exits.models.wrappers`): a model folder of it is rebuilt by ``timm.create_model("local-dir:FOLDER",
pretrained=True)``.

For a constant r the output equals the reference's inference form P_i = f_i + r P_{i-1}. For a
per-exit r the reference indexes it differently at inference (P_i = f_i + r_i P_{i-1}) than in training
(exit i's prior is scaled by r_{i-1}); this module uses the training form at inference too.
"""
from __future__ import annotations

from numbers import Real
from typing import List, Sequence, Tuple, Union

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .history import ExitHistoryModel
from .wrappers import create_wrapper, record_wrapper_args, wrapper_cfg

__all__ = ["BoostedExits"]  # model_registry adds each entrypoint fn to this


class BoostedExits(ExitHistoryModel):
    """A multi-exit ``model`` whose exit i gives the boosted ensemble ``f_i + sg(E_{i-1})``.

    Args:
        model: any multi-exit model (its exits are the weak learners).
        reweight: r, one number or one per exit (r_i scales exit i's ensemble for the exits after it;
            the last exit's is unused).
    """

    def __init__(self, model: nn.Module, reweight: Union[float, Sequence[float]] = 0.5):
        super().__init__(model)
        if isinstance(reweight, Real) and not isinstance(reweight, bool):
            reweight = [float(reweight)] * self.num_exits
        elif not (isinstance(reweight, (list, tuple)) and len(reweight) == self.num_exits
                  and all(isinstance(r, Real) and not isinstance(r, bool) for r in reweight)):
            raise ValueError(f"reweight must be a number or {self.num_exits} numbers (one per exit), got {reweight!r}")
        self.reweight: List[float] = [float(r) for r in reweight]
        record_wrapper_args(self, model, "boostnet", reweight=self.reweight)

    def combine(self, logits: torch.Tensor, history: List[torch.Tensor],
                index: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        output = logits + history[0] if history else logits  # the prior E_{i-1} is detached when stored
        return output, [(self.reweight[index] * output).detach()]


default_cfgs = generate_default_cfgs({
    "boostnet": wrapper_cfg("BoostNet: the exits of a multi-exit network as a boosted ensemble."),
})


@register_model
def boostnet(pretrained: bool = False, **kwargs) -> BoostedExits:
    """BoostNet's boosted exits around a multi-exit network: ``model`` (its timm name), ``model_args``
    (its arguments), ``reweight`` (see :class:`BoostedExits`)."""
    return create_wrapper(BoostedExits, "boostnet", pretrained, **kwargs)
