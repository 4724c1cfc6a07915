"""Zero Time Waste (Wolczyk et al., NeurIPS 2021): cascading exit heads and geometric ensembles.

On a multi-exit model with N exits, the N - 1 attached exits (0..N-2) are ZTW's heads; the last exit,
the backbone's own head, passes through unchanged (it is neither cascaded nor ensembled).

* **Cascade.** Head 0 is the exit head as it is. Head i > 0 reads its own pooled feature h_i and the
  previous head's logits z_{i-1}, detached and layer-normalised, with one linear layer:
  ``z_i = W [h_i, LayerNorm(sg(z_{i-1}))] + b``. The linear layer is split in two here: the exit head's
  own ``fc`` (W_h, b) and a bias-free ``Linear(C, C)`` on the normalised logits (W_z), so the exit heads
  stay the model's (``W = [W_h, W_z]``; the two parts are initialised as separate layers).
* **Geometric ensembles.** Ensemble i combines the log-probabilities of heads 0..i:
  ``o_i = mean_j(exp(w_ij) log p_j) + b_i`` (w_i initialised N(0, 0.01^2), b_i zero), used as logits.

:class:`ZTWModel` keeps z_{i-1} and the stacked log-probabilities (B, i, C) in its exit-history state
(:mod:`timm_exits.models.history`), so the early-exit executor and batch compaction work. It is trained
one part at a time (:meth:`ZTWModel.train_part`, technique ``ztw``): the heads with their cascade on the
frozen backbone (phase A), then the ensembles alone (phase B): on the live outputs, as ZTW's rewrite
does, or offline on cached log-probabilities, as the original does
(:func:`~timm_exits.train.ztw.fit_ensembles_offline`). It is registered with timm as ``ztw``
(:mod:`timm_exits.models.wrappers`): a model folder of it is rebuilt by
``timm.create_model("local-dir:FOLDER", pretrained=True)``.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .exits import BackboneWithExits
from .history import ExitHistoryModel
from .wrappers import create_wrapper, record_wrapper_args, wrapper_cfg

__all__ = ["ZTW_PARTS", "GeometricEnsemble", "ZTWModel"]  # model_registry adds each entrypoint fn to this

ZTW_PARTS = ("heads", "joint", "ensembles")


class GeometricEnsemble(nn.Module):
    """``mean_j(exp(w_j) x_j) + b`` over the heads j of stacked log-probabilities x (B, heads, C).

    Args:
        num_heads: the heads combined (w has one entry per head, drawn from N(0, 0.01^2)).
        num_classes: C (b has one entry per class, zero at first).
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(self, num_heads: int, num_classes: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.randn(num_heads, **dd) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes, **dd))

    def forward(self, log_probs: torch.Tensor) -> torch.Tensor:
        return (log_probs * self.weight.exp()[:, None]).mean(1) + self.bias


class ZTWModel(ExitHistoryModel):
    """ZTW around a multi-exit ``model``.

    Args:
        model: a multi-exit model; its exits 0..N-2 become the cascading heads.
        detach: stop the gradient of head i's loss at the previous head's logits (the reference's default).
        layer_norm: normalise the previous head's logits (a LayerNorm with affine parameters) before the cascade.
        ensembles: exits 0..N-2 answer with their ensembles (else with the cascade's logits);
            :meth:`train_part` sets it.
    """

    def __init__(self, model: nn.Module, detach: bool = True, layer_norm: bool = True, ensembles: bool = True):
        super().__init__(model)
        ref = next(model.parameters())
        dd = dict(device=ref.device, dtype=ref.dtype)
        k, heads = self.num_classes, self.num_exits - 1
        self.detach, self.layer_norm, self.use_ensembles = detach, layer_norm, ensembles
        self.core_eval = False  # keep the wrapped model in eval mode (see train_part)
        self.cascade = nn.ModuleList([
            nn.Sequential(nn.LayerNorm(k, **dd) if layer_norm else nn.Identity(), nn.Linear(k, k, bias=False, **dd))
            for _ in range(heads - 1)])
        self.ensembles = nn.ModuleList([GeometricEnsemble(i + 1, k, **dd) for i in range(heads)])
        record_wrapper_args(self, model, "ztw", detach=detach, layer_norm=layer_norm, ensembles=ensembles)

    def train_part(self, part: str) -> "ZTWModel":
        """Freeze all but ``part``: ``heads`` (the exit heads and the cascade; the backbone of a backbone
        with exits frozen in eval mode, as ZTW's phase A), ``joint`` (the wrapped model and the cascade) or
        ``ensembles`` (the ensembles alone; the rest in eval mode, phase B). The exits answer with their
        ensembles in the ``ensembles`` part only. Returns the model."""
        if part not in ZTW_PARTS:
            raise ValueError(f"ztw train must be one of {ZTW_PARTS}, got {part!r}")
        if part == "heads" and not isinstance(self.model, BackboneWithExits):
            raise ValueError(f"ztw train='heads' freezes the backbone of a backbone with exit heads "
                             f"(timm_exits.add_exits); {type(self.model).__name__} has no separate backbone: "
                             f"use train='joint'")
        self.ensembles.requires_grad_(part == "ensembles")
        self.cascade.requires_grad_(part != "ensembles")
        self.model.requires_grad_(part == "joint")
        if isinstance(self.model, BackboneWithExits):
            self.model.backbone_eval = part == "heads"
        if part == "heads":  # phase A: the exit heads train on the frozen backbone (in eval mode)
            self.model.exits.requires_grad_(True)
        self.use_ensembles, self.core_eval = part == "ensembles", part == "ensembles"
        self._model_args = {**self._model_args, "ensembles": self.use_ensembles}  # what config.json records
        return self.train(self.training)

    def train(self, mode: bool = True) -> "ZTWModel":
        super().train(mode)
        if self.core_eval:
            self.model.eval()
        return self

    def combine(self, logits: torch.Tensor, history: List[torch.Tensor],
                index: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """History: [previous head's logits (B, C), log-probabilities of heads 0..i (B, i + 1, C)]."""
        if index == self.num_exits - 1:  # the backbone's own head
            return logits, history
        if index > 0:
            previous = history[0].detach() if self.detach else history[0]
            logits = logits + self.cascade[index - 1](previous)
        log_probs = logits.log_softmax(-1).unsqueeze(1)
        stacked = torch.cat([history[1], log_probs], 1) if index > 0 else log_probs
        output = self.ensembles[index](stacked) if self.use_ensembles else logits
        return output, [logits, stacked]


default_cfgs = generate_default_cfgs({
    "ztw": wrapper_cfg("Zero Time Waste: cascading exit heads and geometric ensembles on a multi-exit network."),
})


@register_model
def ztw(pretrained: bool = False, **kwargs) -> ZTWModel:
    """Zero Time Waste around a multi-exit network: ``model`` (its timm name), ``model_args`` (its
    arguments), ``detach``, ``layer_norm``, ``ensembles`` (see :class:`ZTWModel`)."""
    return create_wrapper(ZTWModel, "ztw", pretrained, **kwargs)
