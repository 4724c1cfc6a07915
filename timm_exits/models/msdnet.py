"""MSDNet: Multi-Scale Dense Networks for anytime prediction (Huang et al., ICLR 2018).

Built exactly as the reference PyTorch implementation builds it (kalviny/MSDNet-PyTorch, also
used by IMTA and L2W-DEN), so per-exit parameters and costs match to the unit and reference
checkpoints load through :func:`checkpoint_filter_fn`:

* a grid of S scales; every layer appends ``growth_rate * gr_factor[s]`` channels at each kept
  scale, from a bottlenecked 3x3 on the same scale and (except on the finest kept scale) a
  strided one from the next finer scale, concatenated as ``[identity, down, normal]``;
* ``prune='max'`` drops the finest scale every ``ceil(L / S)`` layers, each drop followed by a
  1x1 transition that halves the base width (floor);
* after every block, an exit head reads the coarsest scale only.

The variants are registered below; ``registry/msdnet.yaml`` records where each comes from and its
expected per-exit cost.
"""

import copy
import math
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ConvNormAct, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .channels_last_norm import batch_norm_relu_2d, shared_input_conv_bn_relu
from .features import check_feature_indices
from .heads import classifier, reset_head_classifier
from .msdnet_fused import FusedMsdLayer, FusedStage, FusedTransition, full_pass, fuse_head, fuse_stage, fuse_stem
from .branch_gradients import detach_channels, scale_grad
from .multi_exit import MultiExitModel
from .pretrained import keep_file_classifiers

__all__ = ["MSDNet", "MsdStage", "LayerPlan", "msdnet_plan", "checkpoint_filter_fn"]

Factors = Union[str, Sequence[int]]


def _parse_factors(factors: Factors, name: str) -> Tuple[int, ...]:
    """Accept ``"1-2-4"`` (the reference's command-line form) or a sequence of ints."""
    if isinstance(factors, str):
        try:
            values = tuple(int(f) for f in factors.split("-"))
        except ValueError:
            raise ValueError(f"{name} must look like '1-2-4', got {factors!r}") from None
    else:
        values = tuple(int(f) for f in factors)
    if not values or min(values) < 1:
        raise ValueError(f"{name} needs at least one positive factor per scale, got {factors!r}")
    return values


@dataclass(frozen=True)
class LayerPlan:
    """One MSDN layer.

    Args:
        in_scales: the number of scales it reads (the coarsest ones).
        out_scales: the number of scales it writes.
        width: its input base width (a scale s has ``width * gr_factor[s]`` channels).
        transition_width: the base width after the transition that follows it; ``None``: no transition.
    """

    in_scales: int
    out_scales: int
    width: int
    transition_width: Optional[int]


def msdnet_plan(
        num_blocks: int,
        base: int,
        step: int,
        step_mode: str,
        num_channels: int,
        growth_rate: int,
        num_scales: int,
        prune: str = "max",
        reduction: float = 0.5,
) -> List[List[LayerPlan]]:
    """The layer schedule of an MSDNet, block by block, following the reference code (MSDNet-PyTorch,
    ``models/msdnet.py``).

    Args:
        num_blocks: the number of blocks (one exit after each).
        base: the number of layers of the first block.
        step: the layers of each later block: ``step`` (``even``) or ``step * k + 1`` for block k
            (``lin_grow``).
        step_mode: ``"even"`` or ``"lin_grow"``.
        num_channels: the base width of the first layer's input.
        growth_rate: the base width each layer adds.
        num_scales: the number of scales S.
        prune: ``"max"``: a scale is dropped every ``ceil(layers / scales)`` layers, a transition
            following each drop; ``"min"``: the scales shrink over the last layers and the transitions
            sit at one and two thirds of the layers.
        reduction: a transition keeps ``floor(reduction * width)``; 0: no transitions.

    Returns:
        One list of :class:`LayerPlan` per block.
    """
    if step_mode not in ("even", "lin_grow"):
        raise ValueError(f"step_mode must be 'even' or 'lin_grow', got {step_mode!r}")
    if prune not in ("max", "min"):
        raise ValueError(f"prune must be 'max' or 'min', got {prune!r}")
    if num_blocks < 1 or base < 1 or step < 1:
        raise ValueError(f"num_blocks, base and step must be >= 1, got {num_blocks}, {base}, {step}")
    steps = [base] + [step if step_mode == "even" else step * k + 1 for k in range(1, num_blocks)]
    total = sum(steps)
    interval = math.ceil(total / num_scales)
    width, layer, plan = num_channels, 0, []
    for n in steps:
        block = []
        for _ in range(n):
            layer += 1
            if prune == "max":
                in_scales = num_scales - max(0, layer - 2) // interval
                out_scales = num_scales - (layer - 1) // interval
                has_transition = in_scales > out_scales
            else:
                in_scales = min(num_scales, total - layer + 2)
                out_scales = min(num_scales, total - layer + 1)
                has_transition = layer in (total // 3, 2 * total // 3)
            new_width = width + growth_rate
            transition = math.floor(reduction * new_width) if has_transition and reduction > 0 else None
            block.append(LayerPlan(in_scales, out_scales, width, transition))
            width = transition if transition is not None else new_width
        plan.append(block)
    return plan


def _channels_last_training(x: torch.Tensor) -> bool:
    """Whether ``x`` runs the channels-last training path (never while torch.fx traces)."""
    return not torch.fx._symbolic_trace.is_fx_symbolic_tracing() and x.is_contiguous(memory_format=torch.channels_last)


def _conv_bn_relu(in_chs: int, out_chs: int, kernel_size: int, **kwargs) -> ConvNormAct:
    """conv-BN-ReLU whose batch norm trains channels-last inputs on the fast exact path
    (:mod:`timm_exits.models.channels_last_norm`)."""
    return ConvNormAct(in_chs, out_chs, kernel_size, norm_layer=batch_norm_relu_2d, **kwargs)


class BottleneckConv(nn.Module):
    """1x1 bottleneck then a 3x3 conv, each with BN-ReLU.

    Args:
        in_chs: the input channels.
        out_chs: the output channels.
        stride: the 3x3 conv's stride.
        bottleneck: have the 1x1 bottleneck (else the 3x3 conv alone).
        bn_factor: the bottleneck's width is ``min(in_chs, bn_factor * out_chs)``.
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, bottleneck: bool, bn_factor: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        mid_chs = min(in_chs, bn_factor * out_chs) if bottleneck else in_chs
        self.reduce = _conv_bn_relu(in_chs, mid_chs, 1, **dd) if bottleneck else nn.Identity()
        self.conv = _conv_bn_relu(mid_chs, out_chs, 3, stride=stride, padding=1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.reduce(x))


class ScaleUnit(nn.Module):
    """One scale of an MSDN layer: ``concat(x, down(finer x), normal(x))``.

    Args:
        in_chs: the channels of this scale's input.
        fine_chs: the channels of the next finer scale's input; ``None``: no ``down`` path (the finest
            kept scale).
        growth: the channels it adds (half from each path when there are two).
        bottleneck: 1x1 bottlenecks before the 3x3 convs.
        bn_factor: the bottleneck width factor of the ``normal`` path (see :class:`BottleneckConv`).
        fine_bn_factor: that of the ``down`` path.
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(
            self,
            in_chs: int,
            fine_chs: Optional[int],
            growth: int,
            bottleneck: bool,
            bn_factor: int,
            fine_bn_factor: int,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if fine_chs is None:
            self.down = None
            self.normal = BottleneckConv(in_chs, growth, 1, bottleneck, bn_factor, **dd)
        else:
            self.down = BottleneckConv(fine_chs, growth // 2, 2, bottleneck, fine_bn_factor, **dd)
            self.normal = BottleneckConv(in_chs, growth // 2, 1, bottleneck, bn_factor, **dd)

    def forward(self, x: torch.Tensor, fine: Optional[torch.Tensor]) -> torch.Tensor:
        if self.down is None or fine is None:
            return torch.cat([x, self.normal(x)], 1)
        return torch.cat([x, self.down(fine), self.normal(x)], 1)


class MsdLayer(nn.Module):
    """A dense layer across the kept scales; drops the finest input scale if the plan says so.

    Args:
        plan: the layer's scales and width.
        growth_rate: the base width it adds.
        gr: the width factor of every scale, finest first.
        bn: the bottleneck width factor of every scale.
        bottleneck: 1x1 bottlenecks before the 3x3 convs.
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    __jit_unused_properties__ = ["has_bottleneck", "complete"]  # read when fusing, not in forward

    def __init__(
            self,
            plan: LayerPlan,
            growth_rate: int,
            gr: Tuple[int, ...],
            bn: Tuple[int, ...],
            bottleneck: bool,
            device=None,
            dtype=None,
    ):
        super().__init__()
        num_scales = len(gr)
        offset = num_scales - plan.out_scales
        self.discard = plan.in_scales - plan.out_scales
        c = plan.width
        units = []
        for s in range(offset, num_scales):
            has_fine = s > offset or self.discard > 0
            units.append(ScaleUnit(
                c * gr[s], c * gr[s - 1] if has_fine else None, growth_rate * gr[s],
                bottleneck, bn[s], bn[s - 1] if has_fine else 1, device=device, dtype=dtype,
            ))
        self.units = nn.ModuleList(units)
        reads = {}  # input scale index -> [(unit index, path)] reading it
        for k, unit in enumerate(self.units):
            if unit.down is not None:
                reads.setdefault(k + self.discard - 1, []).append((k, "down"))
            reads.setdefault(k + self.discard, []).append((k, "normal"))
        self.reads = dict(sorted(reads.items()))

    @property
    def has_bottleneck(self) -> bool:
        return self.complete and isinstance(self.units[0].normal.reduce, ConvNormAct)

    @property
    def complete(self) -> bool:
        """False once feature-extractor pruning replaced unread units (see :class:`UnreadPath`)."""
        return all(isinstance(u, ScaleUnit) for u in self.units)

    def fuse(self) -> nn.Module:
        """The inference form, a new module (``timm.utils.reparameterize_model`` calls this); a layer
        pruned of unread paths is copied unfused."""
        return FusedMsdLayer(self) if self.complete else copy.deepcopy(self)

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        if not torch.jit.is_scripting():
            if self.training and self.has_bottleneck and _channels_last_training(xs[0]):
                return self._forward_shared_bottlenecks(xs)
        out = []
        for k, unit in enumerate(self.units):
            a = k + self.discard
            fine: Optional[torch.Tensor] = None
            if a > 0:
                fine = xs[a - 1]
            out.append(unit(xs[a], fine))
        return out

    def _forward_shared_bottlenecks(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        """Channels-last training: the 1x1 bottlenecks that read the same scale (this scale's
        normal path, the next scale's down path) run as one convolution and one batch norm."""
        mids = {}
        for j, users in self.reads.items():
            reduces = [getattr(self.units[k], path).reduce for k, path in users]
            mids.update(zip(users, shared_input_conv_bn_relu(xs[j], reduces)))
        out = []
        for k, unit in enumerate(self.units):
            pieces = [xs[k + self.discard]]
            if unit.down is not None:
                pieces.append(unit.down.conv(mids[(k, "down")]))
            pieces.append(unit.normal.conv(mids[(k, "normal")]))
            out.append(torch.cat(pieces, 1))
        return out


class UnreadPath(nn.Module):
    """Stands in for a scale unit or transition conv whose output nothing reads (after
    :meth:`MSDNet.prune_intermediate_layers`): returns its input, computes nothing."""

    def forward(self, x: torch.Tensor, fine: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x


def _drop_unread_paths(stage: nn.Module, needed: set) -> set:
    """Replace the units of ``stage`` whose output scales (indices into its output list) are not in
    ``needed`` by :class:`UnreadPath`; returns the input scales the rest read."""
    for module in reversed(list(stage)):
        paths = module.convs if isinstance(module, Transition) else module.units
        for k in range(len(paths)):
            if k not in needed:
                paths[k] = UnreadPath()
        if isinstance(module, MsdLayer):
            needed = {k + module.discard for k in needed} | {
                k + module.discard - 1 for k in needed if module.units[k].down is not None}
    return needed


class Transition(nn.Module):
    """1x1 conv-BN-ReLU on every kept scale, compressing the base width.

    Args:
        in_width: the base width before it.
        out_width: the base width after it.
        gr: the width factor of every kept scale (a scale has ``width * g`` channels).
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    __jit_unused_properties__ = ["complete"]  # read when fusing, not in forward

    def __init__(self, in_width: int, out_width: int, gr: Sequence[int], device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.convs = nn.ModuleList([_conv_bn_relu(in_width * g, out_width * g, 1, **dd) for g in gr])

    @property
    def complete(self) -> bool:
        """False once feature-extractor pruning replaced unread convs (see :class:`UnreadPath`)."""
        return all(isinstance(c, ConvNormAct) for c in self.convs)

    def fuse(self) -> nn.Module:
        """The inference form, a new module (batch norms folded); a transition pruned of unread paths
        is copied unfused."""
        return FusedTransition(self) if self.complete else copy.deepcopy(self)

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        return [conv(xs[i]) for i, conv in enumerate(self.convs)]


class MsdStem(nn.Module):
    """One feature map per scale: a first conv, then a chain of 3x3/2 convs for the coarser scales.

    Args:
        in_chans: the input channels.
        widths: the channels of every scale, finest first.
        stem_type: ``"cifar"`` (a 3x3 conv) or ``"imagenet"`` (a 7x7/2 conv with bias and a 3x3/2
            max-pool).
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(self, in_chans: int, widths: Sequence[int], stem_type: str, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if stem_type == "imagenet":
            first = _conv_bn_relu(in_chans, widths[0], 7, stride=2, padding=3, bias=True, **dd)
            self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        elif stem_type == "cifar":
            first = _conv_bn_relu(in_chans, widths[0], 3, padding=1, **dd)
            self.pool = nn.Identity()
        else:
            raise ValueError(f"stem_type must be 'cifar' or 'imagenet', got {stem_type!r}")
        coarser = [_conv_bn_relu(widths[s - 1], widths[s], 3, stride=2, padding=1, **dd) for s in range(1, len(widths))]
        self.convs = nn.ModuleList([first] + coarser)

    def fuse(self) -> nn.Module:
        """A copy with the batch norms folded, for inference."""
        return fuse_stem(self)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        out: List[torch.Tensor] = []
        for s, conv in enumerate(self.convs):
            x = self.pool(conv(x)) if s == 0 else conv(x)
            out.append(x)
        return out


def _head_pool(global_pool: str, num_classes: int) -> nn.Module:
    """The exit heads' 2x2 average pool (``'avg'``), or none (``''``: unpooled maps, no classifier)."""
    if global_pool not in ("avg", ""):
        raise ValueError(f"MSDNet heads pool with a fixed 2x2 average ('avg') or not at all (''), got {global_pool!r}")
    if not global_pool and num_classes:
        raise ValueError("global_pool='' (unpooled head output) needs num_classes=0: a classifier reads pooled features")
    return nn.AvgPool2d(2) if global_pool else nn.Identity()


class MsdHead(nn.Module):
    """Exit head on the coarsest scale: two 3x3/2 conv-BN-ReLU (its unpooled features), 2x2 average
    pool, linear.

    Args:
        in_chs: the channels of the coarsest scale.
        width: the channels of its convs.
        num_classes: the number of logits; 0: no linear layer (the head gives features).
        drop_rate: dropout before the linear layer.
        global_pool: ``"avg"`` (the 2x2 average) or ``""`` (unpooled maps; needs ``num_classes=0``).
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(self, in_chs: int, width: int, num_classes: int, drop_rate: float = 0.0, global_pool: str = "avg",
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv1 = _conv_bn_relu(in_chs, width, 3, stride=2, padding=1, **dd)
        self.conv2 = _conv_bn_relu(width, width, 3, stride=2, padding=1, **dd)
        self.global_pool = global_pool
        self.pool = _head_pool(global_pool, num_classes)
        self.drop = nn.Dropout(drop_rate)
        self.fc = classifier(width, num_classes, **dd)

    def fuse(self) -> nn.Module:
        """A copy with the batch norms folded, for inference."""
        return fuse_head(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The pool and classifier.

        Args:
            x: the head's unpooled features (:meth:`forward_features`).
            pre_logits: return the pooled features instead of the logits.

        Returns:
            The logits ``(batch, classes)``, or the features.
        """
        x = self.pool(x)
        if self.global_pool:
            x = x.flatten(1)
        return x if pre_logits else self.fc(self.drop(x))

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits)


class ScaleSequential(nn.Sequential):
    """Modules run in sequence on a list of per-scale tensors."""

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        for layer in self:
            xs = layer(xs)
        return xs


class MsdStage(ScaleSequential):
    """The layers (and transitions) between two exits. ``in_widths``, the channels of each input
    scale, is set by :class:`MSDNet` for the fused inference path (:mod:`.msdnet_fused`)."""

    in_widths: Tuple[int, ...] = ()
    __jit_ignored_attributes__ = ["in_widths"]  # used when fusing, not in forward

    def fuse(self) -> nn.Module:
        """The inference form, a new module (``timm.utils.reparameterize_model`` calls this)."""
        return fuse_stage(self)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_input(x: torch.Tensor, in_chans: int, img_size: Tuple[int, int], family: str) -> None:
    """The family's heads are built for one resolution: refuse any other input shape."""
    if x.dim() != 4 or x.shape[1] != in_chans or x.shape[2] != img_size[0] or x.shape[3] != img_size[1]:
        raise ValueError(
            f"{family} expects images of shape (batch, {in_chans}, {img_size[0]}, {img_size[1]}), got "
            f"({', '.join([str(d) for d in x.shape])}); "
            f"its heads are built for this resolution (set img_size / in_chans when creating the model)")


torch.fx.wrap("_check_input")  # a call in traced graphs, not control flow on traced shapes


def _fast_training_input(x: torch.Tensor) -> bool:
    """Whether a training input takes the channels-last path: fp32 on CPU (under bf16 autocast
    channels-first is faster), and never while torch.fx traces."""
    return (not torch.fx._symbolic_trace.is_fx_symbolic_tracing() and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu"))


class MSDNet(MultiExitModel):
    """Multi-Scale Dense Network with one exit per block.

    Arguments mirror the reference command line (``--nBlocks`` is ``num_blocks``,
    ``--nChannels`` is ``num_channels``, ``--grFactor 1-2-4`` is ``gr_factor="1-2-4"``, ...).
    ``stem_type`` and ``head_channels`` replace the reference's ``--data`` switch: CIFAR uses the
    3x3 stem and 128-wide heads, ImageNet the 7x7 stem and heads as wide as their input.

    Args:
        num_blocks, base, step, step_mode, num_channels, growth_rate, prune, reduction: the layer
            schedule (see :func:`msdnet_plan`); ``num_blocks`` is the number of exits.
        gr_factor: the width factor of every scale, finest first (``"1-2-4"`` or a sequence): a scale
            has ``base width * factor`` channels and grows by ``growth_rate * factor``; its length is
            the number of scales.
        bn_factor: the bottleneck width factor of every scale (see :class:`BottleneckConv`), one per
            scale, in the same form.
        bottleneck: 1x1 bottlenecks before the layers' 3x3 convs.
        stem_type: ``"cifar"`` (a 3x3 conv) or ``"imagenet"`` (a 7x7/2 conv and a 3x3/2 max-pool).
        head_channels: the width of the exit heads' convs; ``None``: as wide as their input.
        num_classes: the number of classes; 0: the exits give pooled features.
        in_chans: the input channels.
        img_size: the input resolution, an int or (H, W); the heads are built for it, so other input
            sizes are refused.
        global_pool: the heads' pooling: ``"avg"`` (a 2x2 average) or ``""`` (unpooled maps; needs
            ``num_classes=0``).
        drop_rate: dropout before each exit's linear layer.
        weight_init: ``'torch'`` is what the reference effectively trains with (its He init never
            reaches a layer); ``'he'`` is the paper's and the Lua code's (see :meth:`init_weights`).
        channels_last_training: in training on CPU, run channels-last with batch norms computed
            channels-first and shared-input 1x1 bottlenecks merged (the same function, faster in fp32;
            :mod:`timm_exits.models.channels_last_norm`); ``False`` trains the straightforward way.
        multi_exit_training: ``model(x)`` in training mode returns every exit's logits (the default) or,
            ``False``, the last exit's alone (see :meth:`~.MultiExitModel.set_multi_exit_training`).
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(
            self,
            num_blocks: int = 5,
            base: int = 4,
            step: int = 4,
            step_mode: str = "even",
            num_channels: int = 32,
            growth_rate: int = 16,
            gr_factor: Factors = (1, 2, 4, 4),
            bn_factor: Factors = (1, 2, 4, 4),
            prune: str = "max",
            reduction: float = 0.5,
            bottleneck: bool = True,
            stem_type: str = "imagenet",
            head_channels: Optional[int] = None,
            num_classes: int = 1000,
            in_chans: int = 3,
            img_size: Union[int, Tuple[int, int]] = 224,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            weight_init: str = "torch",
            channels_last_training: bool = True,
            multi_exit_training: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        gr = _parse_factors(gr_factor, "gr_factor")
        bn = _parse_factors(bn_factor, "bn_factor")
        if len(gr) != len(bn):
            raise ValueError(f"gr_factor and bn_factor need one entry per scale, got {len(gr)} and {len(bn)}")
        if len(gr) > 1 and any(growth_rate * g % 2 for g in gr[1:]):
            raise ValueError(
                f"growth_rate * gr_factor must be even on every scale but the finest (the new channels are split "
                f"between the down and normal paths), got growth_rate={growth_rate}, gr_factor={gr}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.family = "MSDNet"  # the name input errors give
        self.img_size = to_2tuple(img_size)
        self.drop_rate = drop_rate
        self.channels_last_training = channels_last_training
        self.multi_exit_training = multi_exit_training
        self.plan = msdnet_plan(num_blocks, base, step, step_mode, num_channels, growth_rate, len(gr), prune, reduction)

        self.stem = MsdStem(in_chans, [num_channels * g for g in gr], stem_type, **dd)
        stages, exits, stage_widths, exit_widths = [], [], [], []
        for block in self.plan:
            layers: List[nn.Module] = []
            for p in block:
                layers.append(MsdLayer(p, growth_rate, gr, bn, bottleneck, **dd))
                if p.transition_width is not None:
                    kept = gr[len(gr) - p.out_scales:]
                    layers.append(Transition(p.width + growth_rate, p.transition_width, kept, **dd))
            stages.append(MsdStage(*layers))
            last = block[-1]
            width = last.transition_width if last.transition_width is not None else last.width + growth_rate
            in_chs = width * gr[-1]
            head_width = head_channels or in_chs
            exits.append(MsdHead(in_chs, head_width, num_classes, drop_rate, global_pool, **dd))
            stage_widths.append(in_chs)
            exit_widths.append(head_width)
        for b, stage in enumerate(stages):
            first = self.plan[b][0]
            stage.in_widths = tuple(first.width * g for g in gr[len(gr) - first.in_scales:])
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(exits)
        self.num_exits = len(exits)
        self.exit_index = self.num_exits - 1
        self.stage_widths = stage_widths
        self.exit_widths = exit_widths
        self.num_features = self.head_hidden_size = exit_widths[-1]
        self._check_img_size(stem_type, len(gr))
        self.feature_info = [
            dict(num_chs=w, reduction=self._coarse_reduction, module=f"stages.{i}") for i, w in enumerate(stage_widths)]
        self.grad_checkpointing = False
        self.init_weights(weight_init)

    def _check_img_size(self, stem_type: str, num_scales: int) -> None:
        sizes = []
        for size in self.img_size:
            if stem_type == "imagenet":
                size = _conv_out(_conv_out(size, 7, 2, 3), 3, 2, 1)
            for _ in range(num_scales - 1):
                size = _conv_out(size, 3, 2, 1)
            coarse = size
            size = _conv_out(_conv_out(size, 3, 2, 1), 3, 2, 1) // 2
            sizes.append((coarse, size))
        if any(s != 1 for _, s in sizes):
            raise ValueError(
                f"MSDNet exit heads (two stride-2 convs and a 2x2 average pool) must reduce the coarsest scale to "
                f"1x1; img_size={self.img_size} gives a {sizes[0][0]}x{sizes[1][0]} coarsest scale and "
                f"{sizes[0][1]}x{sizes[1][1]} head outputs. The reference uses 32x32 with 3 scales (CIFAR) and "
                f"224x224 with 4 scales (ImageNet).")
        self._coarse_reduction = self.img_size[0] // sizes[0][0]

    @torch.no_grad()
    def init_weights(self, scheme: str = "torch") -> None:
        """``'torch'``: keep PyTorch's default init; ``'he'``: He fan-out normal convs, BN 1/0,
        zero conv and linear biases (the MSDNet paper / Lua code)."""
        if scheme == "torch":
            return
        if scheme != "he":
            raise ValueError(f"weight_init must be 'torch' or 'he', got {scheme!r}")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1)
                m.bias.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.zero_()

    def scale_state_grad(self, state: List[torch.Tensor], factor: float) -> List[torch.Tensor]:
        """Gradient Equilibrium acts on the coarsest scale only, as in the IMTA reference; gradients
        crossing blocks through finer scales are not rescaled."""
        return state[:-1] + [scale_grad(state[-1], factor)]

    def split_state_grad(self, state: List[torch.Tensor], keep: float) -> List[torch.Tensor]:
        """Deep Feature Surgery splits the coarsest scale only (the one the exits read), as the DFS
        reference; the finer scales pass the next stage's gradient whole."""
        return state[:-1] + [detach_channels(state[-1], keep, 1)]

    def forward_stem(self, x: torch.Tensor) -> List[torch.Tensor]:
        _check_input(x, self.in_chans, self.img_size, self.family)
        if not torch.jit.is_scripting():
            if self.channels_last_training and self.training and _fast_training_input(x):
                x = x.contiguous(memory_format=torch.channels_last)
        return self.stem(x)

    # The loops over ModuleLists below (instead of indexing them) keep the model scriptable.
    def forward_stage(self, state: List[torch.Tensor], index: int) -> List[torch.Tensor]:
        for i, stage in enumerate(self.stages):
            if i == index:
                if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                    return checkpoint(stage, state, use_reentrant=False)
                return stage(state)
        raise IndexError(f"stage index {index} out of range for {len(self.stages)} stages")

    def _exit_features(self, state: List[torch.Tensor], index: int) -> torch.Tensor:
        for i, head in enumerate(self.exits):
            if i == index:
                return head.forward_features(state[-1])
        raise IndexError(f"exit index {index} out of range for {len(self.exits)} exit heads")

    def _exit_head(self, x: torch.Tensor, index: int, pre_logits: bool = False) -> torch.Tensor:
        for i, head in enumerate(self.exits):
            if i == index:
                return head.forward_head(x, pre_logits)
        raise IndexError(f"exit index {index} out of range for {len(self.exits)} exit heads")

    def forward_exit(self, state: List[torch.Tensor], index: int, pre_logits: bool = False) -> torch.Tensor:
        for i, head in enumerate(self.exits):
            if i == index:
                return head(state[-1], pre_logits)
        raise IndexError(f"exit index {index} out of range for {len(self.exits)} exit heads")

    @torch.jit.unused
    def _fused_pass_logits(self, x: torch.Tensor, last: int, every: bool) -> Optional[List[torch.Tensor]]:
        """If stages 0..``last`` are fused (:class:`~.msdnet_fused.FusedStage`): the logits of exits
        0..``last`` (``every``) or of exit ``last`` alone, from one pass whose buffers reach across stages
        (:func:`~.msdnet_fused.full_pass`); else None."""
        stages = list(self.stages)[:last + 1]
        if not 0 <= last < len(self.stages) or not all(isinstance(s, FusedStage) for s in stages):
            return None
        states = full_pass(stages, self.forward_stem(x))
        if every:  # every stage first, then the heads, as MultiExitModel.forward_exits
            return [self.forward_exit(s, i) for i, s in enumerate(list(states))]
        for state in states:  # keeping only the state the last head reads
            pass
        return [self.forward_exit(state, last)]

    def forward_exits(self, x: torch.Tensor, last: Optional[int] = None) -> List[torch.Tensor]:
        """:meth:`MultiExitModel.forward_exits`; on fused stages, one full pass (:mod:`.msdnet_fused`; the
        training switches change gradients only, which fused stages do not compute)."""
        n = self.num_exits if last is None else last + 1
        logits = self._fused_pass_logits(x, n - 1, every=True)
        return super().forward_exits(x, last) if logits is None else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`MultiExitModel.forward` (written out: TorchScript has no ``super()``); on fused stages,
        one full pass up to the active exit (:mod:`.msdnet_fused`)."""
        k = self.exit_index
        if not torch.jit.is_scripting():
            if self.training and self.multi_exit_training:
                return self.forward_train_outputs(x)
            logits = self._fused_pass_logits(x, k, every=False)
            if logits is not None:
                return logits[0]
        return self.forward_exit(self.forward_until(x, k), k)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The active exit's unpooled features: its head's convolutions on the coarsest scale after its
        stage (``pretrained_cfg['pool_size']`` maps of ``num_features`` channels for the last exit)."""
        return self._exit_features(self.forward_until(x, self.exit_index), self.exit_index)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The active exit's pool and classifier.

        Args:
            x: the output of :meth:`forward_features`.
            pre_logits: return the pooled features instead of the logits.

        Returns:
            The logits ``(batch, classes)``, or the features.
        """
        return self._exit_head(x, self.exit_index, pre_logits)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: the coarsest-scale map after each selected stage (``feature_info``).

        Args:
            x: the input batch.
            indices: the stages: ``None`` for all, n for the last n, or a list of indices.
            norm: unused: MSDNet has no final norm.
            stop_early: the final features are those of the deepest selected stage's exit (if it comes
                before the active exit), and no later stage runs.
            output_fmt: ``"NCHW"``, the only format.
            intermediates_only: return the maps alone.

        Returns:
            The list of maps with ``intermediates_only``, else ``(features, maps)`` with the
            :meth:`forward_features` output.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"MSDNet's feature maps are NCHW, got output_fmt={output_fmt!r}")
        check_feature_indices(indices, len(self.stages), "MSDNet")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        final_index = min(self.exit_index, max_index) if stop_early else self.exit_index
        last = max_index if intermediates_only else max(max_index, final_index)
        intermediates, features = [], None
        state = self.forward_stem(x)
        for i in range(last + 1):
            state = self.forward_stage(state, i)
            if i in take_indices:
                intermediates.append(state[-1])
            if i == final_index and not intermediates_only:
                features = self._exit_features(state, i)
        if intermediates_only:
            return intermediates
        return features, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and exits) after the deepest of ``indices``, and the finer-scale paths
        whose output no kept stage or exit reads.

        Args:
            indices: the stages kept for :meth:`forward_intermediates` (as it takes them).
            prune_norm: unused: MSDNet has no final norm.
            prune_head: the exit heads go too (what timm's ``features_only`` wrapper does), leaving a
                feature extractor whose ``forward_intermediates(..., intermediates_only=True)`` uses
                every parameter.

        Returns:
            The indices of the stages whose maps are taken.
        """
        check_feature_indices(indices, len(self.stages), "MSDNet")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        needed: set = set()  # scales of a stage's output read by the next stage
        for i in reversed(range(max_index + 1)):
            num_scales = self.plan[i][-1].out_scales
            needed = _drop_unread_paths(self.stages[i], needed | {num_scales - 1})  # + the coarsest
        self.exits = nn.ModuleList() if prune_head else self.exits[:max_index + 1]
        self.num_exits = len(self.stages)
        self.exit_index = min(self.exit_index, self.num_exits - 1)
        return take_indices

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise lr decay: the stem, then the stages; every exit head is
        unmatched, so timm puts it in the last group, the head's: new heads learn at the full rate."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.exits[self.exit_index].fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New linear layers on every exit.

        Args:
            num_classes: their number of outputs; 0: pooled features.
            global_pool: ``""`` (with ``num_classes=0``) makes ``model(x)`` return the unpooled head
                maps, ``"avg"`` pools them; ``None`` keeps each head's (pooled where a classifier needs it).
        """
        for head, width in zip(self.exits, self.exit_widths):
            pool = head.global_pool if global_pool is None else global_pool
            if global_pool is None and not pool and num_classes:
                pool = "avg"  # a classifier reads pooled features
            head.pool = _head_pool(pool, num_classes)
            head.global_pool = pool
            reset_head_classifier(head, width, num_classes)
            head.train(head.training)  # the new modules follow the head's mode
        self.num_classes = num_classes


_STEM = [(r"layers\.0\.0\.", "convs.0.conv."), (r"layers\.0\.1\.", "convs.0.bn."),
         (r"layers\.(\d+)\.net\.0\.", r"convs.\1.conv."), (r"layers\.(\d+)\.net\.1\.", r"convs.\1.bn.")]
_HEAD = [(r"m\.0\.net\.0\.", "conv1.conv."), (r"m\.0\.net\.1\.", "conv1.bn."),
         (r"m\.1\.net\.0\.", "conv2.conv."), (r"m\.1\.net\.1\.", "conv2.bn."), (r"linear\.", "fc.")]
_TRANSITION = [(r"m\.(\d+)\.net\.0\.", r"convs.\1.conv."), (r"m\.(\d+)\.net\.1\.", r"convs.\1.bn.")]
# the reference's "ConvBN" is Sequential(conv1x1, bn, relu, conv3x3, bn, relu) with the bottleneck
_BRANCH = {True: {"0": "reduce.conv", "1": "reduce.bn", "3": "conv.conv", "4": "conv.bn"},
           False: {"0": "conv.conv", "1": "conv.bn"}}


def _map_reference_key(key: str, bottleneck: bool) -> str:
    def sub(rules, rest: str, prefix: str) -> str:
        for pattern, repl in rules:
            m = re.match(pattern, rest)
            if m:
                return prefix + m.expand(repl) + rest[m.end():]
        raise KeyError(key)

    m = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)$", key)
    if m:
        block, index, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if block == 0 and index == 0:
            return sub(_STEM, rest, "stem.")
        index -= block == 0  # the reference keeps its stem as element 0 of block 0
        prefix = f"stages.{block}.{index}."
        u = re.match(r"layers\.(\d+)\.conv_(down|normal)\.net\.(\d)\.(.*)$", rest)
        if u and u.group(3) in _BRANCH[bottleneck]:
            return f"{prefix}units.{u.group(1)}.{u.group(2)}.{_BRANCH[bottleneck][u.group(3)]}.{u.group(4)}"
        return sub(_TRANSITION, rest, prefix)
    m = re.match(r"classifier\.(\d+)\.(.*)$", key)
    if m:
        return sub(_HEAD, m.group(2), f"exits.{m.group(1)}.")
    raise KeyError(key)


def checkpoint_filter_fn(state_dict: dict, model: MSDNet) -> dict:
    """Map a reference checkpoint (kalviny/MSDNet-PyTorch, IMTA phase I, L2W-DEN) onto this model; a
    state dict in this package's own layout passes through unchanged.

    Args:
        state_dict: the checkpoint's state dict (reference keys ``blocks.*`` / ``classifier.*``, with
            ``module.`` already stripped by timm).
        model: the MSDNet it is loaded into (whether it has bottlenecks decides the mapping).

    Returns:
        The state dict keyed by the model's names.
    """
    if not any(k.startswith(("blocks.", "classifier.")) for k in state_dict):
        return state_dict
    bottleneck = any(isinstance(m, BottleneckConv) and isinstance(m.reduce, ConvNormAct) for m in model.modules())
    out = {}
    for key, value in state_dict.items():
        try:
            out[_map_reference_key(key, bottleneck)] = value
        except KeyError:
            raise ValueError(
                f"{key!r} is not a key of a reference MSDNet checkpoint (expected blocks.<b>.<i>.… or "
                f"classifier.<i>.…); is this file an MSDNet checkpoint?") from None
    return out


def _create_msdnet(variant: str, pretrained: bool = False, **kwargs) -> MSDNet:
    kwargs = keep_file_classifiers(variant, pretrained, kwargs)
    out_indices = kwargs.pop("out_indices", tuple(range(kwargs.get("num_blocks", 5))))
    return build_model_with_cfg(
        MSDNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _cfg(num_exits: int, **kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (2, 2), "crop_pct": 0.875,
        "interpolation": "bilinear", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "stem.convs.0.conv",
        "classifier": tuple(f"exits.{i}.fc" for i in range(num_exits)), "license": "mit", **kwargs,
    }


def _cifar_cfg(num_exits: int, **kwargs) -> dict:
    return _cfg(num_exits, num_classes=100, input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR100_MEAN,
                std=CIFAR100_STD, **kwargs)


# CIFAR-100 training-set statistics, as the reference code normalises
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

default_cfgs = generate_default_cfgs({
    "msdnet_imagenet_5exit": _cfg(5),
    "msdnet_imagenet_5exit_step6": _cfg(5),
    "msdnet_imagenet_5exit_step7": _cfg(5),
    "msdnet_cifar_7exit": _cifar_cfg(7),
    "msdnet_cifar_5exit": _cifar_cfg(5),
    "msdnet_cifar_anytime_7exit": _cifar_cfg(7),
    "msdnet_cifar_anytime_10exit": _cifar_cfg(10),
})

_IMAGENET_ARGS = dict(
    step_mode="even", num_channels=32, growth_rate=16, gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4),
    stem_type="imagenet", head_channels=None, num_classes=1000, img_size=224)
_CIFAR_ARGS = dict(
    num_channels=16, growth_rate=6, gr_factor=(1, 2, 4), bn_factor=(1, 2, 4), stem_type="cifar",
    head_channels=128, num_classes=100, img_size=32)


@register_model
def msdnet_imagenet_5exit(pretrained: bool = False, **kwargs) -> MSDNet:
    """MSDNet for ImageNet, 5 exits, 4 layers per block (the MSDNet-PyTorch and IMTA ImageNet network)."""
    model_args = dict(_IMAGENET_ARGS, num_blocks=5, base=4, step=4)
    return _create_msdnet("msdnet_imagenet_5exit", pretrained, **dict(model_args, **kwargs))


@register_model
def msdnet_imagenet_5exit_step6(pretrained: bool = False, **kwargs) -> MSDNet:
    """MSDNet for ImageNet, 5 exits, 6 layers per block (base = step, as IMTA's head widths require)."""
    model_args = dict(_IMAGENET_ARGS, num_blocks=5, base=6, step=6)
    return _create_msdnet("msdnet_imagenet_5exit_step6", pretrained, **dict(model_args, **kwargs))


@register_model
def msdnet_imagenet_5exit_step7(pretrained: bool = False, **kwargs) -> MSDNet:
    """MSDNet for ImageNet, 5 exits, 7 layers per block (base = step, as IMTA's head widths require)."""
    model_args = dict(_IMAGENET_ARGS, num_blocks=5, base=7, step=7)
    return _create_msdnet("msdnet_imagenet_5exit_step7", pretrained, **dict(model_args, **kwargs))


@register_model
def msdnet_cifar_7exit(pretrained: bool = False, **kwargs) -> MSDNet:
    """MSDNet for CIFAR, 7 exits, linearly growing blocks (IMTA Table 1 network)."""
    model_args = dict(_CIFAR_ARGS, num_blocks=7, base=1, step=1, step_mode="lin_grow")
    return _create_msdnet("msdnet_cifar_7exit", pretrained, **dict(model_args, **kwargs))


@register_model
def msdnet_cifar_5exit(pretrained: bool = False, **kwargs) -> MSDNet:
    """MSDNet for CIFAR, 5 exits, linearly growing blocks (MSDNet-PyTorch budgeted-setting network)."""
    model_args = dict(_CIFAR_ARGS, num_blocks=5, base=1, step=1, step_mode="lin_grow")
    return _create_msdnet("msdnet_cifar_5exit", pretrained, **dict(model_args, **kwargs))


@register_model
def msdnet_cifar_anytime_7exit(pretrained: bool = False, **kwargs) -> MSDNet:
    """MSDNet for CIFAR, 7 exits, 4 layers then 2 per block (MSDNet-PyTorch anytime network)."""
    model_args = dict(_CIFAR_ARGS, num_blocks=7, base=4, step=2, step_mode="even")
    return _create_msdnet("msdnet_cifar_anytime_7exit", pretrained, **dict(model_args, **kwargs))


@register_model
def msdnet_cifar_anytime_10exit(pretrained: bool = False, **kwargs) -> MSDNet:
    """MSDNet for CIFAR, 10 exits, 4 layers then 2 per block (the Lua anytime network)."""
    model_args = dict(_CIFAR_ARGS, num_blocks=10, base=4, step=2, step_mode="even")
    return _create_msdnet("msdnet_cifar_anytime_10exit", pretrained, **dict(model_args, **kwargs))
