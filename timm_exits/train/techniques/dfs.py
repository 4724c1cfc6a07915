"""Deep Feature Surgery's distillation (Gong et al., ECCV 2024): the exits learn from the last one."""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch

from ...values import Number
from ..dfs import dfs_distillation_loss
from ..trainer import Outputs, Trainer
from .base import Options, OutputsTechnique, option, register_technique

__all__ = ["DFSDistillation"]


@dataclasses.dataclass(frozen=True)
class DFSDistillationOptions(Options):
    """The distillation's options (:func:`~timm_exits.train.dfs.dfs_distillation_loss`).

    Args:
        gamma: the distillation's weight; the exits but the last get ``1 - gamma`` on their
            cross-entropies (the reference's ``--gamma``, 0.9 for MSDNet). In [0, 1].
        temperature: T (the reference's ``-T``, 3.0), > 0.
    """

    gamma: float = option(0.9, Number(float, 0.0, 1.0))
    temperature: float = option(3.0, Number(float, 0.0, low_open=True))


@register_technique
class DFSDistillation(OutputsTechnique):
    """Deep Feature Surgery's optional distillation (its ``--useKD``) from the network's last exit.

    Every exit but the last learns from the labels (weight ``1 - gamma``) and from the last exit's
    softened prediction (detached; weight ``gamma``, at temperature T, without T^2); the last exit
    learns from the labels. With ``feature_surgery=0.5`` it is the reference's DFS training with KD
    (``recipes/_base_/techniques/dfs_kd.py``)."""

    Options = DFSDistillationOptions

    def losses(self, outputs: Outputs, target: torch.Tensor, trainer: Optional[Trainer] = None) -> Dict[str, torch.Tensor]:
        ce, distillation = dfs_distillation_loss(outputs, target, self.options.temperature, self.options.gamma)
        return {"ce": ce, "distillation": distillation}
