"""Training techniques: plain-PyTorch pieces, each usable alone or combined, and the technique
types every trainer runs (:mod:`timm_exits.train.techniques`) through one trainer interface
(:mod:`timm_exits.train.trainer`):

* losses: multi-exit cross-entropy, One-for-all distillation (IMTA), ADN self-distillation;
* parameter-level PCGrad: :func:`pcgrad_gradients`, :func:`pcgrad_backward`;
* per-exit loss weights, fixed or per epoch (SDN's warm-up, PABEE's depth weights): :class:`ExitWeights`;
* training regimes (``joint``, ``heads_only``, ``backbone``): :func:`apply_regime`;
* ZTW's offline ensemble fit: :func:`fit_ensembles_offline`;
* L2W-DEN's pieces (:mod:`.l2w`) and the differentiable look-ahead step of the model's SGD it
  needs (:func:`sgd_virtual_step`);
* the technique types (:class:`CrossEntropy`, :class:`PCGrad`, :class:`OneForAll`, :class:`HDKD`,
  :class:`ADN`, :class:`BoostNet`, :class:`ZTW`, :class:`L2W`), built from a config section
  ``dict(type=..., **options)`` by :func:`build_technique`.

The forward-graph switches (Gradient Equilibrium, branch-level deconfliction, Deep Feature Surgery) are parts of the
models (:mod:`timm_exits.models.branch_gradients`); every technique sets them as options.
"""
from .adn import adn_distillation, adn_losses, adn_step
from .deconfliction import pcgrad_backward, pcgrad_gradients
from .losses import distillation_kl, multi_exit_cross_entropy, one_for_all_distillation
from .regimes import REGIMES, apply_regime
from .schedules import ExitWeights, pabee_weights, sdn_weights
from .techniques import (ADN, HDKD, L2W, TECHNIQUES, ZTW, BoostNet, CrossEntropy, OneForAll, PCGrad, PhuongLampert,
                         StepResult, Technique, build_technique, register_technique, technique_config)
from .loop import PlainTrainer
from .trainer import Trainer, TrainerError, check_trainer
from .virtual_step import sgd_virtual_step
from .ztw import fit_ensembles_offline

__all__ = ["ADN", "BoostNet", "CrossEntropy", "ExitWeights", "HDKD", "L2W", "OneForAll", "PCGrad", "PhuongLampert", "PlainTrainer", "REGIMES",
           "StepResult", "TECHNIQUES", "Technique", "Trainer", "TrainerError", "ZTW", "adn_distillation",
           "adn_losses", "adn_step", "apply_regime", "build_technique", "check_trainer", "distillation_kl", "fit_ensembles_offline",
           "multi_exit_cross_entropy", "one_for_all_distillation", "pabee_weights", "pcgrad_backward",
           "pcgrad_gradients", "register_technique", "sdn_weights", "sgd_virtual_step", "technique_config"]
