"""Exits for timm backbones: any supported timm model becomes a multi-exit model.

The backbone is cut into a stem and a sequence of *units* (the stages of ResNet / ConvNeXt / Swin,
the blocks of EfficientNet / MobileNetV3 / ViT). Exit heads are attached after chosen units; the
backbone's own head stays the last exit, so a pretrained backbone keeps its accuracy there and
its final logits are unchanged by adding exits::

    model = add_exits("resnet50", pretrained=True)           # exits after layer1..layer3 + fc
    model = add_exits(vit, exits=[3, 7], head="linear")      # after blocks 3 and 7 + the ViT head

Registered variants (``resnet18_exits``, ``vit_tiny_patch16_224_exits``, ...) come from the
catalogue ``timm_exits/registry/exits.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import timm
import torch
from torch import nn
from timm.models import generate_default_cfgs, load_state_dict
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .heads import create_head, reset_head_classifier
from ..profile import meta_copy
from .multi_exit import MultiExitModel
from ..checkpoint import pretrained_file
from ..registry import load_catalogue, register_entrypoints

__all__ = ["BackboneWithExits", "add_exits", "SUPPORTED_BACKBONES"]


@dataclass(frozen=True)
class BackboneLayout:
    """How to run one family of timm models piece by piece."""

    stem: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    units: Callable[[nn.Module], List[str]]  # names of the modules exits can follow, in order
    tail: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # rest of forward_features after the units
    layout: str  # state layout: nchw, nhwc or nlc


def _resnet_stem(m: ResNet, x: torch.Tensor) -> torch.Tensor:
    return m.maxpool(m.act1(m.bn1(m.conv1(x))))


def _vit_stem(m: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))


def _identity(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


def _children(container: str) -> Callable[[nn.Module], List[str]]:
    return lambda m: [f"{container}.{name}" for name, _ in m.get_submodule(container).named_children()]


LAYOUTS: Dict[type, BackboneLayout] = {
    ResNet: BackboneLayout(_resnet_stem, lambda m: ["layer1", "layer2", "layer3", "layer4"], _identity, "nchw"),
    ConvNeXt: BackboneLayout(lambda m, x: m.stem(x), _children("stages"), lambda m, x: m.norm_pre(x), "nchw"),
    EfficientNet: BackboneLayout(
        lambda m, x: m.bn1(m.conv_stem(x)), _children("blocks"), lambda m, x: m.bn2(m.conv_head(x)), "nchw"),
    MobileNetV3: BackboneLayout(lambda m, x: m.bn1(m.conv_stem(x)), _children("blocks"), _identity, "nchw"),
    VisionTransformer: BackboneLayout(_vit_stem, _children("blocks"), lambda m, x: m.norm(x), "nlc"),
    SwinTransformer: BackboneLayout(lambda m, x: m.patch_embed(x), _children("layers"), lambda m, x: m.norm(x), "nhwc"),
}
SUPPORTED_BACKBONES = tuple(cls.__name__ for cls in LAYOUTS)


def layout_of(backbone: nn.Module) -> BackboneLayout:
    for cls, layout in LAYOUTS.items():
        if isinstance(backbone, cls):
            return layout
    raise TypeError(f"{type(backbone).__name__} is not a supported backbone; supported timm families: "
                    f"{', '.join(SUPPORTED_BACKBONES)}")


def default_exits(backbone: nn.Module) -> List[int]:
    """Exits after every unit where the backbone's ``feature_info`` reports a feature map (stride >= 4),
    or, for isotropic models (ViT), after each quarter of the blocks; never after the last unit."""
    units = layout_of(backbone).units(backbone)
    if len({f["reduction"] for f in backbone.feature_info}) == 1:
        return [len(units) * k // 4 - 1 for k in (1, 2, 3)]
    return [units.index(f["module"]) for f in backbone.feature_info
            if f["reduction"] >= 4 and f["module"] in units[:-1]]


def _input_size(backbone: nn.Module) -> tuple:
    """(C, H, W) the backbone was built for: a ViT / Swin patch embedding's image size wins over the
    pretrained cfg, which keeps the default resolution when ``img_size`` is changed."""
    size = tuple((getattr(backbone, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
    chans = getattr(backbone, "in_chans", size[0])
    img_size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    return (chans, *img_size) if img_size else (chans, *size[1:])


class BackboneWithExits(MultiExitModel):
    """A timm backbone with exit heads after chosen units; the backbone's head is the last exit.

    Args:
        backbone: a timm model of a supported family (see ``SUPPORTED_BACKBONES``).
        exits: 0-based indices of the units to put an exit after (default: :func:`default_exits`).
        head: ``linear`` (default) or ``conv`` (MSDNet-style, CNNs only); see :mod:`.heads`.
        head_width: width of the ``conv`` head (default: its input width).
        drop_rate: dropout before the exit heads' linear layers.
    """

    def __init__(
            self,
            backbone: nn.Module,
            exits: Optional[Sequence[int]] = None,
            head: str = "linear",
            head_width: Optional[int] = None,
            drop_rate: float = 0.0,
    ):
        super().__init__()
        self.layout = layout_of(backbone)
        self.backbone = backbone
        self._units = [backbone.get_submodule(name) for name in self.layout.units(backbone)]
        num_units = len(self._units)
        exits = sorted(default_exits(backbone) if exits is None else [int(e) for e in exits])
        if len(set(exits)) != len(exits) or any(not 0 <= e < num_units - 1 for e in exits):
            raise ValueError(f"exits must be distinct unit indices in [0, {num_units - 2}] (the last unit, "
                             f"{num_units - 1}, feeds the backbone's own head), got {exits}")
        self.exit_after = exits
        self.num_exits = len(exits) + 1
        self.exit_index = self.num_exits - 1
        self.num_classes = backbone.num_classes
        self.in_chans = getattr(backbone, "in_chans", 3)
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
        self.pretrained_cfg["input_size"] = _input_size(backbone)
        widths = self._unit_widths()
        kwargs = {}
        if self.layout.layout == "nlc":
            prefix = getattr(backbone, "num_prefix_tokens", 0)
            pool = "token" if getattr(backbone, "global_pool", "avg") == "token" and prefix else "avg"
            kwargs = dict(pool=pool, num_prefix_tokens=prefix, norm=True)
        elif self.layout.layout == "nhwc":
            kwargs = dict(norm=True)
        ref = next(backbone.parameters())
        self.exits = nn.ModuleList([
            create_head(head, widths[e], self.num_classes, self.layout.layout, width=head_width,
                        drop_rate=drop_rate, device=ref.device, dtype=ref.dtype, **kwargs) for e in exits])
        self.stage_widths = [widths[e] for e in exits] + [widths[-1]]
        self.exit_widths = [h.num_features for h in self.exits] + [backbone.num_features]
        self.num_features = backbone.num_features
        self.head_hidden_size = getattr(backbone, "head_hidden_size", backbone.num_features)
        bounds = [0] + [e + 1 for e in exits] + [num_units]
        self._stage_units = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    @torch.no_grad()
    def _unit_widths(self) -> List[int]:
        meta = meta_copy(self.backbone).eval()
        x = self.layout.stem(meta, torch.empty(1, *self.pretrained_cfg["input_size"], device="meta"))
        widths = []
        for name in self.layout.units(meta):
            x = meta.get_submodule(name)(x)
            widths.append(x.shape[1] if self.layout.layout == "nchw" else x.shape[-1])
        return widths

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.layout.stem(self.backbone, x)

    def forward_stage(self, state: torch.Tensor, index: int) -> torch.Tensor:
        for i in self._stage_units[index]:
            state = self._units[i](state)
        if index == self.num_exits - 1:
            state = self.layout.tail(self.backbone, state)
        return state

    def forward_exit(self, state: torch.Tensor, index: int, pre_logits: bool = False) -> torch.Tensor:
        if index == self.num_exits - 1:
            return self.backbone.forward_head(state, pre_logits=pre_logits)
        return self.exits[index](state, pre_logits=pre_logits)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The state after the active exit's stage (for the last exit: ``backbone.forward_features``)."""
        return self.forward_until(x, self.exit_index)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.forward_exit(x, self.exit_index, pre_logits=pre_logits)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        if self.exit_index == self.num_exits - 1:
            return self.backbone.get_classifier()
        return self.exits[self.exit_index].fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New linear layers with ``num_classes`` outputs on every exit, the backbone's included."""
        self.backbone.reset_classifier(num_classes, *(() if global_pool is None else (global_pool,)))
        self.num_classes = num_classes
        for head in self.exits:
            reset_head_classifier(head, head.num_features, num_classes)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


def _is_multi_exit_checkpoint(path: str) -> bool:
    return any(k.startswith(("backbone.", "exits.")) for k in load_state_dict(path))


def add_exits(
        model: Union[str, nn.Module],
        exits: Optional[Sequence[int]] = None,
        head: str = "linear",
        head_width: Optional[int] = None,
        exit_drop_rate: float = 0.0,
        **create_kwargs,
) -> BackboneWithExits:
    """Make a timm model multi-exit. ``model`` is a model or a name for ``timm.create_model``, which
    then receives ``create_kwargs`` (``pretrained``, ``pretrained_cfg_overlay``, ``num_classes``, ...).

    With ``pretrained=True`` and ``pretrained_cfg_overlay=dict(file=...)``, the file may hold the
    backbone's weights (loaded by timm, exits freshly initialised) or a whole multi-exit model's.
    """
    if isinstance(model, nn.Module):
        if create_kwargs:
            raise ValueError(f"timm.create_model arguments {sorted(create_kwargs)} need a model name, not a model")
        return BackboneWithExits(model, exits, head, head_width, exit_drop_rate)
    file = pretrained_file(create_kwargs.get("pretrained", False), create_kwargs.get("pretrained_cfg_overlay"))
    whole = bool(file and _is_multi_exit_checkpoint(file))
    if whole:
        create_kwargs = {k: v for k, v in create_kwargs.items() if k not in ("pretrained", "pretrained_cfg_overlay")}
    wrapped = BackboneWithExits(timm.create_model(model, **create_kwargs), exits, head, head_width, exit_drop_rate)
    if whole:
        wrapped.load_state_dict(load_state_dict(file))
    return wrapped


_catalogue = load_catalogue("exits")


def _cfg(variant: dict) -> dict:
    cfg = timm.models.get_pretrained_cfg(variant["backbone"]).to_dict()
    num_exits = len(variant["args"]["exits"]) + 1
    classifier = cfg.get("classifier") or "head"
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    cfg["classifier"] = tuple(f"exits.{i}.fc" for i in range(num_exits - 1)) + tuple(f"backbone.{c}" for c in classifier)
    cfg["first_conv"] = f"backbone.{cfg['first_conv']}" if cfg.get("first_conv") else None
    return {k: v for k, v in cfg.items() if k not in ("architecture", "tag", "hf_hub_id", "url", "hf_hub_filename")}


default_cfgs = generate_default_cfgs({name: _cfg(v) for name, v in _catalogue["variants"].items()})


def _create_variant(name: str, variant: dict, pretrained: bool = False, **kwargs) -> BackboneWithExits:
    arch = dict(variant.get("args", {}))
    arch.update({k: kwargs.pop(k) for k in ("exits", "head", "head_width", "exit_drop_rate") if k in kwargs})
    model = add_exits(variant["backbone"], pretrained=pretrained, **arch, **kwargs)
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    model.pretrained_cfg = model.default_cfg = {**cfg, **(kwargs.get("pretrained_cfg_overlay") or {})}
    return model


globals().update(register_entrypoints("exits", __name__, _create_variant))
