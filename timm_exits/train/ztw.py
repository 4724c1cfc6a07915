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
does, or offline on cached log-probabilities, as the original does (:func:`fit_ensembles_offline`).
"""
from __future__ import annotations

from typing import Iterable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models.exits import BackboneWithExits
from ..models.history import ExitHistoryModel
from .regimes import apply_regime

__all__ = ["ZTW_PARTS", "GeometricEnsemble", "ZTWModel", "fit_ensembles_offline"]

ZTW_PARTS = ("heads", "joint", "ensembles")


class GeometricEnsemble(nn.Module):
    """``mean_j(exp(w_j) x_j) + b`` over the heads j of stacked log-probabilities x (B, heads, C)."""

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
            self.model.backbone_eval = False
        if part == "heads":
            apply_regime(self.model, "heads_only", freeze_bn_stats=True)
        self.use_ensembles, self.core_eval = part == "ensembles", part == "ensembles"
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


def fit_ensembles_offline(model: ZTWModel, loader: Iterable, epochs: int = 501, lr: float = 1e-3,
                          batch_size: int = 512, seed: int = 0) -> List[float]:
    """Phase B as ZTW's original code fits it: the heads' log-probabilities of every ``(images, labels)``
    batch of ``loader`` computed once (the model in eval mode, nothing else trained), then each ensemble
    fitted on them alone with Adam (its own cross-entropy; batches of ``batch_size`` reshuffled every
    epoch from ``seed``). The original's defaults: 501 epochs (10 on ImageNet), batch 512, lr 1e-3, on
    the training set. Leaves the model in eval mode answering with its ensembles; returns each epoch's
    mean loss (the ensembles' cross-entropies averaged)."""
    if not isinstance(model, ZTWModel):
        raise ValueError(f"fit_ensembles_offline fits the ensembles of a ZTWModel, got {type(model).__name__}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    model.train_part("ensembles").eval()
    stacks, labels = [], []
    with torch.no_grad():
        for images, targets in loader:
            state = model.forward_until(images, model.num_exits - 2)  # through the last ensembled head
            stacks.append(state[2][1])  # the heads' log-probabilities (B, heads, C)
            labels.append(torch.as_tensor(targets))
    if not stacks:
        raise ValueError("fit_ensembles_offline needs a loader with at least one batch")
    stacked, labels = torch.cat(stacks), torch.cat(labels).to(stacks[0].device)
    optimizer = torch.optim.Adam(model.ensembles.parameters(), lr=lr)
    generator, losses = torch.Generator().manual_seed(seed), []
    for _ in range(epochs):
        total = 0.0
        for index in torch.randperm(len(labels), generator=generator).split(batch_size):
            x, y = stacked[index], labels[index]
            terms = torch.stack([F.cross_entropy(ensemble(x[:, :i + 1]), y)
                                 for i, ensemble in enumerate(model.ensembles)])
            optimizer.zero_grad()
            terms.sum().backward()  # the ensembles share no parameter: each is fitted on its own loss
            optimizer.step()
            total += terms.mean().item() * len(index)
        losses.append(total / len(labels))
    return losses
