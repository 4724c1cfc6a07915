"""IMTA phase II: new ISC heads on the frozen phase-I network, One-for-all distillation."""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
from torch import nn

from ...models.capabilities import is_multi_exit
from ...models.imta import IMTAModel
from ...values import Number, OneOf
from ..losses import one_for_all_distillation
from ..trainer import Outputs, Trainer
from .base import Options, OutputsTechnique, option, register_technique

__all__ = ["OneForAll"]


@dataclasses.dataclass(frozen=True)
class OneForAllOptions(Options):
    """One-for-all's options (:func:`~timm_exits.train.losses.one_for_all_distillation`).

    Args:
        temperature, gamma: the distillation's (the reference code's defaults; its ImageNet
            script: 1.0 and 0.1).
        reduction: the KL's, ``'batchmean'`` or ``'mean'`` (the reference code's scaling).
        isc: the ISC form, ``'reference'``, ``'detach'`` or None.
        freeze_bn_stats: the frozen network in eval mode; False: its statistics move, as in the
            reference.
    """

    temperature: float = option(3.0, Number(float, 0.0, low_open=True))
    gamma: float = option(0.9, Number(float, 0.0, 1.0))
    reduction: str = option("batchmean", OneOf(("batchmean", "mean")))
    isc: Optional[str] = option("reference", OneOf(("reference", "detach", None)))
    freeze_bn_stats: bool = option(False, OneOf((False, True)))

    def __post_init__(self):
        super().__post_init__()
        if self.switches:
            raise ValueError("gradient_equilibrium, deconfliction and feature_surgery act at a training network's branch points; "
                             "phase II trains new heads on a frozen one (use them in phase I)")


@register_technique
class OneForAll(OutputsTechnique):
    """IMTA phase II: ISC heads on the frozen phase-I network, One-for-all distillation.

    IMTA phase II: the phase-I network frozen in an :class:`~timm_exits.models.imta.IMTAModel` with
    new ISC heads, trained with One-for-all distillation from its final head. The model it starts
    from must hold the trained phase-I weights (a run's ``previous`` phase)."""

    Options = OneForAllOptions

    def check(self, model: nn.Module) -> nn.Module:
        if isinstance(model, IMTAModel):
            return model
        if not is_multi_exit(model):
            raise ValueError(f"OneForAll needs a trained phase-I multi-exit model, got {type(model).__name__}")
        return IMTAModel(model, isc=self.options.isc, freeze_bn_stats=self.options.freeze_bn_stats)

    def create_model(self, name: str, model_kwargs: Optional[dict] = None, previous: Optional[str] = None) -> nn.Module:
        if previous is None:
            raise ValueError("OneForAll (IMTA phase II) starts from the phase-I weights: give the phase before it "
                             "(a phase-I phase, or a weights file)")
        return super().create_model(name, model_kwargs, previous)

    def training_outputs(self, model: nn.Module, images: torch.Tensor) -> Outputs:
        """The loss inputs of one forward.

        Args:
            model: the prepared :class:`~timm_exits.models.imta.IMTAModel`.
            images: the batch's images.

        Returns:
            The new heads' logits and the frozen network's final (teacher) logits.
        """
        return model.forward_train(images)

    def losses(self, outputs: Outputs, target: torch.Tensor, trainer: Optional[Trainer] = None) -> Dict[str, torch.Tensor]:
        logits, teacher = outputs
        o = self.options
        return {"ofa": one_for_all_distillation(logits, teacher, target, o.temperature, o.gamma, o.reduction)}

    def output(self, outputs: Outputs) -> torch.Tensor:
        return outputs[0][-1]
