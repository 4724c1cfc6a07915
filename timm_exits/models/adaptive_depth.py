"""Adaptive Depth Networks with skippable sub-paths (ADN; Kang & Lee, NeurIPS 2024) for timm models.

Every stage with n >= 2 blocks is split into a mandatory sub-path (the first ceil(n/2) blocks) and a
skippable one (the rest). A depth configuration such as ``"TFTF"`` says, stage by stage, whether the
skippable sub-path is skipped (``T``) or run (``F``); ``"FFFF"`` is the super-net, ``"TTTT"`` the
base-net, and the 2^S configurations share all weights. Mandatory blocks of a skipped stage use
their own twin norms ("skip-aware" norms) and no drop-path.

* ResNet (Bottleneck and BasicBlock): the four ``layer`` stages; twins of ``bn1``, ``bn2``, ``bn3``.
* ViT / DeiT: the blocks in S pseudo-stages (4 by default: 3 blocks each for depth 12, the last one
  skippable); twins of ``norm1``, ``norm2``.
* Swin: the four stages; twins of ``norm1``, ``norm2`` and of the stage's patch-merging norm.

``make_adaptive_depth(model)`` converts a timm model in place; the registered ``*_adn`` variants
(catalogue ``timm_exits/registry/adn.yaml``) build one and load timm weights into it, twins
initialised from the originals.
"""
from __future__ import annotations

import copy
import itertools
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Union

import timm
import torch
from torch import nn
from timm.models import generate_default_cfgs, load_pretrained
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from ..checkpoint import pretrained_file
from ..registry import load_catalogue, register_entrypoints

__all__ = ["SkipAware", "Skippable", "make_adaptive_depth", "checkpoint_filter_fn", "ResNetADN",
           "VisionTransformerADN", "SwinTransformerADN"]

DepthConfig = Union[str, Sequence[bool], None]


class SkipAware(nn.Module):
    """A module and its twin: the twin runs while the stage's skippable sub-path is skipped."""

    def __init__(self, main: nn.Module, skip: nn.Module):
        super().__init__()
        self.main = main
        self.skip = skip
        self.skipping = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) if self.skipping else self.main(x)


class Skippable(nn.Module):
    """A residual block that passes its input through unchanged while skipped."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.skipped = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.skipped else self.block(x)


@dataclass
class DepthStage:
    """The switches of one stage: skip-aware twins of its mandatory sub-path, its skippable blocks."""

    skip_aware: List[SkipAware] = field(default_factory=list)
    skippable: List[Skippable] = field(default_factory=list)


class AdaptiveDepthMixin:
    """Depth selection for a converted timm model."""

    depth_stages: List[DepthStage]
    depth_config: str

    @property
    def num_depth_stages(self) -> int:
        return len(self.depth_stages)

    def depth_configs(self) -> List[str]:
        """All 2^S configurations, from the super-net ``F...F`` to the base-net ``T...T``."""
        return ["".join(c) for c in itertools.product("FT", repeat=self.num_depth_stages)]

    def set_depth(self, config: DepthConfig = None) -> None:
        """Select a sub-network: ``"TFTF"`` (T: skip that stage's skippable sub-path), a sequence of
        bools, or ``None`` for the super-net."""
        flags = _parse_config(config, self.num_depth_stages)
        for stage, skip in zip(self.depth_stages, flags):
            for m in stage.skip_aware:
                m.skipping = skip
            for b in stage.skippable:
                b.skipped = skip
        self.depth_config = "".join("T" if f else "F" for f in flags)

    @contextmanager
    def depth(self, config: DepthConfig) -> Iterator[None]:
        """Run a block of code with another sub-network selected."""
        previous = self.depth_config
        self.set_depth(config)
        try:
            yield
        finally:
            self.set_depth(previous)


class ResNetADN(AdaptiveDepthMixin, ResNet):
    """A timm ResNet with skippable sub-paths (made by :func:`make_adaptive_depth`)."""


class VisionTransformerADN(AdaptiveDepthMixin, VisionTransformer):
    """A timm ViT / DeiT with skippable sub-paths (made by :func:`make_adaptive_depth`)."""


class SwinTransformerADN(AdaptiveDepthMixin, SwinTransformer):
    """A timm Swin Transformer with skippable sub-paths (made by :func:`make_adaptive_depth`)."""


def _parse_config(config: DepthConfig, num_stages: int) -> List[bool]:
    if config is None:
        return [False] * num_stages
    if isinstance(config, str):
        if len(config) != num_stages or set(config.upper()) - {"T", "F"}:
            raise ValueError(f"depth config must be {num_stages} letters T (skip) / F (run), e.g. "
                             f"{'T' * (num_stages // 2) + 'F' * (num_stages - num_stages // 2)!r}; got {config!r}")
        return [c == "T" for c in config.upper()]
    flags = [bool(f) for f in config]
    if len(flags) != num_stages:
        raise ValueError(f"depth config needs {num_stages} flags, got {len(flags)}")
    return flags


def _num_mandatory(n: int) -> int:
    return (n + 1) // 2  # ceil(n/2); a single block stays mandatory


def _twin(parent: nn.Module, name: str, twin: Optional[nn.Module] = None) -> Optional[SkipAware]:
    """Replace ``parent.name`` by a SkipAware pair (twin: a copy, or the given module)."""
    module = getattr(parent, name, None)
    if not isinstance(module, nn.Module) or isinstance(module, (nn.Identity, SkipAware)):
        return None
    pair = SkipAware(module, copy.deepcopy(module) if twin is None else twin)
    setattr(parent, name, pair)
    return pair


def _split_stage(blocks: nn.Sequential, indices: Sequence[int], norms: Sequence[str], drops: Sequence[str]) -> DepthStage:
    stage = DepthStage()
    mandatory = _num_mandatory(len(indices))
    for k, i in enumerate(indices):
        if k < mandatory:
            stage.skip_aware += [p for n in norms if (p := _twin(blocks[i], n)) is not None]
            stage.skip_aware += [p for n in drops if (p := _twin(blocks[i], n, nn.Identity())) is not None]
        else:
            blocks[i] = Skippable(blocks[i])
            stage.skippable.append(blocks[i])
    return stage


def make_adaptive_depth(model: nn.Module, num_stages: Optional[int] = None) -> nn.Module:
    """Convert a timm ResNet, ViT / DeiT or Swin in place into an ADN network (super-net selected).

    ``num_stages`` (ViT only, default 4) is the number of pseudo-stages the blocks are grouped into.
    """
    if isinstance(model, AdaptiveDepthMixin):
        raise ValueError("the model already has skippable sub-paths")
    if isinstance(model, ResNet):
        stages = [_split_stage(layer, range(len(layer)), ("bn1", "bn2", "bn3"), ("drop_path",))
                  for layer in (model.layer1, model.layer2, model.layer3, model.layer4)]
        cls = ResNetADN
    elif isinstance(model, VisionTransformer):
        num_stages = num_stages or 4
        depth = len(model.blocks)
        if depth % num_stages:
            raise ValueError(f"{depth} blocks cannot be grouped into {num_stages} equal pseudo-stages")
        size = depth // num_stages
        stages = [_split_stage(model.blocks, range(s * size, (s + 1) * size), ("norm1", "norm2"),
                               ("drop_path1", "drop_path2")) for s in range(num_stages)]
        cls = VisionTransformerADN
    elif isinstance(model, SwinTransformer):
        stages = []
        for layer in model.layers:
            stage = _split_stage(layer.blocks, range(len(layer.blocks)), ("norm1", "norm2"), ("drop_path1", "drop_path2"))
            merge = _twin(layer.downsample, "norm") if hasattr(layer.downsample, "norm") else None
            stage.skip_aware += [merge] if merge is not None else []
            stages.append(stage)
        cls = SwinTransformerADN
    else:
        raise TypeError(f"adaptive depth supports timm ResNet, VisionTransformer and SwinTransformer models, "
                        f"not {type(model).__name__}")
    if num_stages is not None and cls is not VisionTransformerADN:
        raise ValueError("num_stages only applies to ViT / DeiT (other models use their own stages)")
    model.__class__ = cls
    model.depth_stages = stages
    model.set_depth(None)
    return model


_ADN_PART = re.compile(r"\.(?:main|skip|block)(?=\.)")


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Map a plain timm checkpoint onto an ADN model: every norm twin starts as a copy of the
    original norm. An ADN checkpoint passes through unchanged."""
    if any(_ADN_PART.search(k) for k in state_dict):
        return state_dict
    out, used = {}, set()
    for key in model.state_dict():
        plain = _ADN_PART.sub("", key)
        if plain in state_dict:
            out[key] = state_dict[plain]
            used.add(plain)
    out.update({k: v for k, v in state_dict.items() if k not in used})  # left for strict loading to report
    return out


def _create_adn(variant: str, base: str, pretrained: bool = False, **kwargs) -> nn.Module:
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    pretrained_file(pretrained, overlay)
    num_stages = kwargs.pop("num_stages", None)
    model = make_adaptive_depth(timm.create_model(base, **kwargs), num_stages=num_stages)
    cfg = {**timm.models.get_pretrained_cfg(variant).to_dict(), **overlay}
    model.pretrained_cfg = model.default_cfg = cfg
    if pretrained:
        load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes,
                        in_chans=kwargs.get("in_chans", 3), filter_fn=checkpoint_filter_fn)
    return model


_catalogue = load_catalogue("adn")

default_cfgs = generate_default_cfgs({
    name: {k: v for k, v in timm.models.get_pretrained_cfg(v["backbone"]).to_dict().items()
           if k not in ("architecture", "tag")}
    for name, v in _catalogue["variants"].items()})


globals().update(register_entrypoints(
    "adn", __name__, lambda name, v, pretrained, **kw: _create_adn(name, v["backbone"], pretrained, **kw)))
