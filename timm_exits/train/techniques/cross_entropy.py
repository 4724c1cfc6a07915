"""The exits' cross-entropies: :class:`CrossEntropy`, and :class:`PCGrad`, the same losses with
parameter-level gradient deconfliction."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, FrozenSet, List, Optional

import torch
from torch import nn

from ...values import Number, OneOf
from ..deconfliction import pcgrad_gradients
from ..losses import exit_cross_entropies
from ..regimes import REGIMES, apply_regime, regime_exits
from ..schedules import ExitWeights
from ..trainer import EPOCH, OPTIMIZER, Need, Outputs, Trainer
from .base import Options, OutputsTechnique, StepResult, option, register_technique

__all__ = ["CrossEntropy", "PCGrad"]


@dataclasses.dataclass(frozen=True)
class CrossEntropyOptions(Options):
    """The cross-entropies' options (and :class:`~timm_exits.train.techniques.Options`').

    Args:
        exit_weights: None (all 1), one number >= 0 per exit, ``'sdn'`` (SDN's per-epoch warm-up),
            ``'pabee'`` (depth weights) or ``dict(schedule='sdn', caps=[...])``
            (:mod:`~timm_exits.train.schedules`).
        label_smoothing: of hard targets, in [0, 1) (soft ones, from mixup, are used as given).
        regime: ``'joint'``, ``'heads_only'`` (frozen backbone) or ``'backbone'``
            (:mod:`~timm_exits.train.regimes`).
        freeze_bn_stats: with ``'heads_only'``, the frozen backbone stays in eval mode.
    """

    exit_weights: Any = None
    label_smoothing: float = option(0.0, Number(float, 0.0, 1.0, high_open=True))
    regime: str = option("joint", OneOf(REGIMES))
    freeze_bn_stats: bool = option(False, OneOf((False, True)))

    def __post_init__(self):
        super().__post_init__()
        ExitWeights(self.exit_weights)  # checks the schedule
        if self.regime != "joint" and self.switches:
            raise ValueError(f"gradient_equilibrium, deconfliction and feature_surgery act where exits branch off a "
                             f"training backbone: use them with regime='joint', not {self.regime!r}")


@register_technique
class CrossEntropy(OutputsTechnique):
    """The exits' weighted cross-entropies: the MSDNet baseline, SDN's warm-up, training regimes.

    The weighted sum of the exits' cross-entropies (the MSDNet baseline; SDN with
    ``exit_weights='sdn'``), in a training regime. Its loss terms are named after their exit
    (``exit1``, ...); a regime leaves some out."""

    Options = CrossEntropyOptions

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.schedule = ExitWeights(self.options.exit_weights)

    @property
    def needs(self) -> FrozenSet[Need]:
        return frozenset({EPOCH}) if self.schedule.per_epoch else frozenset()

    def prepare(self, model: nn.Module) -> nn.Module:
        return apply_regime(super().prepare(model), self.options.regime, self.options.freeze_bn_stats)

    def weights(self, num_exits: int, trainer: Optional[Trainer] = None) -> List[float]:
        """Every exit's loss weight now.

        Args:
            num_exits: the model's number of exits.
            trainer: for a per-epoch schedule, the trainer whose epoch it reads.

        Returns:
            One weight per exit.
        """
        if self.schedule.per_epoch:
            if trainer is None:
                raise ValueError(f"exit_weights={self.options.exit_weights!r} change with the epoch: give the trainer")
            return self.schedule(num_exits, trainer.epoch, trainer.epochs)
        return self.schedule(num_exits)

    def losses(self, outputs: Outputs, target: torch.Tensor, trainer: Optional[Trainer] = None) -> Dict[str, torch.Tensor]:
        smoothing = 0.0 if target.dim() > 1 else self.options.label_smoothing  # mixup's targets are smoothed already
        weights = self.weights(len(outputs), trainer)
        trained = regime_exits(self.options.regime, len(outputs))
        terms = exit_cross_entropies([outputs[k] for k in trained], target, [weights[k] for k in trained], smoothing)
        return {f"exit{k + 1}": term for k, term in zip(trained, terms)}


@dataclasses.dataclass(frozen=True)
class PCGradOptions(CrossEntropyOptions):
    """The cross-entropies' options, and PCGrad's.

    Args:
        scope: ``'global'``, ``'segment'`` (one segment per optimizer parameter group) or
            ``'tensor'`` (:func:`~timm_exits.train.deconfliction.pcgrad_gradients`).
        order: ``'random'`` (from the technique's own generator) or ``'deep_first'``.
        protect_deeper: a deeper exit's gradient is never projected against a shallower one's.
        seed: the random order's seed, >= 0 (the same on every process).
    """

    scope: str = option("global", OneOf(("global", "segment", "tensor")))
    order: str = option("random", OneOf(("random", "deep_first")))
    protect_deeper: bool = option(False, OneOf((False, True)))
    seed: int = option(0, Number(int, 0))

    def __post_init__(self):
        super().__post_init__()
        if self.deconfliction is not None:
            raise ValueError("PCGrad deconflicts at the parameters: leave deconfliction (the branch-level forms) unset")


@register_technique
class PCGrad(CrossEntropy):
    """The exits' cross-entropies with parameter-level gradient deconfliction (ICIP 2020).

    Parameter-level gradient deconfliction of the exits' cross-entropies (Wang & Li, ICIP 2020):
    one gradient per exit, PCGrad-projected (:func:`~timm_exits.train.deconfliction.pcgrad_gradients`),
    averaged over the processes by the technique (its forward runs outside the distributed
    wrapper's gradient sync). The step's loss has the exits' summed loss as its value and the
    deconflicted gradient as its gradient (``sum <p, g_p>``), so any trainer's backward, loss
    scaling and accumulation apply to it unchanged."""

    Options = PCGradOptions

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.generator = torch.Generator().manual_seed(self.options.seed)

    @property
    def needs(self) -> FrozenSet[Need]:
        return super().needs | ({OPTIMIZER} if self.options.scope == "segment" else frozenset())

    def train_step(self, trainer: Trainer, images: torch.Tensor, target: torch.Tensor) -> StepResult:
        if not torch.is_grad_enabled():  # no gradient to deconflict
            return super().train_step(trainer, images, target)
        with trainer.no_sync():
            outputs = trainer.forward(images)
        terms = self.losses(outputs, target, trainer)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        groups = [g["params"] for g in trainer.optimizer.param_groups] if self.options.scope == "segment" else None
        grads, _ = pcgrad_gradients(list(terms.values()), params, self.options.scope, groups=groups,
                                 order=self.options.order, protect_deeper=self.options.protect_deeper,
                                 generator=self.generator)
        surrogate = sum((p * g).sum() for p, g in zip(params, grads) if g is not None)
        loss = sum(terms.values()).detach() + (surrogate - surrogate.detach())
        return StepResult(loss, terms, self.output(outputs))

    def state_dict(self) -> Dict[str, Any]:
        return {"pcgrad_generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state["pcgrad_generator"])
