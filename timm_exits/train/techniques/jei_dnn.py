"""JEI-DNN (Regol et al., ICLR 2024): learned exit gates trained on a frozen multi-exit network, alone
or in turns with the exits' classifiers."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ...models.capabilities import is_multi_exit
from ...models.jei_gates import JEIGatesModel
from ...profile import profile_exits
from ...values import Number
from ..jei_dnn import alternation_turn, classifier_loss, gate_loss, gate_targets, oracle_exits, oracle_pos_weights
from ..trainer import Outputs, Trainer
from .base import Options, StepResult, Technique, option, register_technique

__all__ = ["JEIGates"]


@dataclasses.dataclass(frozen=True)
class JEIGatesOptions(Options):
    """The gate training's options (:mod:`timm_exits.train.jei_dnn`).

    Args:
        tradeoff: lambda, the weight of the normalised cost in the oracle exit (the reference's
            ``ce_ic_tradeoff``, 0.7).
        costs: the cumulative cost of each exit; None: the network's MACs
            (:func:`~timm_exits.profile.profile_exits` at its pretrained cfg's input size).
        pos_weights: one positive weight per gate, fixed; None: the reference's rule
            (:func:`~timm_exits.train.jei_dnn.oracle_pos_weights`) on the oracle exits of every
            training sample seen so far.
        max_pos_weight: the clip of that rule (the reference's 5).
        alternate_every: None: only the gates train (the network frozen); N >= 1: the reference's
            schedule: turns of N optimizer updates, the gates' first, alternate with turns in which the
            heads of the exits but the last train on the classifier loss
            (:func:`~timm_exits.train.jei_dnn.classifier_loss`), the rest of the network frozen (the
            reference's ``bilevel_batch_count``, 200).
    """

    tradeoff: float = option(0.7, Number(float, 0.0))
    costs: Optional[List[float]] = option(None, Number(float, 0.0, optional=True, length=0))
    pos_weights: Optional[List[float]] = option(None, Number(float, 0.0, optional=True, length=0))
    max_pos_weight: float = option(5.0, Number(float, 0.0, low_open=True))
    alternate_every: Optional[int] = option(None, Number(int, 1, optional=True))

    def __post_init__(self):
        super().__post_init__()
        if self.switches:
            raise ValueError("gradient_equilibrium and deconfliction act at a training network's branch points; the "
                             "gates train on a frozen one (use them in the classifier phase)")
        if self.costs is not None and (any(b < a for a, b in zip(self.costs, self.costs[1:])) or not self.costs[-1] > 0):
            raise ValueError(f"costs must be cumulative (non-decreasing), the last > 0, got {self.costs}")


@register_technique
class JEIGates(Technique):
    """JEI-DNN's gate phase: learned exit gates on the frozen network.

    The network is wrapped in a :class:`~timm_exits.models.jei_gates.JEIGatesModel` (frozen, in
    eval mode, without gradient) and its gates trained on the oracle exits with the weighted binary
    cross-entropy (:mod:`timm_exits.train.jei_dnn`). The classifier phase is :class:`CrossEntropy`:
    the reference's gate-weighted classifier loss equals the plain sum of the exits' cross-entropies.

    With ``alternate_every=N`` the step alternates, every N optimizer updates, between the gates'
    turn and the classifiers' turn (:func:`~timm_exits.train.jei_dnn.alternation_turn`): the heads of
    the exits but the last train then, as the reference trains its intermediate classifiers on a
    frozen backbone. A turn's loss reaches only its own parameters, so the other's keep no gradient
    and an optimizer leaves them unchanged. The updates counted are the technique's state."""

    Options = JEIGatesOptions

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.counts: Optional[torch.Tensor] = None  # how often each exit was the oracle exit
        self.costs: Optional[List[float]] = None
        self.updates = 0  # optimizer updates taken by this technique (the alternation's clock)

    @property
    def unused_parameters(self) -> bool:  # type: ignore[override]
        """Alternating, each turn leaves the other's parameters out (DDP must look for them)."""
        return self.options.alternate_every is not None

    @property
    def turn(self) -> str:
        """``'gates'`` or ``'classifiers'``: what the next step trains."""
        if self.options.alternate_every is None:
            return "gates"
        return alternation_turn(self.updates, self.options.alternate_every)

    def check(self, model: nn.Module) -> nn.Module:
        if isinstance(model, JEIGatesModel):
            return model
        if not is_multi_exit(model):
            raise ValueError(f"JEIGates trains gates on a trained multi-exit model, got {type(model).__name__}")
        return JEIGatesModel(model)

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        k = model.num_exits
        for name, values in (("costs", self.options.costs), ("pos_weights", self.options.pos_weights)):
            expected = k if name == "costs" else k - 1
            if values is not None and len(values) != expected:
                raise ValueError(f"JEIGates option {name}: {expected} numbers for a model with {k} exits, got {values}")
        self.costs = list(self.options.costs) if self.options.costs is not None else \
            [float(c.macs) for c in profile_exits(model.model)]
        if self.counts is None or len(self.counts) != k:
            self.counts = torch.zeros(k, dtype=torch.float64)
        model.model.requires_grad_(False)
        if self.options.alternate_every is not None:
            for head in _intermediate_heads(model.model):
                head.requires_grad_(True)
        return model

    def training_outputs(self, model: nn.Module, images: torch.Tensor) -> Outputs:
        """The gates' turn: the exits' logits (without gradient) and the gates' logits (see
        :meth:`~timm_exits.models.jei_gates.JEIGatesModel.forward_gates`); the classifiers' turn:
        the exits' logits, with gradient to the heads that train."""
        if self.turn == "classifiers":
            return model.forward_exits(images)
        return model.forward_gates(images)

    def pos_weights(self) -> torch.Tensor:
        """Each gate's positive weight now: the fixed option, or the rule on the counts so far."""
        if self.options.pos_weights is not None:
            return torch.tensor(self.options.pos_weights, dtype=torch.float64)
        return oracle_pos_weights(self.counts, self.options.max_pos_weight)

    def train_step(self, trainer: Trainer, images: torch.Tensor, target: torch.Tensor) -> StepResult:
        """One batch of the current turn. The gates': the oracle exits (counted, with this batch's,
        for the positive weights), the cumulative targets and the gates' weighted binary
        cross-entropy. The classifiers': the classifier loss of the exits but the last. A training
        batch that ends an optimizer update advances the alternation's clock."""
        if self.costs is None:
            raise ValueError("JEIGates has not prepared a model: call technique.prepare(model) before training")
        if self.turn == "classifiers":
            logits = trainer.forward(images)
            loss = classifier_loss(logits[:-1], target)
            result = StepResult(loss, {"classifiers": loss}, logits[-1])
        else:
            logits, gates = trainer.forward(images)
            oracle = oracle_exits(logits, target, self.costs, self.options.tradeoff)
            self.counts += torch.bincount(oracle.cpu(), minlength=len(self.counts)).double()
            loss = gate_loss(gates, gate_targets(oracle, gates.shape[1]), self.pos_weights().to(gates.device))
            result = StepResult(loss, {"gates": loss}, logits[-1])
        if trainer.ends_update and torch.is_grad_enabled() and trainer.model.training:  # not a validation call
            self.updates += 1
        return result

    def state_dict(self) -> Dict[str, Any]:
        state = {"jei_updates": self.updates}
        if self.counts is not None:
            state["jei_oracle_counts"] = self.counts.clone()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "jei_oracle_counts" in state:
            self.counts = state["jei_oracle_counts"].double().clone()
        self.updates = int(state.get("jei_updates", 0))


def _intermediate_heads(network: nn.Module) -> List[nn.Module]:
    """The heads of ``network``'s exits but the last: its ``exits`` (a backbone with exits, whose last
    exit is the backbone's own head) or all of them but the last (MSDNet, RANet)."""
    k = network.num_exits
    exits = getattr(network, "exits", None)
    if not isinstance(exits, nn.ModuleList) or len(exits) not in (k - 1, k):
        raise ValueError(f"JEIGates alternate_every trains the heads of the exits but the last, which "
                         f"{type(network).__name__} does not hold as a ModuleList 'exits' of {k - 1} or {k} "
                         f"modules: train its classifiers in a phase before the gates (alternate_every=None)")
    return list(exits)[:k - 1]
