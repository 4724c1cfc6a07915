"""Dynamic Perceiver's training loss (Han et al., ICCV 2023): weighted cross-entropies of its four exits and
self-distillation from the merged exit."""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
from torch import nn

from ...models.dyn_perceiver import DynPerceiver as DynPerceiverModel
from ...values import Number
from ..losses import distillation_kl, exit_cross_entropies
from ..trainer import Outputs, Trainer
from .base import Options, OutputsTechnique, option, register_technique

__all__ = ["DynPerceiver"]

EXITS = ("early", "att", "cnn", "merge")  # the reference's names of the four exits, in exit order


@dataclasses.dataclass(frozen=True)
class DynPerceiverOptions(Options):
    """Dynamic Perceiver's loss weights (the reference README's flags; its code's defaults differ, see
    :class:`DynPerceiver`), and :class:`~timm_exits.train.techniques.Options`'.

    Args:
        cnn_weight: of the CNN exit's cross-entropy (``--loss_cnn_factor``).
        att_weight: of the attention exit's and of the early exit's cross-entropies (``--loss_att_factor``).
        merge_weight: of the merged exit's cross-entropy (``--loss_merge_factor``).
        kd_weight: of the distillation of the merged exit into the other three (``--alpha_kd``); 0: none
            (``--with_kd false``).
        temperature: the distillation's temperature T (``--T_kd``).
        label_smoothing: of hard targets, in [0, 1) (soft ones, from mixup, are used as given).
    """

    cnn_weight: float = option(1.0, Number(float, 0.0))
    att_weight: float = option(0.5, Number(float, 0.0))
    merge_weight: float = option(1.0, Number(float, 0.0))
    kd_weight: float = option(0.5, Number(float, 0.0))
    temperature: float = option(1.0, Number(float, 0.0, low_open=True))
    label_smoothing: float = option(0.0, Number(float, 0.0, 1.0, high_open=True))


@register_technique
class DynPerceiver(OutputsTechnique):
    """Dynamic Perceiver's loss on its four exits (early, attention, CNN, merged)::

        cnn_weight CE_cnn + att_weight (CE_att + CE_early) + merge_weight CE_merge
          + kd_weight sum_{early, att, cnn} T^2 KL(softmax(sg(merge) / T) || softmax(exit / T))

    (KL averaged over the batch; the merged exit is the teacher, detached). The defaults are the
    reference README's training commands (1.0 / 0.5 / 1.0, KD on with weight 0.5 and T = 1); the reference
    code's argument defaults are 0.25 / 0.25 / 0.5 with KD off (T = 4 if switched on). It trains a
    :class:`~timm_exits.models.dyn_perceiver.DynPerceiver` model only: the terms name its exits.
    """

    Options = DynPerceiverOptions

    def check(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, DynPerceiverModel):
            raise ValueError(f"DynPerceiver's loss names the four exits of a Dynamic Perceiver model "
                             f"(timm.create_model('dyn_perceiver_regnety_008', ...)); got {type(model).__name__}: "
                             f"train it with another technique (e.g. CrossEntropy)")
        return model

    def losses(self, outputs: Outputs, target: torch.Tensor, trainer: Optional[Trainer] = None) -> Dict[str, torch.Tensor]:
        o = self.options
        if len(outputs) != len(EXITS):
            raise ValueError(f"DynPerceiver's loss takes the {len(EXITS)} exits {EXITS}, got {len(outputs)} outputs")
        smoothing = 0.0 if target.dim() > 1 else o.label_smoothing  # mixup's targets are smoothed already
        weights = (o.att_weight, o.att_weight, o.cnn_weight, o.merge_weight)
        terms = dict(zip(EXITS, exit_cross_entropies(outputs, target, weights, smoothing)))
        if o.kd_weight > 0:
            terms["kd"] = o.kd_weight * sum(distillation_kl(z, outputs[-1], o.temperature) for z in outputs[:-1])
        return terms
