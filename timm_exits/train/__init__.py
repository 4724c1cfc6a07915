"""Training techniques: plain-PyTorch pieces, each usable alone or combined, and the technique
objects every trainer shares (:mod:`timm_exits.train.techniques`):

* losses: multi-exit cross-entropy, One-for-all distillation (IMTA), ADN self-distillation;
* Gradient Equilibrium and branch-level deconfliction: switches of every multi-exit model
  (``model.gradient_equilibrium = True``, ``model.gradient_deconfliction = "symmetric"``);
* parameter-level PCGrad: :func:`pcgrad_backward`;
* per-exit loss weights, fixed or per epoch (SDN's warm-up, PABEE's depth weights): :class:`ExitWeights`;
* training regimes (``joint``, ``heads_only``, ``backbone``): :func:`apply_regime`;
* ZTW's geometric ensembles fitted offline: :func:`fit_ensembles_offline`;
* L2W-DEN's learnt sample weights (:class:`L2W`, :mod:`.l2w`) and the differentiable look-ahead
  step of the model's SGD it needs (:func:`sgd_virtual_step`);
* the models some techniques train (IMTA's phase II, BoostNet's and ZTW's wrappers) are in
  :mod:`timm_exits.models`;
* one object per technique (:class:`CrossEntropy`, :class:`PCGrad`, :class:`OneForAll`,
  :class:`HDKD`, :class:`ADN`, :class:`BoostNet`, :class:`ZTW`, :class:`L2W`), built from a config by
  :func:`create_technique`.
"""
from .adn import adn_distillation, adn_losses, adn_step
from .deconfliction import pcgrad_backward
from .l2w import L2W
from .losses import distillation_kl, multi_exit_cross_entropy, one_for_all_distillation
from .regimes import REGIMES, apply_regime
from .schedules import ExitWeights, pabee_weights, sdn_weights
from .techniques import ADN, HDKD, ZTW, BoostNet, CrossEntropy, OneForAll, PCGrad, Technique, create_technique
from .virtual_step import sgd_virtual_step
from .ztw import fit_ensembles_offline

__all__ = ["ADN", "BoostNet", "CrossEntropy", "ExitWeights", "HDKD", "L2W", "OneForAll", "PCGrad", "REGIMES",
           "Technique", "ZTW", "fit_ensembles_offline",
           "adn_distillation", "apply_regime", "pabee_weights", "sdn_weights",
           "adn_losses", "adn_step", "create_technique", "distillation_kl",
           "multi_exit_cross_entropy", "one_for_all_distillation", "pcgrad_backward",
           "sgd_virtual_step"]
