"""L2W-DEN (Han et al., ECCV 2022): learnt sample weights, a meta step through a virtual SGD step
and two optimizer updates per batch (:mod:`timm_exits.train.l2w`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, FrozenSet, Optional

import torch
from torch import nn

from ...values import Number, OneOf
from ..l2w import CONSTRAINTS, INPUT_TYPES, WeightNet, exit_terms, l2w_meta_step, sample_weights, split_halves, weighted_loss
from ...quotas import geometric_fractions
from ..trainer import OPTIMIZER, UPDATES_IN_BATCH, Batch, Need, Outputs, Trainer
from .base import Options, OutputsTechnique, StepResult, option, register_technique

__all__ = ["L2W"]


@dataclasses.dataclass(frozen=True)
class L2WOptions(Options):
    """L2W's options (:mod:`timm_exits.train.l2w`).

    Args:
        epsilon: how far a sample weight may move from 1 (0.8 CIFAR, 0.3 ImageNet).
        constraint_dimension: where the weights are centred: ``'col'`` (CIFAR), ``'mat'``
            (ImageNet) or ``'row'`` (:func:`~timm_exits.train.l2w.sample_weights`).
        input_type: what the weight net reads: ``'loss'``, ``'conf'`` or ``'both'``.
        hidden_size: the weight net's hidden width.
        meta_interval: a meta step on every such update (1 CIFAR, 100 ImageNet).
        lr, weight_decay: the weight net's Adam's.
        lr_follows_schedule: the weight net's lr is scaled as the network's is by its schedule.
        target_p: exit k's share of the meta samples is proportional to ``target_p ** k``.
        label_smoothing: of hard targets, in [0, 1).
        seed: the weight net's initial weights' seed (the same on every process).
    """

    epsilon: float = option(0.8, Number(float, 0.0, low_open=True))
    constraint_dimension: str = option("col", OneOf(CONSTRAINTS))
    input_type: str = option("loss", OneOf(INPUT_TYPES))
    hidden_size: int = option(500, Number(int, 1))
    meta_interval: int = option(1, Number(int, 1))
    lr: float = option(1e-4, Number(float, 0.0, low_open=True))
    weight_decay: float = option(1e-4, Number(float, 0.0))
    lr_follows_schedule: bool = option(True, OneOf((False, True)))
    target_p: float = option(0.75, Number(float, 0.0, low_open=True))
    label_smoothing: float = option(0.0, Number(float, 0.0, 1.0, high_open=True))
    seed: int = option(0, Number(int, 0))

    def __post_init__(self):
        super().__post_init__()
        if self.switches:
            raise ValueError("L2W differentiates through a step of the network (second order): it does not combine "
                             "with gradient_equilibrium, deconfliction or feature_surgery")


@register_technique
class L2W(OutputsTechnique):
    """L2W-DEN: per-sample loss weights from a weight net learnt by a meta step (ECCV 2022).

    Each batch is split in halves; for each, a meta step of the weight net (every
    ``meta_interval``-th update) with the other half as meta data, then the weighted loss: the first
    half's optimizer update is taken inside the batch (through the trainer), the second half's loss
    is the step's. Needs the network's optimizer (SGD: the virtual step follows it) and no gradient
    accumulation."""

    Options = L2WOptions

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.weight_net: Optional[WeightNet] = None
        self.last_meta: Optional[Dict[str, Any]] = None  # the last meta step's pseudo weights, meta loss, gradients

    @property
    def needs(self) -> FrozenSet[Need]:
        return frozenset({OPTIMIZER, UPDATES_IN_BATCH})

    def prepare(self, model: nn.Module) -> nn.Module:
        """Check the model; build the weight net (from ``seed``, on the model's device and dtype) and its Adam."""
        model = super().prepare(model)
        p, o = next(model.parameters()), self.options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(o.seed)
            net = WeightNet(model.num_exits, o.hidden_size, o.input_type)
        self.weight_net = net.to(device=p.device, dtype=p.dtype)
        self.weight_optimizer = torch.optim.Adam(self.weight_net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        self.fractions = geometric_fractions(o.target_p, model.num_exits)
        return model

    def _net(self) -> WeightNet:
        if self.weight_net is None:
            raise RuntimeError("L2W's weight net is built by prepare(model): call it first")
        return self.weight_net

    def weights(self, ce: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """The sample weights of the current weight net, without gradient.

        Args:
            ce, confidence: the per-sample, per-exit losses and confidences, (B, K) each.

        Returns:
            The weights, (B, K), in ``ce``'s dtype.
        """
        net = self._net()
        dtype = next(net.parameters()).dtype
        with torch.no_grad(), torch.autocast(ce.device.type, enabled=False):
            m = net(ce.to(dtype), confidence.to(dtype))
            return sample_weights(m, self.options.epsilon, self.options.constraint_dimension).to(ce.dtype)

    def losses(self, outputs: Outputs, target: torch.Tensor, trainer: Optional[Trainer] = None) -> Dict[str, torch.Tensor]:
        """``l2w``: ``sum_k mean_i(w_ik CE_ik)`` with the current weights.

        Args:
            outputs: every exit's logits.
            target: class indices, or soft targets (mixup).
            trainer: not read.

        Returns:
            ``{'l2w': loss}``.
        """
        ce, confidence = exit_terms(outputs, target, self.options.label_smoothing)
        return {"l2w": weighted_loss(ce, self.weights(ce, confidence))}

    def update_weights(self, model: nn.Module, optimizer: torch.optim.Optimizer, train: Batch, meta: Batch) -> Dict[str, Any]:
        """One meta step (:func:`~timm_exits.train.l2w.l2w_meta_step`) with autocast off; the weight
        net's Adam lr follows the network's schedule (``lr_follows_schedule``: scaled by
        ``lr / initial_lr`` of the optimizer's first param group).

        Args:
            model: the prepared network.
            optimizer: the network's SGD (or a wrapper of it).
            train, meta: ``(images, target)``: the pseudo step's batch and the meta batch.

        Returns:
            What :func:`~timm_exits.train.l2w.l2w_meta_step` returns (also kept as ``last_meta``).
        """
        o, group = self.options, optimizer.param_groups[0]
        scale = group["lr"] / group["initial_lr"] if o.lr_follows_schedule and group.get("initial_lr") else 1.0
        for g in self.weight_optimizer.param_groups:
            g["lr"] = o.lr * scale
        with torch.autocast(train[0].device.type, enabled=False):
            self.last_meta = l2w_meta_step(model, self._net(), self.weight_optimizer, optimizer, train, meta, o.epsilon,
                                           o.constraint_dimension, self.fractions, o.label_smoothing)
        return self.last_meta

    def train_step(self, trainer: Trainer, images: torch.Tensor, target: torch.Tensor) -> StepResult:
        due = trainer.updates % self.options.meta_interval == 0
        first, second = split_halves(images, target)
        terms: Dict[str, torch.Tensor] = {}
        for name, (train, meta) in (("first_half", (first, second)), ("second_half", (second, first))):
            if name == "second_half":
                trainer.update(terms["first_half"])
                terms["first_half"] = terms["first_half"].detach()
            if due:
                self.update_weights(trainer.model, trainer.optimizer, train, meta)
            outputs = trainer.forward(train[0])
            terms[name] = self.losses(outputs, train[1])["l2w"]
        return StepResult(terms["second_half"], terms, self.output(outputs))

    def to(self, device: torch.device) -> "L2W":
        self._net().to(device)
        return self

    def state_dict(self) -> Dict[str, Any]:
        return {"l2w_weight_net": self._net().state_dict(), "l2w_optimizer": self.weight_optimizer.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._net().load_state_dict(state["l2w_weight_net"])
        self.weight_optimizer.load_state_dict(state["l2w_optimizer"])
