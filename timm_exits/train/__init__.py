"""Training techniques: plain-PyTorch pieces, each usable alone or combined, and the technique
objects every trainer shares (:mod:`timm_exits.train.techniques`):

* losses: multi-exit cross-entropy, One-for-all distillation (IMTA), ADN self-distillation;
* IMTA phase II: :class:`IMTAModel` (Inline Subnetwork Collaboration heads on a frozen network);
* Gradient Equilibrium and branch-level deconfliction: switches of every multi-exit model
  (``model.gradient_equilibrium = True``, ``model.gradient_deconfliction = "symmetric"``);
* parameter-level PCGrad: :func:`pcgrad_backward`;
* per-exit loss weights, fixed or per epoch (SDN's warm-up, PABEE's depth weights): :class:`ExitWeights`;
* training regimes (``joint``, ``heads_only``, ``backbone``): :func:`apply_regime`;
* exit-history models: :class:`BoostedExits` (BoostNet's boosted ensemble), :class:`ZTWModel` (Zero Time
  Waste's cascading heads and geometric ensembles);
* L2W-DEN's learnt sample weights (:class:`L2W`, :mod:`.l2w`) and the differentiable look-ahead
  step of the model's SGD it needs (:func:`sgd_virtual_step`);
* one object per technique (:class:`CrossEntropy`, :class:`PCGrad`, :class:`OneForAll`,
  :class:`HDKD`, :class:`ADN`, :class:`BoostNet`, :class:`ZTW`, :class:`L2W`), built from a config by
  :func:`create_technique`.
"""
from .adn import adn_distillation, adn_losses, adn_step
from .boostnet import BoostedExits
from .deconfliction import deconflict_branch, pcgrad_backward, project_conflicts
from .imta import IMTAModel
from .l2w import L2W
from .losses import distillation_kl, multi_exit_cross_entropy, one_for_all_distillation
from .regimes import REGIMES, apply_regime
from .schedules import ExitWeights, pabee_weights, sdn_weights
from .techniques import ADN, HDKD, ZTW, BoostNet, CrossEntropy, OneForAll, PCGrad, Technique, create_technique
from .virtual_step import sgd_virtual_step
from .ztw import GeometricEnsemble, ZTWModel, fit_ensembles_offline

__all__ = ["ADN", "BoostNet", "BoostedExits", "CrossEntropy", "ExitWeights", "GeometricEnsemble", "HDKD", "IMTAModel",
           "L2W", "OneForAll", "PCGrad", "REGIMES", "Technique", "ZTW", "ZTWModel", "fit_ensembles_offline",
           "adn_distillation", "apply_regime", "pabee_weights", "sdn_weights",
           "adn_losses", "adn_step", "create_technique", "deconflict_branch", "distillation_kl",
           "multi_exit_cross_entropy", "one_for_all_distillation", "pcgrad_backward", "project_conflicts",
           "sgd_virtual_step"]
