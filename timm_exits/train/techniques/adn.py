"""ADN (Kang & Lee, NeurIPS 2024): self-distillation of the base-net from the super-net."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from ...models.adaptive_depth import adaptive_depth_of
from ...values import Number
from ..adn import adn_losses
from ..trainer import Trainer
from .base import Options, StepResult, Technique, option, register_technique

__all__ = ["ADN"]


@dataclasses.dataclass(frozen=True)
class ADNOptions(Options):
    """ADN's options.

    Args:
        alpha: the weight of the super-net's CE against the base-net's KD, in [0, 1].
        temperature: the KD's temperature, > 0.
        topk: KD over the teacher's top k classes; None: all.
    """

    alpha: float = option(0.5, Number(float, 0.0, 1.0))
    temperature: float = option(1.0, Number(float, 0.0, low_open=True))
    topk: Optional[int] = option(None, Number(int, 1, optional=True))


@register_technique
class ADN(Technique):
    """ADN self-distillation: the base-net imitates the super-net (NeurIPS 2024).

    A super-net pass on the labels and a base-net pass imitating it
    (:func:`~timm_exits.train.adn.adn_losses`); one backward of their sum gives the gradients of the
    reference's two (the teacher is detached). The base-net skips blocks, so a distributed wrapper
    must look for unused parameters."""

    Options = ADNOptions
    unused_parameters = True

    def check(self, model: nn.Module) -> nn.Module:
        if adaptive_depth_of(model) is None:
            raise ValueError(f"ADN needs an adaptive-depth model (e.g. resnet18_adn), got {type(model).__name__}")
        return model

    def train_step(self, trainer: Trainer, images: torch.Tensor, target: torch.Tensor) -> StepResult:
        passes = []

        def forward(x: torch.Tensor):
            passes.append(trainer.forward(x))
            return passes[-1]

        o = self.options
        terms = adn_losses(trainer.model, images, target, o.alpha, o.temperature, o.topk, forward=forward)
        return StepResult(sum(terms.values()), terms, self.output(passes[0]))  # the super-net's output
