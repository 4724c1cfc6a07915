"""What a training step optimises, shared by the accelerate engine and the mmengine adapters.

* :func:`create_training_model`: the network a technique trains (a timm multi-exit model, or IMTA's
  phase-II model around frozen phase-I weights);
* :class:`TrainingForward`: the module a distributed wrapper (DDP, FSDP) wraps: its forward returns
  what the loss reads (every exit's logits; for IMTA phase II also the frozen teacher's);
* :func:`training_losses`: the named loss terms of one batch for ``ce``, ``ofa`` and ``hdkd``
  (``adn`` runs two passes: :func:`timm_exits.train.adn_losses`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
from torch import nn

from ..models.multi_exit import exit_logits
from .hdkd import HarmonizedWeights, harmonized_loss, loss_terms
from .imta import IMTAModel
from .losses import exit_cross_entropies, one_for_all_distillation

__all__ = ["LOSSES", "DECONFLICTION", "create_training_model", "apply_switches", "TrainingForward", "training_losses"]

LOSSES = ("ce", "ofa", "hdkd", "adn")
DECONFLICTION = (None, "symmetric", "protect_deeper", "pcgrad")

Outputs = Union[List[torch.Tensor], Tuple[List[torch.Tensor], torch.Tensor]]


def create_training_model(
        name: str,
        model_kwargs: Optional[dict] = None,
        loss: str = "ce",
        phase_one_checkpoint: Optional[str] = None,
        isc: Optional[str] = "reference",
        freeze_bn_stats: bool = False,
) -> nn.Module:
    """``timm.create_model(name, **model_kwargs)``; with ``loss='ofa'`` (IMTA phase II) the model
    loads ``phase_one_checkpoint``, is frozen and gets new ISC heads (:class:`IMTAModel`)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    kwargs = dict(model_kwargs or {})
    if loss == "ofa":
        if phase_one_checkpoint is None:
            raise ValueError("loss='ofa' (IMTA phase II) needs phase_one_checkpoint, the phase-I weights")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=phase_one_checkpoint))
        return IMTAModel(timm.create_model(name, **kwargs), isc=isc, freeze_bn_stats=freeze_bn_stats)
    model = timm.create_model(name, **kwargs)
    if loss == "adn" and not hasattr(model, "set_depth") and not hasattr(getattr(model, "backbone", None), "set_depth"):
        raise ValueError(f"loss='adn' needs an adaptive-depth model (e.g. resnet18_adn), got {name}")
    if loss != "adn" and not hasattr(model, "forward_exits"):
        raise ValueError(f"{name} is not a multi-exit model (see timm_exits.add_exits)")
    return model


def apply_switches(model: nn.Module, gradient_equilibrium: bool = False, deconfliction: Optional[str] = None) -> None:
    """Switch Gradient Equilibrium and branch-level deconfliction (``'symmetric'``,
    ``'protect_deeper'``) on in the forward graph of the model a technique trains; ``'pcgrad'`` acts on
    the gradients instead and changes nothing here. Both switches need trainable branch points: a
    multi-exit network, not IMTA's phase-II heads on a frozen one nor a plain ADN network."""
    if deconfliction not in DECONFLICTION:
        raise ValueError(f"deconfliction must be one of {DECONFLICTION}, got {deconfliction!r}")
    branch = deconfliction in ("symmetric", "protect_deeper")
    if (gradient_equilibrium or branch) and (isinstance(model, IMTAModel) or not hasattr(model, "forward_exits")):
        raise ValueError(f"Gradient Equilibrium and branch-level deconfliction act at the branch points of a "
                         f"multi-exit network; {type(model).__name__} has none that train")
    if gradient_equilibrium:
        model.gradient_equilibrium = True
    if branch:
        model.gradient_deconfliction = deconfliction


class TrainingForward(nn.Module):
    """Wraps a training model so that ``forward`` returns the loss inputs: IMTA phase II gives
    ``(new heads' logits, teacher logits)``, other models every exit's logits (a plain ADN
    network: its one output, as a list)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Outputs:
        if isinstance(self.model, IMTAModel):
            return self.model.forward_train(images)
        return exit_logits(self.model, images)


def training_losses(
        outputs: Outputs,
        target: torch.Tensor,
        loss: str = "ce",
        hdkd_weights: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        weights: Optional[Sequence[float]] = None,
        label_smoothing: float = 0.0,
        temperature: Optional[float] = None,
        gamma: float = 0.9,
        reduction: str = "batchmean",
        alpha: float = 0.5,
) -> Dict[str, torch.Tensor]:
    """Named loss terms of one batch (their sum is the loss): ``exit1`` ... for ``ce`` (``weights``
    per exit; ``target`` may be soft, from mixup), ``ofa`` for IMTA phase II (``temperature`` 3 by
    default, ``gamma``, ``reduction``), ``hdkd`` for dense KD with the harmonized weights
    (``temperature`` 4 by default, ``alpha``; uniform weights, i.e. NaiveDKD, if none are given)."""
    if loss == "ce":
        terms = exit_cross_entropies(outputs, target, weights, label_smoothing)
        return {f"exit{k + 1}": term for k, term in enumerate(terms)}
    if loss == "ofa":
        logits, teacher = outputs
        return {"ofa": one_for_all_distillation(logits, teacher, target, temperature or 3.0, gamma, reduction)}
    if loss == "hdkd":
        ce, kd = loss_terms(outputs, target, temperature or 4.0)
        if hdkd_weights is None:
            hdkd_weights = HarmonizedWeights(len(outputs)).to(ce.device)()
        return {"hdkd": harmonized_loss(ce, kd, tuple(w.detach() for w in hdkd_weights), alpha)}
    raise ValueError(f"training_losses handles 'ce', 'ofa' and 'hdkd', got {loss!r} (ADN: adn_losses)")
