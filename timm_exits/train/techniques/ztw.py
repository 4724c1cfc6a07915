"""Zero Time Waste (Wolczyk et al., NeurIPS 2021): cascading heads and geometric ensembles."""
from __future__ import annotations

import dataclasses
from typing import List, Optional

from torch import nn

from ...models.ztw import ZTW_PARTS, ZTWModel
from ...values import OneOf
from ..trainer import Trainer
from .base import option, register_technique
from .cross_entropy import CrossEntropy, CrossEntropyOptions

__all__ = ["ZTW"]


@dataclasses.dataclass(frozen=True)
class ZTWOptions(CrossEntropyOptions):
    """The cross-entropies' options (``exit_weights`` and ``regime`` keep their defaults), and ZTW's.

    Args:
        train: the part trained: ``'heads'`` (ZTW's phase A on the frozen backbone), ``'joint'``
            (with the backbone) or ``'ensembles'`` (phase B).
        detach, layer_norm: the cascade's (:class:`~timm_exits.models.ztw.ZTWModel`).
    """

    train: str = option("heads", OneOf(ZTW_PARTS))
    detach: bool = option(True, OneOf((False, True)))
    layer_norm: bool = option(True, OneOf((False, True)))

    def __post_init__(self):
        super().__post_init__()
        if self.exit_weights is not None or self.regime != "joint":
            raise ValueError("ZTW weighs every exit alike and chooses the part it trains with train=: exit_weights "
                             "and regime keep their defaults")
        if self.train != "joint" and self.switches:
            raise ValueError(f"gradient_equilibrium, deconfliction and feature_surgery act where exits branch off a training "
                             f"backbone: use them with train='joint', not {self.train!r}")


@register_technique
class ZTW(CrossEntropy):
    """Zero Time Waste: cascading heads and geometric ensembles (NeurIPS 2021).

    The model wrapped in a :class:`~timm_exits.models.ztw.ZTWModel` and one part of it trained on
    the *mean* over the exits of their cross-entropies, as the reference does."""

    Options = ZTWOptions

    def check(self, model: nn.Module) -> nn.Module:
        if isinstance(model, ZTWModel):
            return model
        return ZTWModel(super().check(model), detach=self.options.detach, layer_norm=self.options.layer_norm)

    def prepare(self, model: nn.Module) -> nn.Module:
        return super().prepare(model).train_part(self.options.train)

    def weights(self, num_exits: int, trainer: Optional[Trainer] = None) -> List[float]:
        return [1.0 / num_exits] * num_exits
