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

The ADN classes are timm's ``ResNet`` / ``VisionTransformer`` / ``SwinTransformer`` with the depth
switches added (:class:`Skippable` blocks, :class:`SkipAware` norms), so timm's own machinery works
on them: ``features_only`` (the wrapper timm uses for the family), ``forward_intermediates``,
``prune_intermediate_layers``, grad checkpointing, ``torch.jit.script`` and ``torch.fx``. The switches
are Python bools on modules: a scripted model reads them at run time, an FX graph fixes the depth
configuration selected when it was traced.

In training mode ``model(x)`` returns ``(super-net logits, base-net logits)``, ADN's two training
passes, so that every parameter (the twins too) gets a gradient; ``set_multi_exit_training(False)``
(or ``multi_exit_training=False`` at creation) makes it one tensor at the selected depth, as in
evaluation mode.

``make_adaptive_depth(model)`` converts a timm model in place; the registered ``*_adn`` variants
(declared at the end of this file) build one and load timm weights into it, twins initialised from
the originals.
"""
import abc
import argparse
import copy
import inspect
import itertools
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .capabilities import is_multi_exit
from .features import check_feature_indices
from .pretrained import keep_file_classifiers
from .training_outputs import TrainingOutputs

__all__ = ["SkipAware", "Skippable", "SkippableAttnBlock", "make_adaptive_depth", "adaptive_depth_of", "set_depth",
           "checkpoint_filter_fn", "ResNetADN", "VisionTransformerADN", "SwinTransformerADN"]

DepthConfig = Union[str, Sequence[bool], None]


class DepthSwitch(nn.Module, metaclass=abc.ABCMeta):
    """Base of the depth switches: a wrapper that knows its depth stage.

    Public attributes it does not have are the wrapped module's, because timm code reads them
    through the wrapper (e.g. ``block.norm1.weight.device``, ``block.set_input_size(...)`` in Swin).

    Args:
        stage: the depth stage the switch belongs to (0-based).
        num_stages: the number of depth stages of the whole network.
    """

    wrapped_name: str = ""

    def __init__(self, stage: int, num_stages: int):
        super().__init__()
        self.stage = stage
        self.num_stages = num_stages

    @abc.abstractmethod
    def set_skip(self, skip: bool) -> None:
        """Switch to the skipped-stage behaviour (``True``) or the full one."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(super().__getattr__(self.wrapped_name), name)


class SkipAware(DepthSwitch):
    """A module and its twin: the twin runs while the stage's skippable sub-path is skipped.

    Args:
        main: the module run while the stage runs in full.
        skip: its twin, run while the stage's skippable sub-path is skipped.
        stage: the depth stage it belongs to (0-based).
        num_stages: the number of depth stages of the whole network.
    """

    wrapped_name = "main"

    def __init__(self, main: nn.Module, skip: nn.Module, stage: int = 0, num_stages: int = 1):
        super().__init__(stage, num_stages)
        self.main = main
        self.skip = skip
        self.skipping = False

    @torch.jit.export
    def set_skip(self, skip: bool) -> None:
        self.skipping = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) if self.skipping else self.main(x)


class Skippable(DepthSwitch):
    """A residual block that passes its input through unchanged while skipped.

    Args:
        block: the residual block, whose ``forward`` takes ``x`` only (ResNet, Swin).
        stage: the depth stage it belongs to (0-based).
        num_stages: the number of depth stages of the whole network.
    """

    wrapped_name = "block"

    def __init__(self, block: nn.Module, stage: int = 0, num_stages: int = 1):
        super().__init__(stage, num_stages)
        self.block = block
        self.skipped = False

    @torch.jit.export
    def set_skip(self, skip: bool) -> None:
        self.skipped = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.skipped else self.block(x)


class SkippableAttnBlock(Skippable):
    """:class:`Skippable` for timm's ViT blocks, whose ``forward`` takes ``(x, attn_mask, is_causal)``."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        return x if self.skipped else self.block(x, attn_mask=attn_mask, is_causal=is_causal)


def _skippable(block: nn.Module, stage: int, num_stages: int) -> Skippable:
    """The Skippable wrapper whose ``forward`` takes the same arguments as the block's."""
    args = list(inspect.signature(block.forward).parameters)[1:]
    for cls in (Skippable, SkippableAttnBlock):
        if args == list(inspect.signature(cls.forward).parameters)[2:]:
            return cls(block, stage, num_stages)
    raise TypeError(f"no skippable wrapper for {type(block).__name__}, whose forward takes (x, {', '.join(args)}); "
                    f"supported: (x) and (x, attn_mask, is_causal)")


def _is_switch(module: nn.Module) -> bool:
    """A depth switch, or its TorchScript compilation (whose ``set_skip`` is exported)."""
    if isinstance(module, torch.jit.ScriptModule):
        return module.original_name in ("SkipAware", "Skippable", "SkippableAttnBlock")
    return isinstance(module, DepthSwitch)


def set_depth(module: nn.Module, config: DepthConfig = None) -> str:
    """Select a sub-network in any module holding depth switches: an ADN network, its
    ``features_only`` wrapper (timm's FeatureListNet / FeatureGetterNet), a part of one, or the
    ``torch.jit.script`` compilation of one (its switches are read at run time).

    Args:
        module: the module holding the depth switches.
        config: ``"TFTF"`` (T: skip that stage's skippable sub-path), a sequence of bools, or
            ``None`` for the super-net; one entry per depth stage of the whole network, also when a
            pruned or truncated module holds only some of them.

    Returns:
        The selected configuration as letters, e.g. ``"TFTF"``.
    """
    switches = [m for m in module.modules() if _is_switch(m)]
    if not switches:
        raise TypeError(f"{type(module).__name__} has no skippable sub-paths (see make_adaptive_depth)")
    flags = _parse_config(config, switches[0].num_stages)
    for m in switches:
        m.set_skip(flags[m.stage])
    letters = "".join("T" if f else "F" for f in flags)
    for m in module.modules():
        if isinstance(m, AdaptiveDepthMixin):
            m.depth_config = letters
    return letters


@dataclass
class DepthStage:
    """The switches of one stage.

    Args:
        skip_aware: the skip-aware twins of its mandatory sub-path.
        skippable: its skippable blocks.
    """

    skip_aware: List[SkipAware] = field(default_factory=list)
    skippable: List[Skippable] = field(default_factory=list)


class AdaptiveDepthMixin:
    """Depth selection and ADN's training forward for a timm model with depth switches.

    Attributes: ``num_depth_stages`` (int), ``depth_config`` (the selected configuration, letters),
    ``multi_exit_training`` (bool, see :meth:`set_multi_exit_training`; the ADN classes take it at
    creation, which timm's ``--model-kwargs`` reaches).
    """

    __jit_unused_properties__ = ["depth_stages"]

    def _init_depth(self, num_stages: int) -> None:
        self.num_depth_stages = num_stages
        self.multi_exit_training = True
        self.set_depth(None)

    @property
    def depth_stages(self) -> List[DepthStage]:
        """The switches of each stage (the twins, then the skippable blocks, in module order)."""
        stages = [DepthStage() for _ in range(self.num_depth_stages)]
        for m in self.modules():
            if isinstance(m, SkipAware):
                stages[m.stage].skip_aware.append(m)
            elif isinstance(m, Skippable):
                stages[m.stage].skippable.append(m)
        return stages

    def depth_configs(self) -> List[str]:
        """All 2^S configurations, from the super-net ``F...F`` to the base-net ``T...T``."""
        return ["".join(c) for c in itertools.product("FT", repeat=self.num_depth_stages)]

    def set_depth(self, config: DepthConfig = None) -> None:
        """Select a sub-network: ``"TFTF"`` (T: skip that stage's skippable sub-path), a sequence of
        bools, or ``None`` for the super-net."""
        set_depth(self, config)

    @contextmanager
    def depth(self, config: DepthConfig) -> Iterator[None]:
        """Run a block of code with another sub-network selected."""
        previous = self.depth_config
        self.set_depth(config)
        try:
            yield
        finally:
            self.set_depth(previous)

    def set_multi_exit_training(self, enable: bool = True) -> None:
        """In training mode, ``model(x)`` returns ``(super-net logits, base-net logits)`` when enabled
        (the default): ADN's two passes, so that every parameter, the twins too, gets a gradient
        (timm's premise, DDP's without ``find_unused_parameters``). Disabled: one tensor at the
        selected depth: timm's own training loop then trains that sub-network alone. Evaluation mode and
        TorchScript always return one tensor."""
        self.multi_exit_training = enable

    def forward_super_and_base(self, x: torch.Tensor, *args: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """The super-net's and the base-net's logits (a :class:`~.training_outputs.TrainingOutputs`
        pair); ``args`` go to ``forward_features`` (ViT: ``attn_mask``, ``is_causal``). The selected
        configuration is restored afterwards."""
        with self.depth(None):
            super_features = self.forward_features(x, *args)
        with self.depth([True] * self.num_depth_stages):
            base_features = self.forward_features(x, *args)
        return TrainingOutputs((self.forward_head(super_features), self.forward_head(base_features)))

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Logits at the selected depth; in training mode ``(super-net, base-net)`` logits (see
        :meth:`set_multi_exit_training`)."""
        if self.training and self.multi_exit_training and not torch.jit.is_scripting():
            return self.forward_super_and_base(x)
        return self.forward_head(self.forward_features(x))


class ResNetADN(AdaptiveDepthMixin, ResNet):
    """A timm ResNet with skippable sub-paths: the four ``layer`` stages, twins of ``bn1``-``bn3``.

    Args:
        *args, **kwargs: timm's ``ResNet`` arguments.
        multi_exit_training: in training mode, return ``(super-net, base-net)`` logits (see
            :meth:`~AdaptiveDepthMixin.set_multi_exit_training`).
    """

    def __init__(self, *args: Any, multi_exit_training: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._add_depth_switches()
        self.multi_exit_training = multi_exit_training

    def _add_depth_switches(self, num_stages: Optional[int] = None) -> None:
        if num_stages is not None:
            raise ValueError("num_stages only applies to ViT / DeiT (ResNet uses its four layers)")
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        for s, layer in enumerate(layers):
            _split_stage(layer, range(len(layer)), ("bn1", "bn2", "bn3"), ("drop_path",), s, len(layers))
        self._init_depth(len(layers))


class VisionTransformerADN(AdaptiveDepthMixin, VisionTransformer):
    """A timm ViT / DeiT with skippable sub-paths: the blocks in equal pseudo-stages, the second half
    of each skippable; twins of ``norm1``, ``norm2``.

    Args:
        *args, **kwargs: timm's ``VisionTransformer`` arguments.
        num_stages: the number of pseudo-stages; it must divide the depth.
        multi_exit_training: in training mode, return ``(super-net, base-net)`` logits (see
            :meth:`~AdaptiveDepthMixin.set_multi_exit_training`).
    """

    def __init__(self, *args: Any, num_stages: int = 4, multi_exit_training: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._add_depth_switches(num_stages)
        self.multi_exit_training = multi_exit_training

    def _add_depth_switches(self, num_stages: Optional[int] = None) -> None:
        num_stages = num_stages or 4
        depth = len(self.blocks)
        if depth % num_stages:
            raise ValueError(f"{depth} blocks cannot be grouped into {num_stages} equal pseudo-stages")
        size = depth // num_stages
        for s in range(num_stages):
            _split_stage(self.blocks, range(s * size, (s + 1) * size), ("norm1", "norm2"),
                         ("drop_path1", "drop_path2"), s, num_stages)
        self._init_depth(num_stages)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Logits at the selected depth; in training mode ``(super-net, base-net)`` logits."""
        if self.training and self.multi_exit_training and not torch.jit.is_scripting():
            return self.forward_super_and_base(x, attn_mask, is_causal)
        return self.forward_head(self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal))


class SwinTransformerADN(AdaptiveDepthMixin, SwinTransformer):
    """A timm Swin Transformer with skippable sub-paths: the four stages; twins of ``norm1``,
    ``norm2`` and of the stage's patch-merging norm.

    Args:
        *args, **kwargs: timm's ``SwinTransformer`` arguments.
        multi_exit_training: in training mode, return ``(super-net, base-net)`` logits (see
            :meth:`~AdaptiveDepthMixin.set_multi_exit_training`).
    """

    def __init__(self, *args: Any, multi_exit_training: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._add_depth_switches()
        self.multi_exit_training = multi_exit_training

    def _add_depth_switches(self, num_stages: Optional[int] = None) -> None:
        if num_stages is not None:
            raise ValueError("num_stages only applies to ViT / DeiT (Swin uses its own stages)")
        n = len(self.layers)
        for s, layer in enumerate(self.layers):
            _split_stage(layer.blocks, range(len(layer.blocks)), ("norm1", "norm2"), ("drop_path1", "drop_path2"), s, n)
            if hasattr(layer.downsample, "norm"):  # patch merging opens the stage: its norm follows its flag
                _twin(layer.downsample, "norm", s, n)
        self._init_depth(n)


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


def _twin(parent: nn.Module, name: str, stage: int, num_stages: int, twin: Optional[nn.Module] = None) -> None:
    """Replace ``parent.name`` by a SkipAware pair (twin: a copy, or the given module)."""
    module = getattr(parent, name, None)
    if isinstance(module, nn.Module) and not isinstance(module, (nn.Identity, SkipAware)):
        setattr(parent, name, SkipAware(module, copy.deepcopy(module) if twin is None else twin, stage, num_stages))


def _split_stage(blocks: nn.Sequential, indices: Sequence[int], norms: Sequence[str], drops: Sequence[str],
                 stage: int, num_stages: int) -> None:
    mandatory = _num_mandatory(len(indices))
    for k, i in enumerate(indices):
        if k < mandatory:
            for n in norms:
                _twin(blocks[i], n, stage, num_stages)
            for n in drops:
                _twin(blocks[i], n, stage, num_stages, nn.Identity())
        else:
            blocks[i] = _skippable(blocks[i], stage, num_stages)


_ADN_CLASSES = {ResNet: ResNetADN, VisionTransformer: VisionTransformerADN, SwinTransformer: SwinTransformerADN}


def make_adaptive_depth(model: nn.Module, num_stages: Optional[int] = None) -> nn.Module:
    """Convert a timm ResNet, ViT / DeiT or Swin in place into an ADN network (super-net selected).

    Args:
        model: a timm ``ResNet``, ``VisionTransformer`` or ``SwinTransformer``.
        num_stages: ViT only: the number of pseudo-stages the blocks are grouped into; ``None``: 4.

    Returns:
        ``model`` itself, now a :class:`ResNetADN`, :class:`VisionTransformerADN` or
        :class:`SwinTransformerADN`.
    """
    if isinstance(model, AdaptiveDepthMixin):
        raise ValueError("the model already has skippable sub-paths")
    cls = next((adn for base, adn in _ADN_CLASSES.items() if isinstance(model, base)), None)
    if cls is None:
        raise TypeError(f"adaptive depth supports timm ResNet, VisionTransformer and SwinTransformer models, "
                        f"not {type(model).__name__}")
    original, model.__class__ = model.__class__, cls
    try:
        model._add_depth_switches(num_stages)
    except ValueError:
        model.__class__ = original  # the checks run before any module is replaced
        raise
    return model


def adaptive_depth_of(model: nn.Module) -> Optional[AdaptiveDepthMixin]:
    """The adaptive-depth network whose depth ``model`` selects with ``set_depth``: ``model`` itself
    (``resnet50_adn``, :func:`make_adaptive_depth`), the backbone of a multi-exit model built on one
    (``add_exits`` on an ADN network), else ``None``."""
    if isinstance(model, AdaptiveDepthMixin):
        return model
    backbone = getattr(model, "backbone", None) if is_multi_exit(model) else None
    return backbone if isinstance(backbone, AdaptiveDepthMixin) else None


_ADN_PART = re.compile(r"\.(?:main|skip|block)(?=\.)")


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Map a checkpoint onto an ADN model. Three layouts load:

    * an ADN checkpoint of this package: unchanged;
    * the reference implementation's (github.com/wchkang/depth; ``{'model': ...}``, DDP ``module.``
      prefixes and torchvision names with ``<norm>_skip`` twins, or plain torchvision weights):
      renamed (see ``_REFERENCE_RULES``);
    * a plain timm checkpoint: every norm twin starts as a copy of the original norm.

    Args:
        state_dict: the checkpoint's state dict, or a training checkpoint holding it under
            ``model`` / ``state_dict``.
        model: the ADN model it is loaded into.

    Returns:
        The state dict keyed by the model's names (keys it does not map are kept, for strict loading
        to report).
    """
    state_dict = _unwrap(state_dict)
    if any(_ADN_PART.search(k) for k in state_dict):
        return state_dict
    reference = _reference_rules(state_dict, model)
    if reference is not None:
        return _from_reference(state_dict, model, *reference)
    out, used = {}, set()
    for key, (plain, _) in _timm_names(model).items():
        if plain in state_dict:
            out[key] = state_dict[plain]
            used.add(plain)
    out.update({k: v for k, v in state_dict.items() if k not in used})  # left for strict loading to report
    return out


def _unwrap(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The state dict inside a training checkpoint (``{'model': ...}``), without DDP's ``module.``."""
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def _timm_names(model: nn.Module) -> Dict[str, Tuple[str, bool]]:
    """Each key of the ADN model's state dict -> (its plain timm key, whether it is a skip-aware twin)."""
    wrappers = {name: m for name, m in model.named_modules() if isinstance(m, (SkipAware, Skippable))}
    names = {}
    for key in model.state_dict():
        parts, plain, twin = key.split("."), [], False
        for i, part in enumerate(parts):
            wrapper = wrappers.get(".".join(parts[:i]))
            if wrapper is None:
                plain.append(part)
            elif isinstance(wrapper, SkipAware):
                twin = twin or getattr(wrapper, part) is wrapper.skip
        names[key] = (".".join(plain), twin)
    return names


# The reference implementation (github.com/wchkang/depth, models/{resnet,vision_transformer,
# swin_transformer}.py) keeps torchvision's names and adds a twin ``<norm>_skip`` next to each
# skip-aware norm. A rule maps a reference key (``_skip`` removed) to the plain timm key. No tensor
# changes layout: torchvision's fused q-k-v rows (q, k, v; heads within), its 2x2 patch-merging order
# (rows 0/1 of column 0, then of column 1) and its relative-position index are timm's.
_ReferenceRule = Tuple[str, Union[str, Callable[["re.Match[str]"], str]]]


def _swin_feature(m: "re.Match[str]") -> str:
    """``features.<j>``: j = 2s is stage s's blocks, j = 2s - 1 the patch merging that opens stage s."""
    j, rest = int(m.group(1)), m.group(2)
    if j % 2:
        return f"layers.{(j + 1) // 2}.downsample.{rest}" if re.fullmatch(
            r"reduction\.weight|norm\.(?:weight|bias)", rest) else ""
    block = re.fullmatch(r"(\d+)\.(?:(norm[12]\.(?:weight|bias)|attn\.(?:qkv|proj)\.(?:weight|bias)"
                         r"|attn\.relative_position_bias_table)|mlp\.([03])\.(weight|bias))", rest)
    if block is None:
        return ""
    name = block.group(2) or f"mlp.fc{1 if block.group(3) == '0' else 2}.{block.group(4)}"
    return f"layers.{j // 2}.blocks.{block.group(1)}.{name}"


_REFERENCE_RULES: Dict[type, Tuple[str, List[_ReferenceRule]]] = {
    ResNet: ("models/resnet.py (conv1, bn1, layer<s>.<i>.{conv,bn}{1,2,3}[_skip], "
             "layer<s>.<i>.downsample.{0,1}, fc)", [
        (r"(?:conv1|bn1|fc)\.\w+|layer[1-4]\.\d+\.(?:conv[123]|bn[123]|downsample\.[01])\.\w+", r"\g<0>"),
    ]),
    VisionTransformer: ("models/vision_transformer.py (conv_proj, class_token, encoder.pos_embedding, "
                        "encoder.layers.encoder_layer_<i>.{ln_1,ln_2}[_skip], ...self_attention.{in_proj_*,"
                        "out_proj}, ...mlp.{0,3}, encoder.ln, heads.head)", [
        (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"class_token", "cls_token"),
        (r"encoder\.pos_embedding", "pos_embed"),
        (r"encoder\.layers\.encoder_layer_(\d+)\.ln_([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
        (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
        (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:0|linear_1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:3|linear_2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"encoder\.ln\.(weight|bias)", r"norm.\1"),
        (r"heads\.head\.(weight|bias)", r"head.\1"),
    ]),
    SwinTransformer: ("models/swin_transformer.py (pre.{0,2}, features.<2s>.<i>.{norm1,norm2}[_skip], "
                      "...attn.{qkv,proj,relative_position_bias_table}, ...mlp.{0,3}, "
                      "features.<2s-1>.{reduction,norm[_skip]}, norm, head)", [
        (r"pre\.0\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"pre\.2\.(weight|bias)", r"patch_embed.norm.\1"),
        (r"features\.(\d+)\.(.+)", _swin_feature),
        (r"norm\.(weight|bias)", r"norm.\1"),
        (r"head\.(weight|bias)", r"head.fc.\1"),
    ]),
}
_REFERENCE_KEY = re.compile(r"class_token|encoder\.layers\..*|pre\.0\.weight|features\.\d+\..*|.*_skip\..*")
_REFERENCE_DROPPED = re.compile(r".*\.relative_position_index|n_averaged")  # derived buffers, EMA counter


def _reference_rules(state_dict: Dict[str, Any], model: nn.Module) -> Optional[Tuple[str, List[_ReferenceRule]]]:
    """The model's rules if ``state_dict`` has the reference implementation's layout, else None."""
    if not any(_REFERENCE_KEY.fullmatch(k) for k in state_dict):
        return None
    return next((rules for cls, rules in _REFERENCE_RULES.items() if isinstance(model, cls)), None)


def _from_reference(state_dict: Dict[str, Any], model: nn.Module, layout: str,
                    rules: List[_ReferenceRule]) -> Dict[str, Any]:
    """A reference-layout state dict keyed by the ADN model's names; every key accounted for."""
    source = {}  # (plain timm key, twin) -> (reference key, tensor)
    for key, value in state_dict.items():
        if _REFERENCE_DROPPED.fullmatch(key):
            continue
        stripped = re.sub(r"_skip(?=\.)", "", key)
        match = next(((m, r) for p, r in rules if (m := re.fullmatch(p, stripped))), None)
        plain = "" if match is None else match[1](match[0]) if callable(match[1]) else match[0].expand(match[1])
        if not plain:
            raise ValueError(f"unexpected key {key!r} in an ADN reference checkpoint for {type(model).__name__}; "
                             f"expected the names of the reference {layout}")
        source[plain, stripped != key] = key, value
    has_twins = any(twin for _, twin in source)  # none: plain torchvision weights, twins start as copies
    names = _timm_names(model)
    out = {key: source[plain, twin and has_twins][1] for key, (plain, twin) in names.items()
           if (plain, twin and has_twins) in source}
    missing = [f"{k} ({'twin of ' if twin else ''}{plain})" for k, (plain, twin) in names.items() if k not in out]
    used = {(plain, twin and has_twins) for plain, twin in names.values()}
    unused = [ref for src, (ref, _) in source.items() if src not in used]
    if missing or unused:
        raise ValueError(f"the ADN reference checkpoint does not fit {type(model).__name__} (another architecture "
                         f"or depth split?): no weights for {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                         f"no place for {unused[:6]}{' ...' if len(unused) > 6 else ''}")
    return out


def _feature_cfg(kwargs: Dict[str, Any], num_levels: int, default: Union[int, Tuple[int, ...]], **cfg: Any) -> Dict[str, Any]:
    """The ``features_only`` config (timm's for the family), ``out_indices`` checked against the
    ``num_levels`` feature levels (an int n: the last n levels)."""
    out_indices = kwargs.pop("out_indices", default)
    if kwargs.get("features_only"):
        check_feature_indices(out_indices, num_levels, "ADN network")
    return dict(cfg, out_indices=out_indices)


def _create_adn(cls: Callable[..., nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """Build through timm's ``build_model_with_cfg``: pretrained weights (a plain timm, an ADN or the
    reference implementation's checkpoint, mapped by :func:`checkpoint_filter_fn`) and ``features_only``."""
    kwargs = keep_file_classifiers(variant, pretrained, kwargs)
    # the reference's training files keep their command line (an argparse.Namespace) beside the
    # weights: allowed through timm's weights-only load, which still refuses any other object
    with torch.serialization.safe_globals([argparse.Namespace]):
        return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _create_resnet_adn(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNetADN:
    feature_cfg = _feature_cfg(kwargs, 5, (0, 1, 2, 3, 4))  # stem, layer1..4; timm's FeatureListNet
    return _create_adn(ResNetADN, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


def _create_vision_transformer_adn(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformerADN:
    feature_cfg = _feature_cfg(kwargs, kwargs.get("depth", 12), 3, feature_cls="getter")  # the blocks
    return _create_adn(VisionTransformerADN, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


def _create_swin_transformer_adn(variant: str, pretrained: bool = False, **kwargs: Any) -> SwinTransformerADN:
    num_stages = len(kwargs.get("depths", (2, 2, 6, 2)))
    feature_cfg = _feature_cfg(kwargs, num_stages, tuple(range(num_stages)), flatten_sequential=True)
    return _create_adn(SwinTransformerADN, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    """The timm base model's cfg: its weights (``hf_hub_id``) load with twins copied."""
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None, 'fixed_input_size': True,
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'crop_mode': 'center',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0', **kwargs,
    }


def _rsb_cfg(url: str, hf_hub_id: str) -> Dict[str, Any]:
    """timm's ResNet Strikes Back weights (resnet18 / resnet50 ``a1_in1k``)."""
    return _cfg(
        url=url, hf_hub_id=hf_hub_id, input_size=(3, 224, 224), test_input_size=(3, 288, 288), pool_size=(7, 7),
        fixed_input_size=False, crop_pct=0.95, test_crop_pct=1.0, first_conv='conv1', classifier='fc',
        origin_url='https://github.com/huggingface/pytorch-image-models', paper_ids='arXiv:2110.00476')


default_cfgs = generate_default_cfgs({
    'resnet18_adn': _rsb_cfg(
        'https://github.com/huggingface/pytorch-image-models/releases/download/v0.1-rsb-weights/resnet18_a1_0-d63eafa0.pth',
        'timm/resnet18.a1_in1k'),
    'resnet50_adn': _rsb_cfg(
        'https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-rsb-weights/resnet50_a1_0-14fe96d1.pth',
        'timm/resnet50.a1_in1k'),
    'vit_tiny_patch16_224_adn': _cfg(
        url='https://storage.googleapis.com/vit_models/augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0'
            '--imagenet2012-steps_20k-lr_0.03-res_224.npz',
        hf_hub_id='timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k', custom_load=True,
        mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD),
    'vit_base_patch16_224_adn': _cfg(
        hf_hub_id='timm/vit_base_patch16_224.augreg2_in21k_ft_in1k',
        mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD),
    'deit_small_patch16_224_adn': _cfg(
        url='https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth',
        hf_hub_id='timm/deit_small_patch16_224.fb_in1k'),
    'swin_tiny_patch4_window7_224_adn': _cfg(
        url='https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth',
        hf_hub_id='timm/swin_tiny_patch4_window7_224.ms_in1k', pool_size=(7, 7), classifier='head.fc', license='mit'),
})


@register_model
def resnet18_adn(pretrained: bool = False, **kwargs) -> ResNetADN:
    """ResNet-18 ADN, 4 stages, mandatory blocks [1, 1, 1, 1], skippable [1, 1, 1, 1]."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_resnet_adn('resnet18_adn', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_adn(pretrained: bool = False, **kwargs) -> ResNetADN:
    """ResNet-50 ADN, 4 stages, mandatory blocks [2, 2, 3, 2], skippable [1, 2, 3, 1]."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_resnet_adn('resnet50_adn', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_tiny_patch16_224_adn(pretrained: bool = False, **kwargs) -> VisionTransformerADN:
    """ViT-Ti/16 ADN, 4 pseudo-stages of 3 blocks, the last of each skippable."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_vision_transformer_adn('vit_tiny_patch16_224_adn', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_base_patch16_224_adn(pretrained: bool = False, **kwargs) -> VisionTransformerADN:
    """ViT-B/16 ADN, 4 pseudo-stages of 3 blocks, the last of each skippable."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_vision_transformer_adn('vit_base_patch16_224_adn', pretrained, **dict(model_args, **kwargs))


@register_model
def deit_small_patch16_224_adn(pretrained: bool = False, **kwargs) -> VisionTransformerADN:
    """DeiT-S/16 ADN, 4 pseudo-stages of 3 blocks, the last of each skippable."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_vision_transformer_adn('deit_small_patch16_224_adn', pretrained, **dict(model_args, **kwargs))


@register_model
def swin_tiny_patch4_window7_224_adn(pretrained: bool = False, **kwargs) -> SwinTransformerADN:
    """Swin-T ADN, 4 stages, mandatory blocks [1, 1, 3, 1], skippable [1, 1, 3, 1]."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_swin_transformer_adn(
        'swin_tiny_patch4_window7_224_adn', pretrained, **dict(model_args, **kwargs))
