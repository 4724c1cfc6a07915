"""Training techniques as plain PyTorch, each usable alone or combined:

* losses: multi-exit cross-entropy, One-for-all distillation (IMTA), ADN self-distillation;
* IMTA phase II: :class:`IMTAModel` (Inline Subnetwork Collaboration heads on a frozen network);
* Gradient Equilibrium and branch-level deconfliction: switches of every multi-exit model
  (``model.gradient_equilibrium = True``, ``model.gradient_deconfliction = "symmetric"``);
* parameter-level PCGrad: :func:`pcgrad_backward`.
"""
from .adn import adn_distillation, adn_losses, adn_step
from .deconfliction import deconflict_branch, pcgrad_backward, project_conflicts
from .imta import IMTAModel
from .losses import distillation_kl, multi_exit_cross_entropy, one_for_all_distillation

__all__ = ["IMTAModel", "adn_distillation", "adn_losses", "adn_step", "deconflict_branch", "distillation_kl",
           "multi_exit_cross_entropy", "one_for_all_distillation", "pcgrad_backward", "project_conflicts"]
