"""Exits for timm backbones: any supported timm model becomes a multi-exit model.

The backbone is cut into a stem and a sequence of *units* (the stages of ResNet / ConvNeXt / Swin,
the blocks of EfficientNet / MobileNetV3 / ViT). Exit heads are attached after chosen units; the
backbone's own head stays the last exit, so a pretrained backbone keeps its accuracy there and
its final logits are unchanged by adding exits::

    model = add_exits("resnet50", pretrained=True)           # exits after layer1..layer3 + fc
    model = add_exits(vit, exits=[3, 7], head="linear")      # after blocks 3 and 7 + the ViT head
    model = add_exits("resnet18", exits="sdn", head="sdn", input_size=(3, 32, 32))  # SDN's placement and heads

Exits can be placed by cost (:func:`exits_by_cost`): after the units whose cumulative MACs are nearest
given fractions of the backbone's; ``exits='sdn'`` is SDN's 15, 30, ..., 90 %.

Each supported family has a small subclass of :class:`BackboneWithExits` (``ResNetWithExits``, ...)
whose stem / units / tail are plain typed code over the backbone's own modules, so the wrapper
scripts (``torch.jit.script``) and traces (``torch.fx``) like timm's models; ``BackboneWithExits(backbone)``
and :func:`add_exits` pick the subclass from the backbone's class.

The registered variants (``resnet18_exits``, ``vit_tiny_patch16_224_exits``, ...) are declared at the end
of this file, timm's way: ``default_cfgs`` and one ``@register_model`` function each.
"""
from __future__ import annotations

import abc
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import timm
import torch
from torch import nn
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, group_parameters, \
    load_state_dict, register_model
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .heads import create_head, reset_head_classifier
from ..profile import meta_copy, profile_exits
from .features import check_feature_indices
from .branch_gradients import detach_channels
from .multi_exit import MultiExitModel
from .pretrained import pretrained_file

__all__ = [
    "BackboneWithExits", "ResNetWithExits", "ConvNeXtWithExits", "EfficientNetWithExits", "MobileNetV3WithExits",
    "VisionTransformerWithExits", "SwinTransformerWithExits", "add_exits", "default_exits", "exits_by_cost",
    "SDN_COST_FRACTIONS", "SUPPORTED_BACKBONES",
]  # model_registry adds each entrypoint fn to this


def _input_size(backbone: nn.Module) -> tuple:
    """(C, H, W) the backbone was built for: a ViT / Swin patch embedding's image size wins over the
    pretrained cfg, which keeps the default resolution when ``img_size`` is changed."""
    size = tuple((getattr(backbone, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
    chans = getattr(backbone, "in_chans", size[0])
    img_size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    return (chans, *img_size) if img_size else (chans, *size[1:])


def _pool_type(backbone: nn.Module) -> str:
    """The backbone classifier's global pooling ('avg', 'token', '' for none, ...)."""
    pool = getattr(backbone, "global_pool", None)
    if pool is None:
        pool = getattr(getattr(backbone, "head", None), "global_pool", None)
    return pool if isinstance(pool, str) else getattr(pool, "pool_type", "avg")


def _exit_pool(global_pool: str, layout: str, num_prefix_tokens: int) -> str:
    """An exit head's pooling for the backbone's ``global_pool``: none stays none, the class token where the
    backbone pools its class token, else the average."""
    if global_pool == "":
        return ""
    return "token" if global_pool == "token" and layout == "nlc" and num_prefix_tokens else "avg"


class BackboneWithExits(MultiExitModel):
    """A timm backbone with exit heads after chosen units; the backbone's head is the last exit.

    ``BackboneWithExits(backbone, ...)`` returns the subclass of the backbone's family (see
    ``SUPPORTED_BACKBONES``). A subclass defines ``forward_stem``, ``forward_units(x, start, end)`` (units
    ``start..end-1``, plain typed code over the backbone's own modules, so the model scripts and traces),
    ``forward_tail`` (what follows the last unit in ``backbone.forward_features``) and ``backbone_units``
    (the units' module names, by default the children of ``unit_container``). Stage i runs units
    ``stage_bounds[i]..stage_bounds[i+1]-1``; no module is registered twice, so the state dict keeps the
    keys ``backbone.*`` and ``exits.*``.

    Args:
        backbone: a timm model of a supported family.
        exits: 0-based indices of the units to put an exit after (default: :func:`default_exits`), or
            ``'sdn'``: placed by cost at SDN's fractions (:data:`SDN_COST_FRACTIONS`).
        head: ``linear`` (default), ``conv`` (MSDNet-style, CNNs only), ``sdn`` (SDN's mixed-pooling
            head, spatial maps only) or ``ztw`` (ZTW's, the same pooling adaptive to 4x4); see :mod:`.heads`.
        head_width: width of the ``conv`` head (default: its input width).
        drop_rate: dropout before the exit heads' linear layers.
        exits_at_cost: place the exits by cost instead: fractions in (0, 1) of the backbone's MACs
            (:func:`exits_by_cost`).
        input_size: (C, H, W) the model is built for (default: the backbone's): the size of the maps an
            ``sdn`` head reads and the input the placement by cost is profiled with.
        multi_exit_training: ``model(x)`` in training mode returns every exit's logits (the default) or,
            ``False``, the last exit's alone (see :meth:`~.MultiExitModel.set_multi_exit_training`).

    ``backbone_eval = True`` keeps the backbone in eval mode whatever the model's mode (a frozen
    backbone whose batch-norm statistics must not move; see :mod:`timm_exits.train.regimes`).
    """

    family: Type[nn.Module] = nn.Module  # the timm model class a subclass wraps
    layout: str = "nchw"  # state layout: nchw, nhwc or nlc
    unit_container: str = ""  # the backbone's Sequential of units (ResNet: none, its units are layer1..layer4)
    checkpoint_units: bool = True  # backbone.forward_features checkpoints its units (else its stages do)
    __jit_unused_properties__ = ["_units", "_stage_units"]

    def __new__(cls, backbone: Optional[nn.Module] = None, *args, **kwargs):
        if cls is BackboneWithExits and backbone is not None:
            cls = _wrapper_class(backbone)
        return super().__new__(cls)

    def __init__(
            self,
            backbone: nn.Module,
            exits: Optional[Union[Sequence[int], str]] = None,
            head: str = "linear",
            head_width: Optional[int] = None,
            drop_rate: float = 0.0,
            exits_at_cost: Optional[Sequence[float]] = None,
            input_size: Optional[Sequence[int]] = None,
            multi_exit_training: bool = True,
    ):
        super().__init__()
        if not isinstance(backbone, self.family):
            raise TypeError(f"{type(self).__name__} wraps a {self.family.__name__}, got {type(backbone).__name__}")
        self.backbone = backbone
        self.backbone_eval = False  # keep the backbone in eval mode in training (see the class doc)
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
        self.pretrained_cfg["input_size"] = tuple(input_size) if input_size is not None else _input_size(backbone)
        num_units = len(self.unit_names())
        if isinstance(exits, str):
            if exits != "sdn" or exits_at_cost is not None:
                raise ValueError(f"exits must be unit indices or 'sdn' (SDN's placement by cost), got {exits!r}"
                                 + (" with exits_at_cost" if exits_at_cost is not None else ""))
            exits_at_cost = SDN_COST_FRACTIONS
        elif exits_at_cost is not None and exits is not None:
            raise ValueError("give exits (unit indices) or exits_at_cost (cost fractions), not both")
        if exits_at_cost is not None:
            exits = exits_by_cost(backbone, exits_at_cost, self.pretrained_cfg["input_size"])
        exits = sorted(default_exits(backbone) if exits is None else [int(e) for e in exits])
        if len(set(exits)) != len(exits) or any(not 0 <= e < num_units - 1 for e in exits):
            raise ValueError(f"exits must be distinct unit indices in [0, {num_units - 2}] (the last unit, "
                             f"{num_units - 1}, feeds the backbone's own head), got {exits}")
        self.exit_after: List[int] = exits
        self.num_exits = len(exits) + 1
        self.exit_index = self.num_exits - 1
        self.stage_bounds: List[int] = [0] + [e + 1 for e in exits] + [num_units]  # stage i: units [b_i, b_i+1)
        self.grad_checkpointing = False
        self.multi_exit_training = multi_exit_training
        self.num_classes = backbone.num_classes
        self.in_chans = getattr(backbone, "in_chans", 3)
        self.num_features = backbone.num_features
        self.head_hidden_size = getattr(backbone, "head_hidden_size", backbone.num_features)
        self.output_fmt = getattr(backbone, "output_fmt", "NLC" if self.layout == "nlc" else "NCHW")
        self.feature_info = [dict(f, module=f"backbone.{f['module']}") for f in backbone.feature_info]
        self.default_cfg = self.pretrained_cfg
        shapes = self._unit_shapes()
        widths = [shape[1] if self.layout == "nchw" else shape[-1] for shape in shapes]
        self.num_prefix_tokens = getattr(backbone, "num_prefix_tokens", 0) if self.layout == "nlc" else 0
        pool = _exit_pool(_pool_type(backbone), self.layout, self.num_prefix_tokens)
        kwargs = dict(pool=pool, num_prefix_tokens=self.num_prefix_tokens, norm=self.layout != "nchw")
        ref = next(backbone.parameters())

        def map_size(shape: torch.Size) -> dict:  # the sdn head's (H, W)
            return dict(map_size=tuple(shape[2:] if self.layout == "nchw" else shape[1:3])) if head == "sdn" else {}

        self.exits = nn.ModuleList([
            create_head(head, widths[e], self.num_classes, self.layout, width=head_width, drop_rate=drop_rate,
                        device=ref.device, dtype=ref.dtype, **kwargs, **map_size(shapes[e])) for e in exits])
        self.stage_widths = [widths[e] for e in exits] + [widths[-1]]
        self.exit_widths = [h.num_features for h in self.exits] + [backbone.num_features]
        self.train(backbone.training)  # one mode for the whole model: the backbone's

    # ---- what a family defines
    @classmethod
    def backbone_units(cls, backbone: nn.Module) -> List[str]:
        """Names of the modules of ``backbone`` an exit can follow, in order."""
        return [f"{cls.unit_container}.{n}" for n, _ in backbone.get_submodule(cls.unit_container).named_children()]

    @torch.jit.ignore
    def unit_names(self) -> List[str]:
        """Names (under ``backbone``) of the modules an exit can follow, in order."""
        return self.backbone_units(self.backbone)

    @abc.abstractmethod
    def forward_units(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Run the backbone's units ``start`` .. ``end - 1`` (``forward_stem`` is the family's too).

        Args:
            x: the state before unit ``start`` (the stem's output for unit 0).
            start: the first unit to run (0-based).
            end: one past the last unit to run.

        Returns:
            The state after unit ``end - 1``.
        """

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return x

    # ---- the multi-exit contract
    @property
    def _units(self) -> List[nn.Module]:
        """The backbone's unit modules, in order."""
        return [self.backbone.get_submodule(n) for n in self.unit_names()]

    @property
    def _stage_units(self) -> List[range]:
        """The unit indices each stage runs."""
        return [range(a, b) for a, b in zip(self.stage_bounds[:-1], self.stage_bounds[1:])]

    @torch.no_grad()
    def _unit_shapes(self) -> List[torch.Size]:
        """The state's shape after each unit, for one image of the input size."""
        meta = meta_copy(self).eval()
        x = meta.forward_stem(torch.empty(1, *self.pretrained_cfg["input_size"], device="meta"))
        shapes = []
        for i in range(len(self.unit_names())):
            x = meta.forward_units(x, i, i + 1)
            shapes.append(x.shape)
        return shapes

    def train(self, mode: bool = True) -> "BackboneWithExits":
        super().train(mode)
        if self.backbone_eval:
            self.backbone.eval()
        return self

    @torch.jit.ignore
    def _forward_units_checkpointed(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Units ``start..end-1`` recomputed in the backward pass (where the backbone checkpoints its units;
        Swin / ConvNeXt stages checkpoint their own blocks)."""
        if self.checkpoint_units:
            return checkpoint_seq(self._units[start:end], x)
        return self.forward_units(x, start, end)

    def split_state_grad(self, state: torch.Tensor, keep: float) -> torch.Tensor:
        """Deep Feature Surgery splits the channels of the state's layout: dimension 1 of NCHW maps, the
        last of NHWC maps (Swin) and of tokens (ViT: the embedding, every token alike, as the reference)."""
        return detach_channels(state, keep, 1 if self.layout == "nchw" else -1)

    def forward_stage(self, state: torch.Tensor, index: int) -> torch.Tensor:
        start, end = self.stage_bounds[index], self.stage_bounds[index + 1]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            state = self._forward_units_checkpointed(state, start, end)
        else:
            state = self.forward_units(state, start, end)
        if index == self.num_exits - 1:
            state = self.forward_tail(state)
        return state

    def forward_exit(self, state: torch.Tensor, index: int, pre_logits: bool = False) -> torch.Tensor:
        if index == self.num_exits - 1:
            return self.backbone.forward_head(state, pre_logits=pre_logits)
        out = state
        for i, head in enumerate(self.exits):
            if i == index:
                out = head(state, pre_logits=pre_logits)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The state after the active exit's stage (for the last exit: ``backbone.forward_features``)."""
        return self.forward_until(x, self.exit_index)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The active exit's head (timm's ``forward_head``).

        Args:
            x: the state :meth:`forward_features` returns.
            pre_logits: return the pooled features instead of the logits.

        Returns:
            The logits ``(batch, classes)``, or the pooled features.
        """
        return self.forward_exit(x, self.exit_index, pre_logits=pre_logits)

    # ---- timm's model API
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        if self.exit_index == self.num_exits - 1:
            return self.backbone.get_classifier()
        return self.exits[self.exit_index].fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New linear layers on every exit, the backbone's included.

        Args:
            num_classes: their number of outputs (0: no classifier, the features).
            global_pool: the pooling for the backbone and the exit heads (e.g. ``''``: unpooled
                features); ``None`` keeps theirs.
        """
        pool = None if global_pool is None else _exit_pool(global_pool, self.layout, self.num_prefix_tokens)
        ref = next(self.backbone.parameters())
        for head in self.exits:
            reset_head_classifier(head, head.num_features, num_classes, pool=pool, device=ref.device, dtype=ref.dtype)
        self.backbone.reset_classifier(num_classes, *(() if global_pool is None else (global_pool,)))
        self.num_classes = num_classes

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The backbone's ``no_weight_decay()`` names, under ``backbone.``."""
        names = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{n}" for n in names}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """Layer groups for layer-wise lr decay (``create_optimizer_v2(..., layer_decay=...)``): the backbone's
        own groups, every exit head in the last one, the backbone's head's (timm puts a model's head last):
        new heads learn at the full rate. A callable (name -> group), which timm's ``group_parameters``
        accepts like a dict of regexes."""
        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=coarse))
        layer: Dict[str, int] = {f"backbone.{n}": g for g, names in groups.items() for n in names}
        head = max(layer.values(), default=0)
        return lambda name: layer.get(name, head)

    # ---- timm's feature API: the backbone's own feature maps
    def _check_feature_indices(self, indices: Optional[Union[int, Sequence[int]]]) -> None:
        check_feature_indices(indices, len(self.feature_info), type(self.backbone).__name__)

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            **kwargs: Any,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The backbone's ``forward_intermediates`` (its feature maps, ``feature_info`` indices); the final
        output is ``backbone.forward_features(x)``, the last exit's ``forward_features``.

        Args:
            x: the input batch.
            indices: ``feature_info`` indices in [-n, n-1], an int k (the last k maps), or ``None`` (all).
            norm, stop_early, output_fmt, intermediates_only, **kwargs: passed on to the backbone's
                ``forward_intermediates``.

        Returns:
            The list of feature maps with ``intermediates_only``, else ``(final features, feature maps)``.
        """
        self._check_feature_indices(indices)
        return self.backbone.forward_intermediates(
            x, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only, **kwargs)

    @torch.jit.ignore
    def prune_intermediate_layers(
            self,
            indices: Optional[Union[int, List[int]]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """The backbone's ``prune_intermediate_layers``.

        Args:
            indices: the ``feature_info`` indices to keep the layers for (as :meth:`forward_intermediates`).
            prune_norm: also remove the backbone's final norm.
            prune_head: also remove the backbone's head and every exit head, leaving one exit: the pruned
                backbone's features.

        Returns:
            The indices of the feature maps :meth:`forward_intermediates` then takes (the backbone's).
        """
        self._check_feature_indices(indices)
        take_indices = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if prune_head:
            self.exits = nn.ModuleList()
            self.exit_after = []
            self.stage_bounds = [0, self.stage_bounds[-1]]
            self.num_exits, self.exit_index = 1, 0
            self.stage_widths, self.exit_widths = self.stage_widths[-1:], self.exit_widths[-1:]
            self.num_classes = self.backbone.num_classes
            self.num_features = self.backbone.num_features
            self.head_hidden_size = getattr(self.backbone, "head_hidden_size", self.num_features)
        return take_indices


class _BlocksWithExits(BackboneWithExits):
    """Families whose units are ``backbone.blocks``."""

    unit_container = "blocks"

    def forward_units(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        for i, block in enumerate(self.backbone.blocks):
            if start <= i < end:
                x = block(x)
        return x


class ResNetWithExits(BackboneWithExits):
    """ResNet / ResNeXt: units ``layer1..layer4``."""

    family = ResNet

    @classmethod
    def backbone_units(cls, backbone: nn.Module) -> List[str]:
        return ["layer1", "layer2", "layer3", "layer4"]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        return b.maxpool(b.act1(b.bn1(b.conv1(x))))

    def forward_units(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        b = self.backbone
        if start <= 0 < end:
            x = b.layer1(x)
        if start <= 1 < end:
            x = b.layer2(x)
        if start <= 2 < end:
            x = b.layer3(x)
        if start <= 3 < end:
            x = b.layer4(x)
        return x


class ConvNeXtWithExits(BackboneWithExits):
    """ConvNeXt: units ``stages.i``."""

    family = ConvNeXt
    unit_container = "stages"
    checkpoint_units = False

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.stem(x)

    def forward_units(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        for i, stage in enumerate(self.backbone.stages):
            if start <= i < end:
                x = stage(x)
        return x

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.norm_pre(x)


class EfficientNetWithExits(_BlocksWithExits):
    """EfficientNet: units ``blocks.i``; the head convolution follows the last."""

    family = EfficientNet

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.bn1(self.backbone.conv_stem(x))

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.bn2(self.backbone.conv_head(x))


class MobileNetV3WithExits(_BlocksWithExits):
    """MobileNetV3: units ``blocks.i``."""

    family = MobileNetV3

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.bn1(self.backbone.conv_stem(x))


class VisionTransformerWithExits(_BlocksWithExits):
    """ViT / DeiT: units ``blocks.i``, tokens (NLC); the final norm follows the last."""

    family = VisionTransformer
    layout = "nlc"

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        return b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.norm(x)


class SwinTransformerWithExits(BackboneWithExits):
    """Swin: units ``layers.i``, NHWC maps; the final norm follows the last."""

    family = SwinTransformer
    layout = "nhwc"
    unit_container = "layers"
    checkpoint_units = False

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.patch_embed(x)

    def forward_units(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        for i, layer in enumerate(self.backbone.layers):
            if start <= i < end:
                x = layer(x)
        return x

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.norm(x)


_WRAPPERS: Tuple[Type[BackboneWithExits], ...] = (
    ResNetWithExits, ConvNeXtWithExits, EfficientNetWithExits, MobileNetV3WithExits, VisionTransformerWithExits,
    SwinTransformerWithExits,
)
SUPPORTED_BACKBONES = tuple(w.family.__name__ for w in _WRAPPERS)


def _wrapper_class(backbone: nn.Module) -> Type[BackboneWithExits]:
    for wrapper in _WRAPPERS:
        if isinstance(backbone, wrapper.family):
            return wrapper
    raise TypeError(f"{type(backbone).__name__} is not a supported backbone; supported timm families: "
                    f"{', '.join(SUPPORTED_BACKBONES)}")


def default_exits(backbone: nn.Module) -> List[int]:
    """Exits after every unit where the backbone's ``feature_info`` reports a feature map (stride >= 4),
    or, for isotropic models (ViT), after each quarter of the blocks; never after the last unit."""
    units = _wrapper_class(backbone).backbone_units(backbone)
    if len({f["reduction"] for f in backbone.feature_info}) == 1:
        return [len(units) * k // 4 - 1 for k in (1, 2, 3)]
    return [units.index(f["module"]) for f in backbone.feature_info
            if f["reduction"] >= 4 and f["module"] in units[:-1]]


SDN_COST_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)  # SDN's internal classifiers, of the backbone's cost


def exits_by_cost(backbone: nn.Module, fractions: Sequence[float], input_size: Optional[Sequence[int]] = None
                  ) -> List[int]:
    """The units to put exits after so that each exit's cost is nearest a fraction of the backbone's:
    for each p, the unit (not the last) whose cumulative MACs (stem and units up to it, no head) are
    nearest p x the MACs of the whole backbone without its classifier head, profiled with
    :func:`timm_exits.profile.profile_exits` for one image.

    A tie goes to the shallower unit. Fractions nearest the same unit give one exit there, so a
    backbone with few units (ResNet: layer1..layer3) gets fewer exits than fractions.

    Args:
        backbone: a timm model of a supported family.
        fractions: the target costs, each a fraction in (0, 1) of the backbone's MACs.
        input_size: (C, H, W) of the image profiled; ``None``: the backbone's.

    Returns:
        The 0-based unit indices, sorted, without repeats.
    """
    fractions = list(fractions)
    if not fractions or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p < 1
                                for p in fractions):
        raise ValueError(f"exit cost fractions must be numbers in (0, 1), got {fractions}")
    units = _wrapper_class(backbone).backbone_units(backbone)
    probe = BackboneWithExits(meta_copy(backbone), exits=list(range(len(units) - 1)), input_size=input_size)
    costs = [c.macs for c in profile_exits(probe, probe.pretrained_cfg["input_size"], heads=False)]
    chosen = {min(range(len(units) - 1), key=lambda u: (abs(costs[u] - p * costs[-1]), u)) for p in fractions}
    return sorted(chosen)


def _is_multi_exit_checkpoint(path: str) -> bool:
    return any(k.startswith(("backbone.", "exits.")) for k in load_state_dict(path))


def add_exits(
        model: Union[str, nn.Module],
        exits: Optional[Union[Sequence[int], str]] = None,
        head: str = "linear",
        head_width: Optional[int] = None,
        drop_rate: float = 0.0,
        exits_at_cost: Optional[Sequence[float]] = None,
        input_size: Optional[Sequence[int]] = None,
        multi_exit_training: bool = True,
        **create_kwargs,
) -> BackboneWithExits:
    """Make a timm model multi-exit.

    With ``pretrained=True`` and ``pretrained_cfg_overlay=dict(file=...)``, the file may hold the
    backbone's weights (loaded by timm, exits freshly initialised) or a whole multi-exit model's.

    Args:
        model: a timm model, or a name for ``timm.create_model``.
        exits, head, head_width, exits_at_cost, input_size, multi_exit_training: see
            :class:`BackboneWithExits` (``exits='sdn', head='sdn'``: SDN's placement and heads).
        drop_rate: timm's: dropout before each exit's classifier; from a name, the backbone's own
            head (the last exit) gets it too, a model passed in keeps its own.
        **create_kwargs: for ``timm.create_model`` (``pretrained``, ``pretrained_cfg_overlay``,
            ``num_classes``, ...); only with a name.

    Returns:
        The model with exits, the :class:`BackboneWithExits` subclass of its family.
    """
    if isinstance(model, nn.Module):
        if create_kwargs:
            raise ValueError(f"timm.create_model arguments {sorted(create_kwargs)} need a model name, not a model")
        return BackboneWithExits(model, exits, head, head_width, drop_rate, exits_at_cost, input_size,
                                 multi_exit_training)
    file = pretrained_file(create_kwargs.get("pretrained", False), create_kwargs.get("pretrained_cfg_overlay"))
    whole = bool(file and _is_multi_exit_checkpoint(file))
    if whole:
        create_kwargs = {k: v for k, v in create_kwargs.items() if k not in ("pretrained", "pretrained_cfg_overlay")}
    backbone = timm.create_model(model, drop_rate=drop_rate, **create_kwargs)
    wrapped = BackboneWithExits(backbone, exits, head, head_width, drop_rate, exits_at_cost, input_size,
                                multi_exit_training)
    if whole:
        wrapped.load_state_dict(load_state_dict(file))
    return wrapped


def _create_exits(variant: str, pretrained: bool = False, **kwargs) -> BackboneWithExits:
    """Build a registered variant: ``kwargs['backbone']`` (a timm model name) with exits, through timm's
    ``build_model_with_cfg`` (cfg, ``features_only`` with timm's FeatureGetterNet; ``out_indices`` by default
    timm's for the family: a ViT's last 3 blocks, as the variants' ``model_args`` say, else every feature map
    of the backbone). Weights are loaded by
    :func:`add_exits` (the backbone's own through timm, or a whole multi-exit checkpoint), or, from a model
    folder (``timm.create_model("local-dir:FOLDER", pretrained=True)``) or the Hub, by timm into the whole model."""
    backbone = kwargs.pop("backbone")
    out_indices = kwargs.pop("out_indices", None)  # None: every feature map of the backbone
    if kwargs.get("exits_at_cost") is not None:  # placed by cost instead of the variant's exits
        kwargs.pop("exits", None)
    # a model folder (``local-dir:``) or Hub repo holds the whole multi-exit model: timm loads it into the wrapper
    whole = pretrained and (kwargs.get("pretrained_cfg") or {}).get("source") in ("local-dir", "hf-hub")
    load = {} if whole else dict(pretrained=pretrained, pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
                                 cache_dir=kwargs.get("cache_dir"))
    model = build_model_with_cfg(
        partial(add_exits, backbone, **load),
        variant,
        pretrained=whole,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )
    if kwargs.get("input_size") is not None and hasattr(model, "pretrained_cfg"):  # built for it: its default input
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "input_size": tuple(kwargs["input_size"])}
    return model


def _cfg(backbone: str, num_exits: int = 4, **kwargs) -> Dict[str, Any]:
    """The backbone's default pretrained cfg (input size, mean / std, crop, pool size) with the wrapper's
    layer names: classifiers ``exits.i.fc`` and ``backbone.<classifier>``, first conv ``backbone.<first_conv>``.
    No weight source of its own: ``pretrained=True`` loads the backbone's."""
    cfg = timm.models.get_pretrained_cfg(backbone).to_dict()
    classifier = cfg.get("classifier") or "head"
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    cfg["classifier"] = tuple(f"exits.{i}.fc" for i in range(num_exits - 1)) + \
        tuple(f"backbone.{c}" for c in classifier)
    cfg["first_conv"] = f"backbone.{cfg['first_conv']}" if cfg.get("first_conv") else None
    cfg = {k: v for k, v in cfg.items() if k not in ("architecture", "tag", "hf_hub_id", "url", "hf_hub_filename")}
    return {**cfg, **kwargs}


default_cfgs = generate_default_cfgs({
    'resnet18_exits': _cfg('resnet18'),
    'resnet50_exits': _cfg('resnet50'),
    'resnext50_32x4d_exits': _cfg('resnext50_32x4d'),
    'convnext_tiny_exits': _cfg('convnext_tiny'),
    'efficientnet_b0_exits': _cfg('efficientnet_b0'),
    'mobilenetv3_large_100_exits': _cfg('mobilenetv3_large_100'),
    'vit_tiny_patch16_224_exits': _cfg('vit_tiny_patch16_224'),
    'vit_base_patch16_224_exits': _cfg('vit_base_patch16_224'),
    'deit_small_patch16_224_exits': _cfg('deit_small_patch16_224'),
    'swin_tiny_patch4_window7_224_exits': _cfg('swin_tiny_patch4_window7_224'),
})


@register_model
def resnet18_exits(pretrained: bool = False, **kwargs) -> BackboneWithExits:
    """ResNet-18 with exits after layer1, layer2 and layer3."""
    model_args = dict(backbone='resnet18', exits=[0, 1, 2], head='linear')
    return _create_exits('resnet18_exits', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_exits(pretrained: bool = False, **kwargs) -> BackboneWithExits:
    """ResNet-50 with exits after layer1, layer2 and layer3."""
    model_args = dict(backbone='resnet50', exits=[0, 1, 2], head='linear')
    return _create_exits('resnet50_exits', pretrained, **dict(model_args, **kwargs))


@register_model
def resnext50_32x4d_exits(pretrained: bool = False, **kwargs) -> BackboneWithExits:
    """ResNeXt-50 32x4d with exits after layer1, layer2 and layer3."""
    model_args = dict(backbone='resnext50_32x4d', exits=[0, 1, 2], head='linear')
    return _create_exits('resnext50_32x4d_exits', pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_tiny_exits(pretrained: bool = False, **kwargs) -> BackboneWithExits:
    """ConvNeXt-T with exits after stages 0, 1 and 2."""
    model_args = dict(backbone='convnext_tiny', exits=[0, 1, 2], head='linear')
    return _create_exits('convnext_tiny_exits', pretrained, **dict(model_args, **kwargs))


@register_model
def efficientnet_b0_exits(pretrained: bool = False, **kwargs) -> BackboneWithExits:
    """EfficientNet-B0 with exits after blocks 1, 2 and 4 (strides 4, 8, 16)."""
    model_args = dict(backbone='efficientnet_b0', exits=[1, 2, 4], head='linear')
    return _create_exits('efficientnet_b0_exits', pretrained, **dict(model_args, **kwargs))


@register_model
def mobilenetv3_large_100_exits(pretrained: bool = False, **kwargs) -> BackboneWithExits:
    """MobileNetV3-Large 1.0 with exits after blocks 1, 2 and 4 (strides 4, 8, 16)."""
    model_args = dict(backbone='mobilenetv3_large_100', exits=[1, 2, 4], head='linear')
    return _create_exits('mobilenetv3_large_100_exits', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_tiny_patch16_224_exits(pretrained: bool = False, **kwargs) -> BackboneWithExits:
    """ViT-Ti/16 with exits after blocks 2, 5 and 8 (each quarter of the depth)."""
    model_args = dict(backbone='vit_tiny_patch16_224', exits=[2, 5, 8], head='linear', out_indices=3)
    return _create_exits('vit_tiny_patch16_224_exits', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_base_patch16_224_exits(pretrained: bool = False, **kwargs) -> BackboneWithExits:
    """ViT-B/16 with exits after blocks 2, 5 and 8 (each quarter of the depth)."""
    model_args = dict(backbone='vit_base_patch16_224', exits=[2, 5, 8], head='linear', out_indices=3)
    return _create_exits('vit_base_patch16_224_exits', pretrained, **dict(model_args, **kwargs))


@register_model
def deit_small_patch16_224_exits(pretrained: bool = False, **kwargs) -> BackboneWithExits:
    """DeiT-S/16 with exits after blocks 2, 5 and 8 (each quarter of the depth)."""
    model_args = dict(backbone='deit_small_patch16_224', exits=[2, 5, 8], head='linear', out_indices=3)
    return _create_exits('deit_small_patch16_224_exits', pretrained, **dict(model_args, **kwargs))


@register_model
def swin_tiny_patch4_window7_224_exits(pretrained: bool = False, **kwargs) -> BackboneWithExits:
    """Swin-T with exits after stages 0, 1 and 2."""
    model_args = dict(backbone='swin_tiny_patch4_window7_224', exits=[0, 1, 2], head='linear')
    return _create_exits('swin_tiny_patch4_window7_224_exits', pretrained, **dict(model_args, **kwargs))
