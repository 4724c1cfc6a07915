"""IMTA phase II (Li et al., ICCV 2019): new linear heads with Inline Subnetwork Collaboration on a
frozen phase-I multi-exit network, trained with One-for-all distillation.

Head 1 reads the pooled feature f_1 of the frozen exit 1; head i > 1 reads
``concat(f_i, ReLU(BN1d(Linear_{K->D_i}(z_{i-1}))))`` where z_{i-1} is head i-1's raw logits. The
reference does not detach z_{i-1} (later exits' losses train earlier heads too); the paper's form
detaches it (``isc="detach"``). The frozen network keeps training-mode batch norm as in the
reference (its running statistics still move); ``freeze_bn_stats=True`` keeps it in eval mode.

The phase-II model is itself a multi-exit model: stage i runs the frozen stage i and head i, and
carries z_i in its state, so ``forward_exits``, the early-exit executor, profiling and export work.
It is registered with timm as ``imta`` (:mod:`timm_exits.models.wrappers`): a model folder of it is
rebuilt by ``timm.create_model("local-dir:FOLDER", pretrained=True)``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .multi_exit import MultiExitModel
from .wrappers import create_wrapper, record_wrapper_args, wrapper_cfg

__all__ = ["IMTAModel"]  # model_registry adds each entrypoint fn to this


class IMTAModel(MultiExitModel):
    """Phase-II model around a trained multi-exit ``backbone`` (frozen here).

    Args:
        backbone: the phase-I multi-exit model (its exits' pooled features are read).
        isc: ``"reference"`` (no detach), ``"detach"`` (the paper), or ``None`` (plain new heads).
        freeze_bn_stats: keep the frozen network in eval mode while training.
    """

    def __init__(self, backbone: MultiExitModel, isc: Optional[str] = "reference", freeze_bn_stats: bool = False):
        super().__init__()
        if isc not in ("reference", "detach", None):
            raise ValueError(f"isc must be 'reference', 'detach' or None, got {isc!r}")
        self.backbone = backbone.requires_grad_(False)
        backbone.set_exit(None)  # its get_classifier() is the final exit's: the teacher's
        self.isc_mode, self.freeze_bn_stats = isc, freeze_bn_stats
        self.num_exits = backbone.num_exits
        self.exit_index = self.num_exits - 1
        self.num_classes = backbone.num_classes
        record_wrapper_args(self, backbone, "imta", isc=isc, freeze_bn_stats=freeze_bn_stats)
        widths = list(backbone.exit_widths)
        ref = next(backbone.parameters())
        dd = dict(device=ref.device, dtype=ref.dtype)
        k = self.num_classes
        self.heads = nn.ModuleList(
            [nn.Linear(widths[0], k, **dd)] + [nn.Linear((2 if isc else 1) * d, k, **dd) for d in widths[1:]])
        self.isc = nn.ModuleList([
            nn.Sequential(nn.Linear(k, d, **dd), nn.BatchNorm1d(d, **dd), nn.ReLU(inplace=True)) for d in widths[1:]
        ]) if isc else nn.ModuleList()
        self.exit_widths = [h.in_features for h in self.heads]
        self.num_features = self.exit_widths[-1]  # what the last head reads (timm's config.json records it)

    def train(self, mode: bool = True) -> "IMTAModel":
        super().train(mode)
        if self.freeze_bn_stats:
            self.backbone.eval()
        return self

    def forward_stem(self, x: torch.Tensor) -> list:
        """The state: [frozen network's state, previous head's logits, frozen exit's pooled feature]."""
        return [self.backbone.forward_stem(x), x.new_zeros(x.shape[0], 0), x.new_zeros(x.shape[0], 0)]

    def _head(self, feature: torch.Tensor, previous: torch.Tensor, index: int) -> torch.Tensor:
        if index > 0 and self.isc_mode:
            previous = previous.detach() if self.isc_mode == "detach" else previous
            feature = torch.cat([feature, self.isc[index - 1](previous)], 1)
        return self.heads[index](feature)

    def forward_stage(self, state: list, index: int) -> list:
        inner = self.backbone.forward_stage(state[0], index)
        feature = self.backbone.forward_exit(inner, index, pre_logits=True)
        return [inner, self._head(feature, state[1], index), feature]

    def forward_exit(self, state: list, index: int, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            raise ValueError("IMTA heads are single linear layers: use the frozen exits' features")
        return state[1]

    def forward_train(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """New heads' logits for every exit, and the teacher: the frozen final exit's logits, from the
        pooled feature already computed (the frozen head runs once per step, as in the reference, so
        its batch norms take one running-statistics update)."""
        state, logits = self.forward_stem(x), []
        for i in range(self.num_exits):
            state = self.forward_stage(state, i)
            logits.append(state[1])
        with torch.no_grad():
            teacher = self.backbone.get_classifier()(state[2])
        return logits, teacher


default_cfgs = generate_default_cfgs({
    "imta": wrapper_cfg("IMTA phase II: Inline Subnetwork Collaboration heads on a frozen multi-exit network."),
})


@register_model
def imta(pretrained: bool = False, **kwargs) -> IMTAModel:
    """IMTA phase II around a multi-exit network: ``model`` (its timm name), ``model_args`` (its
    arguments), ``isc``, ``freeze_bn_stats`` (see :class:`IMTAModel`)."""
    return create_wrapper(IMTAModel, "imta", pretrained, **kwargs)
