"""BoostNet (Yu et al., AAAI 2023): the exits as a boosted ensemble."""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ...models.boostnet import BoostedExits
from ...values import Number
from .base import option, register_technique
from .cross_entropy import CrossEntropy, CrossEntropyOptions

__all__ = ["BoostNet"]


@dataclasses.dataclass(frozen=True)
class BoostNetOptions(CrossEntropyOptions):
    """The cross-entropies' options and ``reweight`` (r: a number, or one per exit; 0.5 in the reference)."""

    reweight: Any = option(0.5, Number(float, 0.0, or_list=True))

    def __post_init__(self):
        super().__post_init__()
        if self.exit_weights is not None or self.regime != "joint":
            raise ValueError("BoostNet trains every exit on its boosted logits: exit_weights and regime keep their "
                             "defaults")


@register_technique
class BoostNet(CrossEntropy):
    """The exits as a boosted ensemble (Yu et al., AAAI 2023).

    The model wrapped in :class:`~timm_exits.models.boostnet.BoostedExits` and trained with the sum
    of its exits' cross-entropies, ``sum_i CE(f_i + sg(E_{i-1}), y)``. Gradient Equilibrium acts on
    the wrapped network (the reference trains an MSDNet with it)."""

    Options = BoostNetOptions

    def check(self, model: nn.Module) -> nn.Module:
        if isinstance(model, BoostedExits):
            return model
        return BoostedExits(super().check(model), self.options.reweight)
