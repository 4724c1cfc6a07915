"""HDKD (Wang & Li, AAAI 2021): dense distillation weighted by harmonized weights, learnt on
held-out batches."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, FrozenSet, Optional

import torch
from torch import nn

from ...values import Number, OneOf
from ..hdkd import BalancedValidationLoss, HarmonizedWeights, harmonized_loss, hdkd_weight_step, loss_terms
from ..trainer import HELD_OUT, OPTIMIZER, Batch, Need, Outputs, Trainer
from .base import Options, OutputsTechnique, StepResult, option, register_technique

__all__ = ["HDKD"]


@dataclasses.dataclass(frozen=True)
class HDKDOptions(Options):
    """HDKD's options.

    Args:
        temperature: the KD's temperature, > 0.
        alpha: the weight of the CE terms against the KD terms, in [0, 1].
        lr: the harmonized weights' Adam learning rate, > 0.
        xi: the virtual step size, > 0; None: the network's learning rate.
        init: the harmonized weights' initialisation, ``'uniform'`` or ``'dbt'``
            (:class:`~timm_exits.train.hdkd.HarmonizedWeights`).
        ratio_reg: the ratio term of the balanced validation loss
            (:class:`~timm_exits.train.hdkd.BalancedValidationLoss`).
        interval: the weights are updated on the batch that ends every ``interval``-th optimizer
            update, >= 1.
    """

    temperature: float = option(4.0, Number(float, 0.0, low_open=True))
    alpha: float = option(0.5, Number(float, 0.0, 1.0))
    lr: float = option(3e-4, Number(float, 0.0, low_open=True))
    xi: Optional[float] = option(None, Number(float, 0.0, low_open=True, optional=True))
    init: str = option("uniform", OneOf(("uniform", "dbt")))
    ratio_reg: bool = option(True, OneOf((False, True)))
    interval: int = option(1, Number(int, 1))


@register_technique
class HDKD(OutputsTechnique):
    """Dense distillation weighted by harmonized weights learnt on held-out batches (AAAI 2021).

    Dense distillation (every exit from every later one) weighted by the harmonized weights;
    on the batch that ends an update, every ``interval`` updates, one bilevel step of the weights
    on that batch and a held-out one (never the test set), with autocast off."""

    Options = HDKDOptions

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.weights: Optional[HarmonizedWeights] = None

    @property
    def needs(self) -> FrozenSet[Need]:
        return frozenset({HELD_OUT} | ({OPTIMIZER} if self.options.xi is None else set()))

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        device = next(model.parameters()).device
        self.weights = HarmonizedWeights(model.num_exits, self.options.init).to(device)
        self.optimizer = torch.optim.Adam(self.weights.parameters(), lr=self.options.lr, betas=(0.5, 0.999),
                                          weight_decay=1e-3)
        self.val_loss = BalancedValidationLoss(model.num_exits, ratio_reg=self.options.ratio_reg)
        return model

    def _weights(self) -> HarmonizedWeights:
        if self.weights is None:
            raise RuntimeError("HDKD's weights are built by prepare(model): call it first")
        return self.weights

    def update_weights(self, model: nn.Module, train: Batch, held_out: Batch, lr: Optional[float] = None) -> Dict[str, float]:
        """One update of the harmonized weights on a training and a held-out batch, autocast off.

        Args:
            model: the prepared network.
            train, held_out: ``(images, target)`` batches.
            lr: the network's learning rate now: the virtual step if the option ``xi`` is None.

        Returns:
            What :func:`~timm_exits.train.hdkd.hdkd_weight_step` returns.
        """
        xi = self.options.xi if self.options.xi is not None else lr
        if xi is None:
            raise ValueError("HDKD's virtual step xi is the network's learning rate: give it, or set xi")
        with torch.autocast(train[0].device.type, enabled=False):  # finite differences need full precision
            return hdkd_weight_step(model, self._weights(), self.optimizer, train, held_out, self.val_loss, xi,
                                    self.options.alpha, self.options.temperature)

    def train_step(self, trainer: Trainer, images: torch.Tensor, target: torch.Tensor) -> StepResult:
        if trainer.ends_update and trainer.updates % self.options.interval == 0:
            self.update_weights(trainer.model, (images, target), trainer.held_out_batch(images),
                                None if self.options.xi is not None else trainer.lr)
        return super().train_step(trainer, images, target)

    def losses(self, outputs: Outputs, target: torch.Tensor, trainer: Optional[Trainer] = None) -> Dict[str, torch.Tensor]:
        ce, kd = loss_terms(outputs, target, self.options.temperature)
        weights = tuple(w.detach().to(ce.device) for w in self._weights()())
        return {"hdkd": harmonized_loss(ce, kd, weights, self.options.alpha)}

    def to(self, device: torch.device) -> "HDKD":
        self._weights().to(device)  # in place: the Adam keeps the same parameters
        return self

    def state_dict(self) -> Dict[str, Any]:
        return {"hdkd_weights": self._weights().state_dict(), "hdkd_optimizer": self.optimizer.state_dict(),
                "hdkd_val_loss": self.val_loss.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._weights().load_state_dict(state["hdkd_weights"])
        self.optimizer.load_state_dict(state["hdkd_optimizer"])
        self.val_loss.load_state_dict(state["hdkd_val_loss"])
