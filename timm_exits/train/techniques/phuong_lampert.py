"""Phuong & Lampert (ICCV 2019): distillation from the last exit with an adaptive temperature."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch

from ...values import Number, OneOf
from ..phuong_lampert import AdaptiveTemperature, distillation_based_loss
from ..trainer import Outputs, Trainer
from .base import Options, OutputsTechnique, StepResult, option, register_technique

__all__ = ["PhuongLampert"]


@dataclasses.dataclass(frozen=True)
class PhuongLampertOptions(Options):
    """The distillation's options (:func:`~timm_exits.train.phuong_lampert.distillation_based_loss`).

    Args:
        distillation_weight: C, the weight of the distillation terms; the cross-entropies get
            1 - C. In [0, 1].
        gain: g, the factor of the whole loss, > 0; None: ``10 / N`` for N exits (the
            reference's ``2 * 5 / N``).
        temperature: T's start (adaptive) or its value (constant), > 0.
        adaptive: T grows during training (:class:`~timm_exits.train.phuong_lampert.AdaptiveTemperature`);
            False: T stays ``temperature`` (the reference's constant-temperature variant, T = 4).
        max_prob: the teacher's mean max-probability above which T grows, in (0, 1).
        growth: T's factor when it grows, > 1.
    """

    distillation_weight: float = option(0.5, Number(float, 0.0, 1.0))
    gain: Optional[float] = option(None, Number(float, 0.0, low_open=True, optional=True))
    temperature: float = option(1.0, Number(float, 0.0, low_open=True))
    adaptive: bool = option(True, OneOf((False, True)))
    max_prob: float = option(0.5, Number(float, 0.0, 1.0, low_open=True, high_open=True))
    growth: float = option(1.05, Number(float, 1.0, low_open=True))


@register_technique
class PhuongLampert(OutputsTechnique):
    """Distillation from the network's own last exit, at an adaptive temperature (ICCV 2019).

    Every exit but the last learns from the labels and from the last exit (detached) at
    temperature T; the last exit learns from the labels only. T is training state: it grows after
    each optimizer update whose teacher was too confident (the mean over the update's samples, on
    every process, so that gradient accumulation and the number of processes do not change the
    rule), is saved in checkpoints (:meth:`state_dict`) and never shrinks."""

    Options = PhuongLampertOptions

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.options
        self.temperature = AdaptiveTemperature(o.temperature, o.max_prob, o.growth)

    def losses(self, outputs: Outputs, target: torch.Tensor, trainer: Optional[Trainer] = None) -> Dict[str, torch.Tensor]:
        o = self.options
        ce, distillation = distillation_based_loss(outputs, target, self.temperature.value, o.distillation_weight, o.gain)
        return {"ce": ce, "distillation": distillation}

    def train_step(self, trainer: Trainer, images: torch.Tensor, target: torch.Tensor) -> StepResult:
        result = super().train_step(trainer, images, target)  # at the T of this update
        if self.options.adaptive and torch.is_grad_enabled() and trainer.model.training:  # not a validation call
            self.temperature.observe(result.output)  # the last exit's logits: the teacher
            if trainer.ends_update:
                self.temperature.step()
        return result

    def state_dict(self) -> Dict[str, Any]:
        return {"phuong_lampert_temperature": self.temperature.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.temperature.load_state_dict(state["phuong_lampert_temperature"])
