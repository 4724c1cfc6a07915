"""The training techniques as objects, shared by every trainer (the accelerate engine, the mmengine
adapters, the timm training task and the cost benchmark).

A technique owns its options and their defaults, checks and prepares the model it trains
(:meth:`Technique.prepare`), computes the named loss terms of a batch (:meth:`Technique.losses`,
:meth:`Technique.batch_losses`), back-propagates them (:meth:`Technique.step`; PCGrad and ADN need
more than one backward) and holds any state of its own (:meth:`Technique.state_dict`):

* :class:`CrossEntropy` (``ce``): the exits' cross-entropies, weighted by a fixed or per-epoch
  schedule (:mod:`.schedules`: SDN's warm-up, PABEE's depth weights), in a training regime
  (:mod:`.regimes`: ``joint``, ``heads_only``, ``backbone``);
* :class:`PCGrad` (``ce`` with ``deconfliction='pcgrad'``): the same losses, deconflicted at the
  parameters by its own backward (:meth:`PCGrad.backward`);
* :class:`OneForAll` (``ofa``): IMTA phase II, ISC heads on the frozen phase-I network;
* :class:`HDKD` (``hdkd``): dense distillation with harmonized weights, their Adam and the
  balanced validation loss, updated on a held-out batch (:meth:`HDKD.update_weights`);
* :class:`ADN` (``adn``): self-distillation of the base-net from the super-net, two passes;
* :class:`BoostNet` (``boostnet``): the exits as a boosted ensemble (:class:`~timm_exits.train.boostnet.BoostedExits`),
  each exit's cross-entropy on its own logits plus the detached ensemble of the exits before;
* :class:`ZTW` (``ztw``): Zero Time Waste's cascading heads and geometric ensembles
  (:class:`~timm_exits.train.ztw.ZTWModel`), one part trained per phase.
* :class:`~timm_exits.train.l2w.L2W` (``l2w``): L2W-DEN's learnt sample weights, a meta step
  through a virtual SGD step and two optimizer steps per batch (:mod:`.l2w`).

A trainer tells the technique the epoch at its start (:meth:`Technique.set_epoch`); the per-epoch
loss weights are computed from it in one place (:class:`~timm_exits.train.schedules.ExitWeights`).

Gradient Equilibrium and branch-level deconfliction are switches every technique sets on a model
whose branch points train (:func:`apply_switches`).

:func:`create_technique` builds one from the config's ``technique`` section
(:data:`timm_exits.config.DEFAULTS`).
"""
from __future__ import annotations

import abc

from typing import Any, Callable, ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import timm
import torch
from torch import nn

from ..models.adaptive_depth import adaptive_depth_of
from ..models.boostnet import BoostedExits
from ..models.capabilities import is_multi_exit
from ..models.imta import IMTAModel
from ..models.multi_exit import exit_logits
from ..models.ztw import ZTW_PARTS, ZTWModel
from .adn import adn_losses
from .deconfliction import pcgrad_backward
from .hdkd import BalancedValidationLoss, HarmonizedWeights, harmonized_loss, hdkd_weight_step, loss_terms
from .losses import exit_cross_entropies, one_for_all_distillation
from .regimes import apply_regime, check_regime, regime_exits
from .schedules import ExitWeights

__all__ = ["LOSSES", "DECONFLICTION", "Technique", "CrossEntropy", "PCGrad", "OneForAll", "HDKD", "ADN", "BoostNet",
           "ZTW", "create_technique", "create_training_model", "apply_switches", "TrainingForward"]

LOSSES = ("ce", "ofa", "hdkd", "adn", "boostnet", "ztw", "l2w")
DECONFLICTION = (None, "symmetric", "protect_deeper", "pcgrad")

Outputs = Union[List[torch.Tensor], Tuple[List[torch.Tensor], torch.Tensor]]
Backward = Callable[[torch.Tensor], None]


def apply_switches(model: nn.Module, gradient_equilibrium: bool = False, deconfliction: Optional[str] = None) -> None:
    """Switch Gradient Equilibrium and branch-level deconfliction (``'symmetric'``,
    ``'protect_deeper'``) on in the forward graph of the model a technique trains; ``'pcgrad'`` acts on
    the gradients instead and changes nothing here. Both switches need trainable branch points: a
    multi-exit network, not IMTA's phase-II heads on a frozen one nor a plain ADN network."""
    if deconfliction not in DECONFLICTION:
        raise ValueError(f"deconfliction must be one of {DECONFLICTION}, got {deconfliction!r}")
    branch = deconfliction in ("symmetric", "protect_deeper")
    if (gradient_equilibrium or branch) and (isinstance(model, IMTAModel) or not is_multi_exit(model)):
        raise ValueError(f"Gradient Equilibrium and branch-level deconfliction act at the branch points of a "
                         f"multi-exit network; {type(model).__name__} has none that train")
    if gradient_equilibrium:
        model.gradient_equilibrium = True
    if branch:
        model.gradient_deconfliction = deconfliction


class TrainingForward(nn.Module):
    """Wraps a training model so that ``forward`` returns the loss inputs: IMTA phase II gives
    ``(new heads' logits, teacher logits)``, other models every exit's logits (a plain ADN
    network: its one output, as a list). A distributed wrapper (DDP, FSDP) wraps this module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Outputs:
        if isinstance(self.model, IMTAModel):
            return self.model.forward_train(images)
        return exit_logits(self.model, images)


class Technique(abc.ABC):
    """What a training step optimises. Subclasses set ``loss`` (the config's name) and override
    :meth:`check` and :meth:`batch_losses` (:class:`OutputsLoss`: :meth:`~OutputsLoss.losses` of one pass).

    Gradient Equilibrium and branch-level deconfliction (``'symmetric'``, ``'protect_deeper'``) are
    switches of the model's forward graph that :meth:`prepare` sets on any multi-exit network whose
    branch points train (see :func:`apply_switches`).
    """

    loss: ClassVar[str] = ""

    def __init__(self, gradient_equilibrium: bool = False, deconfliction: Optional[str] = None):
        if deconfliction not in DECONFLICTION:
            raise ValueError(f"deconfliction must be one of {DECONFLICTION}, got {deconfliction!r}")
        self.gradient_equilibrium, self.deconfliction = gradient_equilibrium, deconfliction
        self.epoch: Optional[int] = None
        self.epochs: Optional[int] = None

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """The 0-based epoch about to start, of ``epochs``: trainers call this at each epoch's start
        (techniques whose loss changes with the epoch read it)."""
        self.epoch, self.epochs = epoch, epochs

    def check(self, model: nn.Module) -> nn.Module:
        """The model to train: ``model`` checked (and wrapped, for IMTA phase II); idempotent."""
        if not is_multi_exit(model):
            raise ValueError(f"loss={self.loss!r} needs a multi-exit model (see timm_exits.add_exits), "
                             f"got {type(model).__name__}")
        return model

    def prepare(self, model: nn.Module) -> nn.Module:
        """Check the model, set the switches, build the technique's own state on the model's device;
        returns the model to train."""
        model = self.check(model)
        apply_switches(model, self.gradient_equilibrium, self.deconfliction)
        return model

    @abc.abstractmethod
    def batch_losses(self, model: nn.Module, forward: Callable[[torch.Tensor], Outputs], images: torch.Tensor,
                     target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The loss terms of a batch, running ``forward`` (e.g. a DDP-wrapped :class:`TrainingForward`
        of ``model``) as often as the technique needs."""

    def step(self, model: nn.Module, forward: Callable[[torch.Tensor], Outputs], images: torch.Tensor,
             target: torch.Tensor, backward: Backward = torch.Tensor.backward) -> Dict[str, torch.Tensor]:
        """Forward and backward of one batch (the optimizer step is the trainer's); ``backward`` may
        be ``accelerator.backward``. Returns the loss terms."""
        terms = self.batch_losses(model, forward, images, target)
        backward(sum(terms.values()))
        return terms

    def output(self, outputs: Outputs) -> torch.Tensor:
        """The last exit's logits (for an accuracy metric)."""
        return outputs[-1]

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps of the technique beyond the model (nothing by default)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class OutputsLoss(Technique):
    """A technique whose loss terms are a function of one training forward's outputs."""

    @abc.abstractmethod
    def losses(self, outputs: Outputs, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Named loss terms of one batch from the training forward's outputs; their sum is the loss."""

    def batch_losses(self, model: nn.Module, forward: Callable[[torch.Tensor], Outputs], images: torch.Tensor,
                     target: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.losses(forward(images), target)


class CrossEntropy(OutputsLoss):
    """``ce``: the weighted sum of the exits' cross-entropies (the MSDNet baseline), with hard labels
    (``label_smoothing``) or soft targets (mixup / cutmix, used as given).

    ``exit_weights``: ``None`` (all 1), one number per exit, ``'sdn'`` (SDN's per-epoch warm-up),
    ``'pabee'`` (depth weights) or ``dict(schedule='sdn', caps=[...])``; see :mod:`.schedules`.
    ``regime``: ``joint``, ``heads_only`` (frozen backbone, the exit heads' losses only; ``freeze_bn_stats``
    keeps the backbone in eval mode) or ``backbone`` (the backbone's own head's loss only); see :mod:`.regimes`.
    The loss terms are named after their exit (``exit1``, ...): a regime leaves some out.
    """

    loss = "ce"

    def __init__(self, exit_weights: Any = None, label_smoothing: float = 0.0,
                 gradient_equilibrium: bool = False, deconfliction: Optional[str] = None, regime: str = "joint",
                 freeze_bn_stats: bool = False):
        super().__init__(gradient_equilibrium, deconfliction)
        check_regime(regime)
        if regime != "joint" and (gradient_equilibrium or deconfliction in ("symmetric", "protect_deeper")):
            raise ValueError(f"Gradient Equilibrium and branch-level deconfliction act where exits branch off a "
                             f"training backbone: use them with regime='joint', not {regime!r}")
        self.schedule = ExitWeights(exit_weights)
        self.exit_weights, self.label_smoothing = exit_weights, label_smoothing
        self.regime, self.freeze_bn_stats = regime, freeze_bn_stats

    def prepare(self, model: nn.Module) -> nn.Module:
        return apply_regime(super().prepare(model), self.regime, self.freeze_bn_stats)

    def weights(self, num_exits: int) -> List[float]:
        """Every exit's loss weight now (at the epoch the trainer last set)."""
        return self.schedule(num_exits, self.epoch, self.epochs)

    def losses(self, outputs: Outputs, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        smoothing = 0.0 if target.dim() > 1 else self.label_smoothing  # mixup's targets are smoothed already
        weights = self.weights(len(outputs))
        trained = regime_exits(self.regime, len(outputs))
        terms = exit_cross_entropies([outputs[k] for k in trained], target, [weights[k] for k in trained], smoothing)
        return {f"exit{k + 1}": term for k, term in zip(trained, terms)}


class PCGrad(CrossEntropy):
    """Parameter-level gradient deconfliction of the exits' cross-entropies: one backward per exit,
    PCGrad-projected (:func:`~timm_exits.train.pcgrad_backward`; ``scope``, ``order``,
    ``protect_deeper``, ``groups`` for ``scope='segment'``). Its random order comes from its own
    generator (``seed``, the same on every process), which its state keeps."""

    def __init__(self, exit_weights: Any = None, label_smoothing: float = 0.0,
                 gradient_equilibrium: bool = False, scope: str = "global", order: str = "random",
                 protect_deeper: bool = False, groups: Optional[Sequence[Sequence[nn.Parameter]]] = None,
                 seed: int = 0, regime: str = "joint", freeze_bn_stats: bool = False):
        super().__init__(exit_weights, label_smoothing, gradient_equilibrium, "pcgrad", regime, freeze_bn_stats)
        if scope not in ("global", "segment", "tensor"):
            raise ValueError(f"pcgrad scope must be 'global', 'segment' or 'tensor', got {scope!r}")
        if order not in ("random", "deep_first"):
            raise ValueError(f"pcgrad order must be 'random' or 'deep_first', got {order!r}")
        self.scope, self.order, self.protect_deeper, self.groups = scope, order, protect_deeper, groups
        self.generator = torch.Generator().manual_seed(seed)

    def backward(self, terms: Dict[str, torch.Tensor], params: Iterable[nn.Parameter],
                 groups: Optional[Sequence[Sequence[nn.Parameter]]] = None, scale: float = 1.0) -> Dict[str, int]:
        """Accumulate the deconflicted gradient of ``terms`` (each scaled by ``scale``, e.g. 1 /
        accumulated batches) into ``params``' ``.grad``; ``groups`` (default: the technique's) are the
        segments. The per-exit gradients are averaged over the processes: run the forward outside
        DDP's gradient sync."""
        return pcgrad_backward([t * scale for t in terms.values()], list(params), self.scope,
                               groups=groups if groups is not None else self.groups, order=self.order,
                               protect_deeper=self.protect_deeper, generator=self.generator)

    def step(self, model: nn.Module, forward: Callable[[torch.Tensor], Outputs], images: torch.Tensor,
             target: torch.Tensor, backward: Backward = torch.Tensor.backward) -> Dict[str, torch.Tensor]:
        terms = self.batch_losses(model, forward, images, target)
        self.backward(terms, model.parameters())
        return terms

    def state_dict(self) -> Dict[str, Any]:
        return {"pcgrad_generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state["pcgrad_generator"])


class OneForAll(OutputsLoss):
    """``ofa``, IMTA phase II: the phase-I network frozen in an :class:`IMTAModel` with new ISC heads
    (``isc``, ``freeze_bn_stats``), trained with One-for-all distillation from its final head
    (``temperature``, ``gamma``, ``reduction``; the reference code's defaults)."""

    loss = "ofa"

    def __init__(self, temperature: float = 3.0, gamma: float = 0.9, reduction: str = "batchmean",
                 isc: Optional[str] = "reference", freeze_bn_stats: bool = False, **switches):
        super().__init__(**switches)
        if reduction not in ("batchmean", "mean"):
            raise ValueError(f"reduction must be 'batchmean' or 'mean', got {reduction!r}")
        self.temperature, self.gamma, self.reduction = temperature, gamma, reduction
        self.isc, self.freeze_bn_stats = isc, freeze_bn_stats

    def check(self, model: nn.Module) -> nn.Module:
        """The phase-II model around ``model`` (which must hold the trained phase-I weights)."""
        if isinstance(model, IMTAModel):
            return model
        if not is_multi_exit(model):
            raise ValueError(f"loss='ofa' needs a trained phase-I multi-exit model, got {type(model).__name__}")
        return IMTAModel(model, isc=self.isc, freeze_bn_stats=self.freeze_bn_stats)

    def losses(self, outputs: Outputs, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits, teacher = outputs
        return {"ofa": one_for_all_distillation(logits, teacher, target, self.temperature, self.gamma, self.reduction)}

    def output(self, outputs: Outputs) -> torch.Tensor:
        return outputs[0][-1]


class HDKD(OutputsLoss):
    """``hdkd``: dense distillation (every exit from every later one) weighted by the harmonized
    weights (``alpha``, ``temperature``). The weights (``init``), their Adam (``lr``) and the balanced
    validation loss (``ratio_reg``) are built by :meth:`prepare`; :meth:`update_weights` takes one
    bilevel step on a held-out batch (trainers call it when :meth:`due`, every ``interval`` steps),
    with the virtual step ``xi`` (``None``: the network's learning rate)."""

    loss = "hdkd"

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5, lr: float = 3e-4, xi: Optional[float] = None,
                 init: str = "uniform", ratio_reg: bool = True, interval: int = 1, **switches):
        super().__init__(**switches)
        if init not in ("uniform", "dbt"):
            raise ValueError(f"hdkd init must be 'uniform' or 'dbt', got {init!r}")
        if interval < 1:
            raise ValueError(f"hdkd interval must be >= 1, got {interval}")
        self.temperature, self.alpha, self.lr, self.xi = temperature, alpha, lr, xi
        self.init, self.ratio_reg, self.interval = init, ratio_reg, interval
        self.weights: Optional[HarmonizedWeights] = None

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        device = next(model.parameters()).device
        self.weights = HarmonizedWeights(model.num_exits, self.init).to(device)
        self.optimizer = torch.optim.Adam(self.weights.parameters(), lr=self.lr, betas=(0.5, 0.999), weight_decay=1e-3)
        self.val_loss = BalancedValidationLoss(model.num_exits, ratio_reg=self.ratio_reg)
        return model

    def _check_prepared(self) -> None:
        if self.weights is None:
            raise RuntimeError("HDKD's weights are built by prepare(model): call it first")

    def due(self, step: int) -> bool:
        """Whether the weights are updated at this step (a count of steps or calls)."""
        return step % self.interval == 0

    def update_weights(self, model: nn.Module, train_batch: Tuple[torch.Tensor, torch.Tensor],
                       val_batch: Tuple[torch.Tensor, torch.Tensor], lr: Optional[float] = None) -> Dict[str, float]:
        """One update of the harmonized weights on a training batch and a held-out batch (never the
        test set); ``lr``, the network's current learning rate, is ``xi`` unless that is set.
        Autocast is off: the finite differences need full precision."""
        self._check_prepared()
        xi = self.xi if self.xi is not None else lr
        if xi is None:
            raise RuntimeError("HDKD's virtual step xi is the network's learning rate: give it, or set xi")
        images = train_batch[0]
        with torch.autocast(images.device.type, enabled=False):
            return hdkd_weight_step(model, self.weights, self.optimizer, train_batch, val_batch, self.val_loss, xi,
                                    self.alpha, self.temperature)

    def losses(self, outputs: Outputs, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        self._check_prepared()
        ce, kd = loss_terms(outputs, target, self.temperature)
        weights = tuple(w.detach().to(ce.device) for w in self.weights())
        return {"hdkd": harmonized_loss(ce, kd, weights, self.alpha)}

    def state_dict(self) -> Dict[str, Any]:
        self._check_prepared()
        return {"hdkd_weights": self.weights.state_dict(), "hdkd_optimizer": self.optimizer.state_dict(),
                "hdkd_val_loss": self.val_loss.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._check_prepared()
        self.weights.load_state_dict(state["hdkd_weights"])
        self.optimizer.load_state_dict(state["hdkd_optimizer"])
        self.val_loss.load_state_dict(state["hdkd_val_loss"])


class ADN(Technique):
    """``adn``: ADN self-distillation (``alpha``, ``temperature``, ``topk``): a super-net pass on the
    labels and a base-net pass imitating it (:func:`~timm_exits.train.adn_losses`)."""

    loss = "adn"

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0, topk: Optional[int] = None, **switches):
        super().__init__(**switches)
        self.alpha, self.temperature, self.topk = alpha, temperature, topk

    def check(self, model: nn.Module) -> nn.Module:
        if adaptive_depth_of(model) is None:
            raise ValueError(f"loss='adn' needs an adaptive-depth model (e.g. resnet18_adn), "
                             f"got {type(model).__name__}")
        return model

    def batch_losses(self, model: nn.Module, forward: Callable[[torch.Tensor], Outputs], images: torch.Tensor,
                     target: torch.Tensor, backward: Optional[Backward] = None) -> Dict[str, torch.Tensor]:
        """``super`` and ``base``; one backward of their sum gives the gradients of the reference's
        two (the teacher is detached). With ``backward``, the super-net loss is back-propagated
        before the base-net pass, which frees the first graph early."""
        return adn_losses(model, images, target, self.alpha, self.temperature, self.topk, backward=backward,
                          forward=forward)

    def step(self, model: nn.Module, forward: Callable[[torch.Tensor], Outputs], images: torch.Tensor,
             target: torch.Tensor, backward: Backward = torch.Tensor.backward) -> Dict[str, torch.Tensor]:
        terms = self.batch_losses(model, forward, images, target, backward)
        backward(terms["base"])
        return {name: loss.detach() for name, loss in terms.items()}


class BoostNet(CrossEntropy):
    """``boostnet`` (Yu et al., AAAI 2023): the model wrapped in :class:`~timm_exits.train.boostnet.BoostedExits`
    (``reweight``: r, 0.5 in the reference) and trained with the sum of its exits' cross-entropies, which
    is ``sum_i CE(f_i + sg(E_{i-1}), y)``. Gradient Equilibrium acts on the wrapped network (the reference
    trains an MSDNet with it)."""

    loss = "boostnet"

    def __init__(self, reweight: Any = 0.5, label_smoothing: float = 0.0, **switches):
        super().__init__(None, label_smoothing, **switches)
        self.reweight = reweight

    def check(self, model: nn.Module) -> nn.Module:
        if isinstance(model, BoostedExits):
            return model
        return BoostedExits(super().check(model), self.reweight)


class ZTW(CrossEntropy):
    """``ztw`` (Zero Time Waste, Wolczyk et al., NeurIPS 2021): the model wrapped in a
    :class:`~timm_exits.train.ztw.ZTWModel` (``detach``, ``layer_norm``: its cascade) and one part of it
    trained (``train``) on the *mean* over the exits of their cross-entropies, as the reference:

    * ``heads``: the exit heads and their cascade on the frozen backbone (eval mode, no gradient; a
      backbone with exits), outputs the cascade's logits (ZTW's phase A);
    * ``joint``: the same with the backbone training too (the reference's ``with_backbone``; any
      multi-exit model, e.g. MSDNet);
    * ``ensembles``: the geometric ensembles alone, everything else frozen in eval mode (phase B).
    """

    loss = "ztw"

    def __init__(self, train: str = "heads", detach: bool = True, layer_norm: bool = True,
                 label_smoothing: float = 0.0, **switches):
        super().__init__(None, label_smoothing, **switches)
        if train not in ZTW_PARTS:
            raise ValueError(f"ztw train must be one of {ZTW_PARTS}, got {train!r}")
        if train != "joint" and (self.gradient_equilibrium or self.deconfliction):
            raise ValueError(f"Gradient Equilibrium and deconfliction act where exits branch off a training "
                             f"backbone: use them with ztw train='joint', not {train!r}")
        self.part, self.detach, self.layer_norm = train, detach, layer_norm

    def check(self, model: nn.Module) -> nn.Module:
        if isinstance(model, ZTWModel):
            return model
        return ZTWModel(super().check(model), detach=self.detach, layer_norm=self.layer_norm)

    def prepare(self, model: nn.Module) -> nn.Module:
        return super().prepare(model).train_part(self.part)

    def weights(self, num_exits: int) -> List[float]:
        return [1.0 / num_exits] * num_exits


def create_technique(loss: str = "ce", *, exit_weights: Any = None, label_smoothing: float = 0.0,
                     gradient_equilibrium: bool = False, deconfliction: Optional[str] = None,
                     pcgrad: Optional[dict] = None, temperature: Optional[float] = None, gamma: float = 0.9,
                     reduction: str = "batchmean", isc: Optional[str] = "reference", freeze_bn_stats: bool = False,
                     alpha: float = 0.5, topk: Optional[int] = None, hdkd: Optional[dict] = None,
                     boostnet: Optional[dict] = None, ztw: Optional[dict] = None, l2w: Optional[dict] = None,
                     regime: str = "joint", seed: int = 0) -> Technique:
    """The technique of a config's ``technique`` section (``create_technique(**config['technique'])``,
    keys as in :data:`timm_exits.config.DEFAULTS`); ``temperature=None`` is the technique's default
    (ofa: 3, hdkd: 4, adn: 1), ``seed`` seeds PCGrad's order unless ``pcgrad`` sets it, and L2W's weight
    net; ``pcgrad``, ``hdkd``, ``boostnet`` (``reweight``), ``ztw`` (``train``, ``detach``,
    ``layer_norm``) and ``l2w`` are the options of those techniques. Options of
    the other techniques are not used; ``exit_weights`` and a ``regime`` other than ``joint`` belong
    to ``ce``."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    check_regime(regime)
    if loss != "ce" and (regime != "joint" or exit_weights is not None):
        raise ValueError(f"exit_weights and regime={regime!r} belong to loss='ce', not {loss!r}")
    if deconfliction not in DECONFLICTION:
        raise ValueError(f"deconfliction must be one of {DECONFLICTION}, got {deconfliction!r}")
    if deconfliction == "pcgrad" and loss != "ce":
        raise ValueError("deconfliction='pcgrad' projects the exits' cross-entropies: it needs loss='ce'")
    switches = dict(gradient_equilibrium=gradient_equilibrium, deconfliction=deconfliction)
    kd = {} if temperature is None else dict(temperature=temperature)
    if loss == "ce":
        if deconfliction == "pcgrad":
            return PCGrad(exit_weights, label_smoothing, gradient_equilibrium, regime=regime,
                          freeze_bn_stats=freeze_bn_stats, **{"seed": seed, **_options(pcgrad, PCGrad)})
        return CrossEntropy(exit_weights, label_smoothing, regime=regime, freeze_bn_stats=freeze_bn_stats, **switches)
    if loss == "ofa":
        return OneForAll(gamma=gamma, reduction=reduction, isc=isc, freeze_bn_stats=freeze_bn_stats, **kd, **switches)
    if loss == "hdkd":
        return HDKD(alpha=alpha, **kd, **_options(hdkd, HDKD), **switches)
    if loss == "boostnet":
        return BoostNet(label_smoothing=label_smoothing, **_options(boostnet, BoostNet), **switches)
    if loss == "ztw":
        return ZTW(label_smoothing=label_smoothing, **_options(ztw, ZTW), **switches)
    if loss == "l2w":
        from .l2w import L2W  # l2w.py builds on Technique
        return L2W(label_smoothing=label_smoothing, seed=seed, **_options(l2w, L2W), **switches)
    return ADN(alpha=alpha, topk=topk, **kd, **switches)


_OWN_OPTIONS = {PCGrad: ("scope", "order", "protect_deeper", "groups", "seed"),
                HDKD: ("lr", "xi", "init", "ratio_reg", "interval"), BoostNet: ("reweight",),
                ZTW: ("train", "detach", "layer_norm")}


def _options(given: Optional[dict], technique: type) -> dict:
    """The options of a technique's own section (``pcgrad``, ``hdkd``, ``l2w``), checked by name."""
    name, known = technique.__name__.lower(), _OWN_OPTIONS.get(technique) or technique.OPTIONS
    unknown = set(given or {}) - set(known)
    if unknown:
        raise ValueError(f"unknown {name} option(s) {sorted(unknown)}; expected some of {sorted(known)}")
    return dict(given or {})


def create_training_model(name: str, technique: Technique, model_kwargs: Optional[dict] = None,
                          phase_one_checkpoint: Optional[str] = None) -> nn.Module:
    """``timm.create_model(name, **model_kwargs)`` checked for ``technique``, starting from the weights
    file ``phase_one_checkpoint`` if given (the phase before: IMTA phase I for the :class:`IMTAModel` of
    phase II, which needs it, or the previous phase of a phase-wise regime; for ``boostnet`` / ``ztw``, a
    file of the wrapper's own weights, e.g. ZTW's phase A before phase B, loads into the wrapper); move it
    to its device, then :meth:`Technique.prepare` it."""
    kwargs = dict(model_kwargs or {})
    if isinstance(technique, OneForAll) and phase_one_checkpoint is None:
        raise ValueError("loss='ofa' (IMTA phase II) needs phase_one_checkpoint, the phase-I weights")
    if phase_one_checkpoint is not None and isinstance(technique, (BoostNet, ZTW)):
        # weights of the wrapper itself (ZTW's phase B after phase A) load into it, others into the network
        wrapped = technique.check(timm.create_model(name, **{k: v for k, v in kwargs.items() if k != "pretrained"}))
        weights = timm.models.load_state_dict(phase_one_checkpoint)
        if set(weights) == set(wrapped.state_dict()):
            wrapped.load_state_dict(weights)
            return wrapped
    if phase_one_checkpoint is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=phase_one_checkpoint))
    model = timm.create_model(name, **kwargs)
    if not isinstance(technique, (OneForAll, ADN)) and not is_multi_exit(model):
        raise ValueError(f"{name} is not a multi-exit model (see timm_exits.add_exits)")
    return technique.check(model)
