"""JEI-DNN's learned gates (Regol et al., ICLR 2024) beside the network they decide for.

:class:`JEIGatesModel` holds a trained multi-exit network, frozen (no gradient, always in eval
mode), and a learned gate per exit but the last (:class:`~timm_exits.models.gates.ExitGates`). Its
exits answer with the network's own logits, so the early-exit executor, profiling, export and every
evaluation run it as they run the network; the gates decide who leaves through the exit policy
``ExitPolicy("gate", params=model.gates.params())``. The gates train on the frozen network with
the ``JEIGates`` technique; a learned score named alone (``evaluation.policy='gate'``) takes them
from the model (:meth:`JEIGatesModel.policy_params`). It is registered with timm as ``jei_gates``
(:mod:`timm_exits.models.wrappers`): a model folder of it is rebuilt by
``timm.create_model("local-dir:FOLDER", pretrained=True)``, gates included.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .gates import ExitGates
from .history import ExitHistoryModel
from .wrappers import create_wrapper, record_wrapper_args, wrapper_cfg

__all__ = ["JEIGatesModel"]  # model_registry adds each entrypoint fn to this


class JEIGatesModel(ExitHistoryModel):
    """A frozen multi-exit network and its learned exit gates.

    Args:
        model: the trained multi-exit network (frozen here: ``requires_grad=False``, eval mode).
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        model.requires_grad_(False)
        ref = next(model.parameters())
        self.gates = ExitGates(self.num_exits, device=ref.device, dtype=ref.dtype)
        record_wrapper_args(self, model, "jei_gates")
        self.train(model.training)

    def train(self, mode: bool = True) -> "JEIGatesModel":
        """Set the gates' mode; the network stays in eval mode (its batch norms and dropout fixed)."""
        super().train(mode)
        self.model.eval()
        return self

    def combine(self, logits: torch.Tensor, history: List[torch.Tensor],
                index: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        return logits, history  # the exits answer with the network's logits

    def forward_gates(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Every exit's logits (no gradient: the network is frozen) and the gates' logits.

        Args:
            x: a batch of images.

        Returns:
            ``(exit_logits, gate_logits)``: the network's logits of every exit, and the gates'
            logits before the sigmoid, ``(samples, num_exits - 1)``.
        """
        with torch.no_grad():
            logits = self.model.forward_exits(x)
        return logits, self.gates(logits)

    def policy_params(self, score: str) -> List[List[float]]:
        """The parameters of the learned exit-policy score ``score`` this model carries: its gates'
        for ``"gate"`` (so ``evaluation.policy='gate'`` evaluates them)."""
        if score != "gate":
            raise ValueError(f"a jei_gates model carries the parameters of the 'gate' score, not of {score!r}")
        return self.gates.params()


default_cfgs = generate_default_cfgs({
    "jei_gates": wrapper_cfg("JEI-DNN: learned exit gates beside a frozen multi-exit network."),
})


@register_model
def jei_gates(pretrained: bool = False, **kwargs) -> JEIGatesModel:
    """JEI-DNN's learned gates around a multi-exit network: ``model`` (its timm name) and
    ``model_args`` (its arguments) (see :class:`JEIGatesModel`)."""
    return create_wrapper(JEIGatesModel, "jei_gates", pretrained, **kwargs)
