"""Training techniques as plain PyTorch: multi-exit losses, IMTA phase II (ISC + One-for-all KD).
Gradient Equilibrium is a switch of every multi-exit model: ``model.gradient_equilibrium = True``."""
from .imta import IMTAModel
from .losses import distillation_kl, multi_exit_cross_entropy, one_for_all_distillation

__all__ = ["IMTAModel", "distillation_kl", "multi_exit_cross_entropy", "one_for_all_distillation"]
