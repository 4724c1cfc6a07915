"""RANet: Resolution Adaptive Networks (Yang et al., CVPR 2020).

Built exactly as the reference PyTorch implementation builds it (yangle15/RANet-pytorch,
``models/RANet.py``), so per-exit parameters and costs match to the unit and a checkpoint trained with
the reference code loads through :func:`checkpoint_filter_fn`:

* the stem computes every resolution up front (a first conv, then 3x3 convs that halve the resolution
  wherever ``scale_list`` steps up, keep it where it repeats);
* one *flow* per resolution, run from the lowest to the highest: flow ``f`` has
  ``num_blocks + f * block_step`` dense blocks; its first blocks (as many as the previous flow has)
  are *fusion* blocks, the rest plain dense blocks with an exit head after each;
* fusion block ``b`` reads the previous flow's block ``b``: each of its layers adds
  ``floor(growth * compress_factor)`` channels from a conv on the previous flow's matching feature,
  up-sampled bilinearly (corners aligned), and the block ends with a 1x1 conv of the previous block's
  last feature, also up-sampled and concatenated; the last layer of some fusion blocks is strided, the
  dense features then down-sampled bilinearly, so every flow reaches the lowest resolution before its
  exits;
* 1x1 transitions compress the width by ``reduction`` at ``scale_list[f] - 1`` evenly spaced blocks;
* the exit heads are MSDNet's (two 3x3/2 convs, a 2x2 average pool, a linear layer).

One stage per exit: a stage runs the blocks from the previous exit up to its own (for the first exit of
a flow, the flow's fusion blocks and its first plain block). The state between stages is a list of
tensors: the stem outputs of the flows not started yet, the per-layer features of the current flow's
blocks so far (the next flow fuses them; none in the last flow), and the current flow's tensor, last.
The variants are registered below; ``registry/ranet.yaml`` records where each comes from and its
expected per-exit cost.
"""

import math
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .features import check_feature_indices
from .msdnet import MSDNet, BottleneckConv, MsdHead, Factors, _cfg as _msdnet_cfg, _conv_bn_relu, _conv_out, _parse_factors
from .multi_exit import MultiExitModel
from .pretrained import keep_file_classifiers

__all__ = ["RANet", "RaBlockPlan", "ranet_plan", "checkpoint_filter_fn"]


@dataclass(frozen=True)
class RaBlockPlan:
    """One dense block of a flow.

    Args:
        flow: the flow (0: the lowest resolution).
        index: the block's index in its flow.
        layers: its number of layers.
        in_chs: its input channels.
        growth: the channels each layer adds.
        low_chs: the channels of the previous flow's features it fuses (one per layer, then the one its
            final 1x1 conv reads); empty for a plain block.
        down: its last layer is strided (a fusion block only).
        out_chs: its output channels (after the transition, if any).
        transition: it ends with a 1x1 transition.
        has_exit: an exit head reads its output.
    """

    flow: int
    index: int
    layers: int
    in_chs: int
    growth: int
    low_chs: Tuple[int, ...]
    down: bool
    out_chs: int
    transition: bool
    has_exit: bool

    @property
    def feature_chs(self) -> Tuple[int, ...]:
        """The channels of its per-layer features (its input, then each layer's output)."""
        return tuple(self.in_chs + j * self.growth for j in range(self.layers + 1))


def ranet_plan(
        num_blocks: int,
        block_step: int,
        step: int,
        step_mode: str,
        num_channels: int,
        growth_rate: int,
        gr_factor: Sequence[int],
        scale_list: Sequence[int],
        compress_factor: float,
        reduction: float,
) -> List[List[RaBlockPlan]]:
    """The blocks of a RANet, flow by flow, following the reference code (``models/RANet.py``).

    Args:
        num_blocks: the blocks of the first flow (``--nBlocks``).
        block_step: the blocks each later flow adds (``--block-step``).
        step: the layers of a block: ``step`` (``even``) or ``step * (b + 1)`` for the b-th block of a
            flow (``lg``).
        step_mode: ``"even"`` or ``"lg"``.
        num_channels: the base width of the stem (``--nChannels``).
        growth_rate: the base width each layer adds.
        gr_factor: the width factor of every flow, lowest resolution first.
        scale_list: the resolution level of every flow, lowest first (``1-2-3-3``: the last two flows
            share a resolution).
        compress_factor: the share of a fusion layer's new channels that come from the previous flow.
        reduction: a transition keeps ``floor(reduction * width)``.

    Returns:
        One list of :class:`RaBlockPlan` per flow.
    """
    if step_mode not in ("even", "lg"):
        raise ValueError(f"step_mode must be 'even' or 'lg', got {step_mode!r}")
    if len(scale_list) != len(gr_factor):
        raise ValueError(f"scale_list needs one entry per flow (gr_factor has {len(gr_factor)}), got {scale_list}")
    if num_blocks < 1 or block_step < 0 or step < 1:
        raise ValueError(f"num_blocks and step must be >= 1 and block_step >= 0, got {num_blocks}, {block_step}, {step}")
    if len(gr_factor) > 1 and step < 2:
        raise ValueError(f"a fusion block needs at least 2 layers (the reference cannot build 1), got step={step}")
    if any(math.floor(growth_rate * g * compress_factor) < 1 for g in gr_factor[1:]):
        raise ValueError(f"growth_rate * gr_factor * compress_factor must be >= 1 on every flow but the first (a fusion "
                         f"layer takes that many channels from the previous flow), got growth_rate={growth_rate}, "
                         f"gr_factor={tuple(gr_factor)}, compress_factor={compress_factor}")
    ends = [0] + [num_blocks + block_step * f for f in range(len(gr_factor))]  # blocks per flow, cumulative form
    plan: List[List[RaBlockPlan]] = []
    for f, (gr, scale) in enumerate(zip(gr_factor, scale_list)):
        growth, chs, flow = growth_rate * gr, num_channels * gr, []
        down_at = ends[:f + 1][-(scale - 1):]  # the reference's slice, quirks included (scale 1 keeps all)
        for b in range(ends[f + 1]):
            layers = step if step_mode == "even" else step * (b + 1)
            transition = any(b + 1 == math.floor((i + 1) * ends[f + 1] / scale) for i in range(scale - 1))
            fusion = b < ends[f]
            out = chs + layers * growth
            low: Tuple[int, ...] = ()
            if fusion:
                low = plan[f - 1][b].feature_chs
                out += math.floor(out * compress_factor)
            if transition:
                out = math.floor(reduction * out)
            flow.append(RaBlockPlan(f, b, layers, chs, growth, low, fusion and b + 1 in down_at, out, transition,
                                    not fusion))
            chs = out
        plan.append(flow)
    return plan


def _resize_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` resized to ``ref``'s resolution bilinearly with aligned corners, as the reference fuses."""
    return F.interpolate(x, size=(ref.shape[2], ref.shape[3]), mode="bilinear", align_corners=True)


torch.fx.wrap("_resize_to")  # a leaf of traced graphs: its size comes from a traced shape


class RaLayer(nn.Module):
    """A dense layer: ``concat(x, conv(x))``, or in a fusion block
    ``concat(x, up(low), conv(x))`` with ``x`` and ``up(low)`` resized to the output's resolution.

    Args:
        in_chs: the channels of ``x``.
        growth: the channels it adds.
        low_chs: the channels of the previous flow's feature it fuses; ``None``: a plain layer.
        low_growth: the channels of those it adds that come from ``low``.
        stride: the stride of the conv on ``x`` (2: the layer halves the resolution).
        bn_factor: the bottleneck width factor of the conv on ``x`` (see :class:`~.msdnet.BottleneckConv`).
        low_bn_factor: that of the conv on ``low``.
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(self, in_chs: int, growth: int, low_chs: Optional[int], low_growth: int, stride: int,
                 bn_factor: int, low_bn_factor: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if low_chs is None:
            self.up = None
            self.normal = BottleneckConv(in_chs, growth, 1, True, bn_factor, **dd)
        else:
            self.up = BottleneckConv(low_chs, low_growth, 1, True, low_bn_factor, **dd)
            self.normal = BottleneckConv(in_chs, growth - low_growth, stride, True, bn_factor, **dd)
        self.stride = stride

    def forward(self, x: torch.Tensor, low: Optional[torch.Tensor] = None) -> torch.Tensor:
        new = self.normal(x)
        if self.up is None or low is None:
            return torch.cat([x, new], 1)
        if self.stride > 1:
            x = _resize_to(x, new)
        return torch.cat([x, _resize_to(self.up(low), new), new], 1)


class RaBlock(nn.Module):
    """A dense block of a flow; a fusion block (``plan.low_chs``) fuses the previous flow's block.

    Args:
        plan: the block.
        compress_factor: the share of a fusion layer's new channels that come from the previous flow.
        bn_factor: the bottleneck width factor of this flow.
        low_bn_factor: that of the previous flow.
        low_start: where the previous flow's block starts in the flow's feature list.
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(self, plan: RaBlockPlan, compress_factor: float, bn_factor: int, low_bn_factor: int,
                 low_start: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        fusion = bool(plan.low_chs)
        low_growth = math.floor(plan.growth * compress_factor)
        self.layers = nn.ModuleList([
            RaLayer(c, plan.growth, plan.low_chs[j] if fusion else None, low_growth,
                    2 if plan.down and j == plan.layers - 1 else 1, bn_factor, low_bn_factor, **dd)
            for j, c in enumerate(plan.feature_chs[:-1])])
        width = plan.feature_chs[-1]
        self.fuse_low = _conv_bn_relu(plan.low_chs[-1], math.floor(width * compress_factor), 1, **dd) if fusion else None
        if fusion:
            width += math.floor(width * compress_factor)
        self.transition = _conv_bn_relu(width, plan.out_chs, 1, **dd) if plan.transition else None
        self.low_start = low_start

    def forward(self, x: torch.Tensor, low: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The block's output and its per-layer features (its input, then each layer's output).

        Args:
            x: the block's input.
            low: the previous flow's per-layer features, every block's in order (read by a fusion block).
        """
        features = [x]
        for j, layer in enumerate(self.layers):
            x = layer(x, low[self.low_start + j] if self.fuse_low is not None else None)
            features.append(x)
        if self.fuse_low is not None:
            x = torch.cat([x, _resize_to(self.fuse_low(low[self.low_start + len(self.layers)]), x)], 1)
        if self.transition is not None:
            x = self.transition(x)
        return x, features


class RaStage(nn.Module):
    """The blocks between two exits, on the state list (see the module docstring).

    Args:
        blocks: its blocks.
        num_pending: the number of stem outputs of flows not started yet in the state it reads.
        new_flow: it starts a flow (from the first of those stem outputs), fusing the features of the
            previous flow (the rest of the state).
        keep_features: keep the flow's per-layer features in the state (a later flow fuses them).
    """

    def __init__(self, blocks: Sequence[RaBlock], num_pending: int, new_flow: bool, keep_features: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.num_pending = num_pending
        self.new_flow = new_flow
        self.keep_features = keep_features

    def forward(self, state: List[torch.Tensor]) -> List[torch.Tensor]:
        features: List[torch.Tensor] = []
        low: List[torch.Tensor] = []
        if self.new_flow:  # [flow inputs..., previous flow's features..., previous flow's tensor]
            x = state[0]
            pending = state[1:self.num_pending]
            low = state[self.num_pending:len(state) - 1] if len(state) > self.num_pending else low
        else:  # [flow inputs..., this flow's features..., this flow's tensor]
            x = state[-1]
            pending = state[:self.num_pending]
            features = state[self.num_pending:len(state) - 1]
        for block in self.blocks:
            x, block_features = block(x, low)
            if self.keep_features:
                features = features + block_features
        return pending + features + [x]


class RaStem(nn.Module):
    """One feature map per flow: a first conv at the highest resolution, then a chain of 3x3 convs,
    strided where the next flow's resolution level is lower. Returns them lowest resolution first.

    Args:
        in_chans: the input channels.
        widths: the channels of every map, highest resolution first.
        strides: the stride of every conv of the chain after the first.
        stem_type: ``"cifar"`` (a 3x3 conv) or ``"imagenet"`` (a 7x7/2 conv with bias and a 3x3/2 max-pool).
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(self, in_chans: int, widths: Sequence[int], strides: Sequence[int], stem_type: str,
                 device=None, dtype=None):
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
        chain = [_conv_bn_relu(widths[s - 1], widths[s], 3, stride=strides[s - 1], padding=1, **dd)
                 for s in range(1, len(widths))]
        self.convs = nn.ModuleList([first] + chain)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        out: List[torch.Tensor] = []
        for s, conv in enumerate(self.convs):
            x = self.pool(conv(x)) if s == 0 else conv(x)
            out.insert(0, x)
        return out


class RANet(MSDNet):
    """Resolution Adaptive Network: one exit per plain block of each flow, flows from low to high resolution.

    Arguments mirror the reference command line (``--nBlocks`` is ``num_blocks``, ``--block-step`` is
    ``block_step``, ``--grFactor 4-2-1-1`` is ``gr_factor="4-2-1-1"``, ``--scale-list 1-2-3-3`` is
    ``scale_list="1-2-3-3"``, ...); ``stem_type`` and ``head_channels`` replace its ``--data`` switch, as
    for :class:`~.msdnet.MSDNet`, whose exit heads, input checks, timm head API and stage plumbing it
    shares (the reference network is built on MSDNet's code the same way).

    Args:
        num_blocks, block_step, step, step_mode, num_channels, growth_rate, compress_factor, reduction:
            the blocks (see :func:`ranet_plan`).
        gr_factor: the width factor of every flow, lowest resolution first (``"4-2-1"`` or a sequence);
            its length is the number of flows.
        bn_factor: the bottleneck width factor of every flow, in the same form.
        scale_list: the resolution level of every flow, lowest first, in the same form.
        stem_type: ``"cifar"`` (a 3x3 conv) or ``"imagenet"`` (a 7x7/2 conv and a 3x3/2 max-pool).
        head_channels: the width of the exit heads' convs; ``None``: as wide as their input.
        num_classes: the number of classes; 0: the exits give pooled features.
        in_chans: the input channels.
        img_size: the input resolution, an int or (H, W); the heads are built for it, so other input
            sizes are refused.
        global_pool: the heads' pooling: ``"avg"`` (a 2x2 average) or ``""`` (unpooled maps; needs
            ``num_classes=0``).
        drop_rate: dropout before each exit's linear layer.
        weight_init: ``'he'`` is what the reference does (He fan-out normal convs, BN 1/0, zero linear
            biases, in the flows and heads; the stem keeps PyTorch's init); ``'torch'``: PyTorch's
            default everywhere.
        channels_last_training: as :class:`~.msdnet.MSDNet`'s.
        multi_exit_training: ``model(x)`` in training mode returns every exit's logits (the default) or,
            ``False``, the last exit's alone (see :meth:`~.MultiExitModel.set_multi_exit_training`).
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(
            self,
            num_blocks: int = 2,
            block_step: int = 2,
            step: int = 4,
            step_mode: str = "even",
            num_channels: int = 16,
            growth_rate: int = 6,
            gr_factor: Factors = (4, 2, 1),
            bn_factor: Factors = (4, 2, 1),
            scale_list: Factors = (1, 2, 3),
            compress_factor: float = 0.25,
            reduction: float = 0.5,
            stem_type: str = "cifar",
            head_channels: Optional[int] = 128,
            num_classes: int = 10,
            in_chans: int = 3,
            img_size: Union[int, Tuple[int, int]] = 32,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            weight_init: str = "he",
            channels_last_training: bool = True,
            multi_exit_training: bool = True,
            device=None,
            dtype=None,
    ):
        MultiExitModel.__init__(self)
        dd = dict(device=device, dtype=dtype)
        gr = _parse_factors(gr_factor, "gr_factor")
        bn = _parse_factors(bn_factor, "bn_factor")
        scales = _parse_factors(scale_list, "scale_list")
        if len(bn) != len(gr):
            raise ValueError(f"gr_factor and bn_factor need one entry per flow, got {len(gr)} and {len(bn)}")
        if list(scales) != sorted(scales):
            raise ValueError(f"scale_list must not decrease (flows run from low to high resolution), got {scales}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.family = "RANet"  # the name input errors give
        self.img_size = to_2tuple(img_size)
        self.drop_rate = drop_rate
        self.channels_last_training = channels_last_training
        self.multi_exit_training = multi_exit_training
        self.plan = ranet_plan(num_blocks, block_step, step, step_mode, num_channels, growth_rate, gr, scales,
                               compress_factor, reduction)
        num_flows = len(gr)
        strides = [1 if scales[s] == scales[s + 1] else 2 for s in reversed(range(num_flows - 1))]
        self.stem = RaStem(in_chans, [num_channels * g for g in reversed(gr)], strides, stem_type, **dd)

        stages, exits, stage_widths, exit_widths, blocks = [], [], [], [], []
        self.block_names = {}  # the reference's block name -> this model's, to load reference checkpoints
        for f, flow in enumerate(self.plan):
            starts = [0]
            for p in self.plan[f - 1] if f else []:
                starts.append(starts[-1] + len(p.feature_chs))
            stage_start = True
            for p in flow:
                blocks.append(RaBlock(p, compress_factor, bn[f], bn[f - 1] if f else 1,
                                      starts[p.index] if p.low_chs else 0, **dd))
                self.block_names[f"scale_flows.{f}.{p.index}"] = f"stages.{len(stages)}.blocks.{len(blocks) - 1}"
                if p.has_exit:
                    stages.append(RaStage(blocks, num_flows - f if stage_start else num_flows - f - 1,
                                          new_flow=stage_start, keep_features=f < num_flows - 1))
                    head_width = head_channels or p.out_chs
                    exits.append(MsdHead(p.out_chs, head_width, num_classes, drop_rate, global_pool, **dd))
                    stage_widths.append(p.out_chs)
                    exit_widths.append(head_width)
                    blocks, stage_start = [], False
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(exits)
        self.num_exits = len(exits)
        self.exit_index = self.num_exits - 1
        self.stage_widths = stage_widths
        self.exit_widths = exit_widths
        self.num_features = self.head_hidden_size = exit_widths[-1]
        self._check_ranet_img_size(stem_type, strides)
        self.feature_info = [dict(num_chs=w, reduction=self._coarse_reduction, module=f"stages.{i}")
                             for i, w in enumerate(stage_widths)]
        self.grad_checkpointing = False
        self.init_weights(weight_init)

    def _check_ranet_img_size(self, stem_type: str, strides: Sequence[int]) -> None:
        """Every exit reads a map its head reduces to 1x1 (the reference's heads are built for one size)."""
        exit_sizes, head_sizes = [], []
        for size in self.img_size:
            if stem_type == "imagenet":
                size = _conv_out(_conv_out(size, 7, 2, 3), 3, 2, 1)
            flow_sizes = [size]
            for stride in strides:
                flow_sizes.insert(0, _conv_out(flow_sizes[0], 3, stride, 1))
            sizes = []
            for flow, size in zip(self.plan, flow_sizes):
                for p in flow:
                    size = _conv_out(size, 3, 2, 1) if p.down else size
                    if p.has_exit:
                        sizes.append(size)
            exit_sizes.append(sizes)
            head_sizes.append([_conv_out(_conv_out(s, 3, 2, 1), 3, 2, 1) // 2 for s in sizes])
        if any(s != 1 for sizes in head_sizes for s in sizes):
            raise ValueError(
                f"RANet exit heads (two stride-2 convs and a 2x2 average pool) must reduce their input to 1x1; "
                f"img_size={self.img_size} gives exit inputs of heights {exit_sizes[0]} and widths {exit_sizes[1]}. "
                f"The reference uses 32x32 (CIFAR) and 224x224 (ImageNet).")
        self._coarse_reduction = self.img_size[0] // exit_sizes[0][-1]

    @torch.no_grad()
    def init_weights(self, scheme: str = "he") -> None:
        """``'he'``: He fan-out normal convs, BN 1/0, zero linear biases in the flows and heads, the stem
        left at PyTorch's init (the reference); ``'torch'``: PyTorch's default everywhere."""
        if scheme == "torch":
            return
        if scheme != "he":
            raise ValueError(f"weight_init must be 'torch' or 'he', got {scheme!r}")
        for m in list(self.stages.modules()) + list(self.exits.modules()):
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1)
                m.bias.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.zero_()

    def scale_state_grad(self, state: List[torch.Tensor], factor: float) -> List[torch.Tensor]:
        """Gradient Equilibrium scales the gradient of every tensor of the state (RANet's reference
        trains without it; this is the generic rule of :class:`~.MultiExitModel`)."""
        return MultiExitModel.scale_state_grad(self, state, factor)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise lr decay: the stem, then the stages (fine: their blocks)
        in the order they run; every exit head is unmatched, so timm puts it in the last group, the head's."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.blocks\.(\d+)")

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and exits) after the deepest of ``indices``, and the stem convs of the flows
        no kept stage reaches.

        Args:
            indices: the stages kept for :meth:`forward_intermediates` (as it takes them).
            prune_norm: unused: RANet has no final norm.
            prune_head: the exit heads go too (what timm's ``features_only`` wrapper does).

        Returns:
            The indices of the stages whose maps are taken.
        """
        check_feature_indices(indices, len(self.stages), "RANet")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        self.exits = nn.ModuleList() if prune_head else self.exits[:max_index + 1]
        self.num_exits = len(self.stages)
        self.exit_index = min(self.exit_index, self.num_exits - 1)
        return take_indices


def _map_reference_key(key: str, names: dict) -> str:
    m = re.match(r"FirstLayer\.layers\.(\d+)\.(?:net\.)?([01])\.(.*)$", key)
    if m:
        return f"stem.convs.{m.group(1)}.{('conv', 'bn')[int(m.group(2))]}.{m.group(3)}"
    m = re.match(r"classifier\.(\d+)\.(?:m\.([01])\.net\.([01])|linear)\.(.*)$", key)
    if m:
        part = "fc" if m.group(2) is None else f"conv{int(m.group(2)) + 1}.{('conv', 'bn')[int(m.group(3))]}"
        return f"exits.{m.group(1)}.{part}.{m.group(4)}"
    m = re.match(r"(scale_flows\.\d+\.\d+)\.(.*)$", key)
    if m and m.group(1) in names:
        prefix, rest = names[m.group(1)], m.group(2)
        u = re.match(r"layers\.(\d+)\.conv_(up|normal)\.net\.([0134])\.(.*)$", rest)
        if u:
            part = {"0": "reduce.conv", "1": "reduce.bn", "3": "conv.conv", "4": "conv.bn"}[u.group(3)]
            return f"{prefix}.layers.{u.group(1)}.{u.group(2)}.{part}.{u.group(4)}"
        t = re.match(r"(conv_last|trans)\.net\.([01])\.(.*)$", rest)
        if t:
            module = "fuse_low" if t.group(1) == "conv_last" else "transition"
            return f"{prefix}.{module}.{('conv', 'bn')[int(t.group(2))]}.{t.group(3)}"
    raise KeyError(key)


def checkpoint_filter_fn(state_dict: dict, model: RANet) -> dict:
    """Map a checkpoint of the reference code (yangle15/RANet-pytorch) onto this model; a state dict in
    this package's own layout passes through unchanged.

    Args:
        state_dict: the checkpoint's state dict (reference keys ``FirstLayer.*`` / ``scale_flows.*`` /
            ``classifier.*``, with ``module.`` already stripped by timm).
        model: the RANet it is loaded into (its flows decide where each reference block goes).

    Returns:
        The state dict keyed by the model's names.
    """
    if not any(k.startswith(("FirstLayer.", "scale_flows.")) for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        try:
            out[_map_reference_key(key, model.block_names)] = value
        except KeyError:
            raise ValueError(
                f"{key!r} is not a key of a reference RANet checkpoint for this model (expected FirstLayer.…, "
                f"scale_flows.<flow>.<block>.… or classifier.<i>.…, with the model's flows and blocks); is this "
                f"file a checkpoint of the same RANet configuration?") from None
    return out


def _create_ranet(variant: str, pretrained: bool = False, **kwargs) -> RANet:
    kwargs = keep_file_classifiers(variant, pretrained, kwargs)
    num_exits = kwargs.get("num_blocks", 2) + (len(_parse_factors(kwargs.get("gr_factor", (4, 2, 1)), "gr_factor")) - 1) \
        * kwargs.get("block_step", 2)
    out_indices = kwargs.pop("out_indices", tuple(range(num_exits)))
    return build_model_with_cfg(
        RANet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


# CIFAR-10 training-set statistics, as the reference code normalises
CIFAR10_MEAN = (0.4914, 0.4824, 0.4467)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def _cfg(num_exits: int, **kwargs) -> dict:
    return _msdnet_cfg(num_exits, license="unknown", **kwargs)  # the reference repository states no license


def _cifar_cfg(num_exits: int, **kwargs) -> dict:
    return _cfg(num_exits, num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR10_MEAN,
                std=CIFAR10_STD, **kwargs)


default_cfgs = generate_default_cfgs({
    "ranet_cifar_8exit": _cifar_cfg(8),
    "ranet_cifar_6exit": _cifar_cfg(6),
    "ranet_cifar_6exit_lg": _cifar_cfg(6),
    "ranet_imagenet_8exit": _cfg(8),
    "ranet_imagenet_8exit_c32": _cfg(8),
})

_CIFAR_ARGS = dict(num_blocks=2, block_step=2, num_channels=16, growth_rate=6, compress_factor=0.25, reduction=0.5,
                   stem_type="cifar", head_channels=128, num_classes=10, img_size=32)
_IMAGENET_ARGS = dict(num_blocks=2, block_step=2, growth_rate=16, step=8, step_mode="even", compress_factor=0.25,
                      reduction=0.5, stem_type="imagenet", head_channels=None, num_classes=1000, img_size=224)


@register_model
def ranet_cifar_8exit(pretrained: bool = False, **kwargs) -> RANet:
    """RANet for CIFAR, 4 flows (the last two at 32x32), 8 exits, 4 layers per block (the reference's train_cifar.sh)."""
    model_args = dict(_CIFAR_ARGS, step=4, step_mode="even", scale_list="1-2-3-3", gr_factor="4-2-1-1",
                      bn_factor="4-2-1-1")
    return _create_ranet("ranet_cifar_8exit", pretrained, **dict(model_args, **kwargs))


@register_model
def ranet_cifar_6exit(pretrained: bool = False, **kwargs) -> RANet:
    """RANet for CIFAR, 3 flows, 6 exits, 4 layers per block (the reference's default arguments)."""
    model_args = dict(_CIFAR_ARGS, step=4, step_mode="even", scale_list="1-2-3", gr_factor="4-2-1", bn_factor="4-2-1")
    return _create_ranet("ranet_cifar_6exit", pretrained, **dict(model_args, **kwargs))


@register_model
def ranet_cifar_6exit_lg(pretrained: bool = False, **kwargs) -> RANet:
    """RANet for CIFAR, 3 flows, 6 exits, blocks of 2, 4, 6... layers (the reference README's CIFAR example)."""
    model_args = dict(_CIFAR_ARGS, step=2, step_mode="lg", scale_list="1-2-3", gr_factor="4-2-1", bn_factor="4-2-1")
    return _create_ranet("ranet_cifar_6exit_lg", pretrained, **dict(model_args, **kwargs))


@register_model
def ranet_imagenet_8exit(pretrained: bool = False, **kwargs) -> RANet:
    """RANet for ImageNet, 4 flows, 8 exits, 8 layers per block, 16 stem channels (the reference's train_imagenet.sh)."""
    model_args = dict(_IMAGENET_ARGS, num_channels=16, scale_list="1-2-3-4", gr_factor="4-2-1-1", bn_factor="4-2-1-1")
    return _create_ranet("ranet_imagenet_8exit", pretrained, **dict(model_args, **kwargs))


@register_model
def ranet_imagenet_8exit_c32(pretrained: bool = False, **kwargs) -> RANet:
    """RANet for ImageNet, 4 flows, 8 exits, 8 layers per block, 32 stem channels (the reference README's ImageNet example)."""
    model_args = dict(_IMAGENET_ARGS, num_channels=32, scale_list="1-2-3-4", gr_factor="4-2-2-1", bn_factor="4-2-2-1")
    return _create_ranet("ranet_imagenet_8exit_c32", pretrained, **dict(model_args, **kwargs))
