"""Hooks: the forward-graph switches (Gradient Equilibrium, branch-level deconfliction) and the
held-out batches a technique learns on. None of them replaces or reconfigures the model's technique."""
from __future__ import annotations

from typing import Any, Union

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


from ...train.techniques.base import BRANCH_DECONFLICTION, Options, apply_switches
from ...train.trainer import cycle

__all__ = ["GradientEquilibriumHook", "GradientDeconflictionHook", "HeldOutBatchesHook"]


def _classifier(runner):
    return runner.model.module if is_model_wrapper(runner.model) else runner.model


@HOOKS.register_module()
class GradientEquilibriumHook(Hook):
    """Train with Gradient Equilibrium (IMTA): switches it on in the model's forward graph (the same
    as the technique option ``gradient_equilibrium=True``)."""

    def before_train(self, runner) -> None:
        apply_switches(_classifier(runner).model, Options(gradient_equilibrium=True))


@HOOKS.register_module()
class GradientDeconflictionHook(Hook):
    """Branch-level gradient deconfliction (one backward; the technique option ``deconfliction``):
    ``mode`` is ``symmetric`` or ``protect_deeper``. Parameter-level PCGrad is a technique of its own
    (``technique=dict(type='PCGrad')``)."""

    def __init__(self, mode: str = "symmetric"):
        if mode not in BRANCH_DECONFLICTION[1:]:
            raise ValueError(f"GradientDeconflictionHook mode must be one of {BRANCH_DECONFLICTION[1:]} (parameter-level PCGrad "
                             f"is technique=dict(type='PCGrad')), got {mode!r}")
        self.mode = mode

    def before_train(self, runner) -> None:
        apply_switches(_classifier(runner).model, Options(deconfliction=self.mode))


@HOOKS.register_module()
class HeldOutBatchesHook(Hook):
    """Gives the model batches of a held-out split (a part of the training data, never the test
    set), cycled, for a technique that learns on them (HDKD's loss weights)."""

    priority = "HIGH"

    def __init__(self, dataloader: Union[dict, Any]):
        self.dataloader = dataloader

    def before_train(self, runner) -> None:
        loader = runner.build_dataloader(self.dataloader) if isinstance(self.dataloader, dict) else self.dataloader
        _classifier(runner).held_out = cycle(loader)
