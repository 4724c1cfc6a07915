"""MSDNet's fused inference path: what ``timm.utils.reparameterize_model`` turns an eval-mode
:class:`~timm_exits.models.msdnet.MSDNet` into (each ``fuse()`` of ``msdnet.py`` calls an entry point
here and returns a new module; the plain model is never modified).

* batch norms folded into the convolutions (:class:`FoldedConvAct`), channels-last weights;
* the 1x1 bottlenecks of a dense layer that read the same scale merged into one convolution;
* each dense layer's new channels written into preallocated per-scale buffers instead of
  concatenated (a concatenation copies every earlier channel again). The merged bottlenecks read
  whole buffers, their weights zero-padded at fuse time to the buffer widths, which the stage knows
  from the model's plan (``MsdStage.in_widths`` and ``MsdStage.reserve``).

The state between fused stages is a :class:`BufferedScales`: per scale the buffer and its filled
width, with room for the next stages' channels. Indexing it gives the filled parts (what the exits
read), and :func:`~timm_exits.models.multi_exit.slice_state` compacts it by selecting whole buffer
rows, so a compacted state is still appended to in place (the early-exit executor).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn

from .multi_exit import BatchState

if TYPE_CHECKING:  # msdnet.py imports this module
    from .msdnet import MsdHead, MsdLayer, MsdStage, MsdStem, Transition

__all__ = ["BufferedScales", "FoldedConvAct", "FusedMsdLayer", "FusedStage", "FusedTransition",
           "fuse_stage", "fuse_stem", "fuse_head"]

_CL = torch.channels_last


def _folded(unit: ConvNormAct) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``unit``'s convolution with its (eval-mode) batch norm folded in."""
    conv, bn = unit.conv, unit.bn
    if not isinstance(getattr(bn, "act", None), nn.ReLU):
        raise ValueError("MSDNet's fused inference path expects conv-BN-ReLU units")
    if conv.groups != 1:
        raise ValueError(f"MSDNet's fused inference path expects ungrouped convolutions, got groups={conv.groups}")
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        return conv.weight * scale.view(-1, 1, 1, 1), (bias - bn.running_mean) * scale + bn.bias


class FoldedConvAct(nn.Module):
    """Inference form of a conv-BN-ReLU unit (or of several that read the same input, their output
    channels side by side): one convolution with the batch norms folded in, then ReLU. With
    ``in_chs`` larger than the units' input width, it reads ``in_chs`` channels, the extra ones
    (at the end) weighted by zero."""

    def __init__(self, units: Sequence[ConvNormAct], in_chs: Optional[int] = None):
        super().__init__()
        weights, biases = zip(*[_folded(u) for u in units])
        first = units[0].conv
        own = first.in_channels
        in_chs = own if in_chs is None else in_chs
        if in_chs < own:
            raise ValueError(f"a folded convolution of {own} input channels cannot read {in_chs}")
        weight = F.pad(torch.cat(weights), (0, 0, 0, 0, 0, in_chs - own))
        self.conv = nn.Conv2d(in_chs, weight.shape[0], first.kernel_size, first.stride, first.padding,
                              first.dilation, bias=True, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            self.conv.bias.copy_(torch.cat(biases))
        self.conv.to(memory_format=_CL)
        self.widths = [w.shape[0] for w in weights]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.conv(x))


class BufferedScales(BatchState):
    """State between fused MSDNet stages: per scale a channels-last buffer ``(batch, width, h, w)``
    whose first ``filled`` channels hold the features, the rest room for the next stages' channels
    (zeros until written).

    ``state[i]`` is scale ``i``'s filled part (a view). The first stage that continues a state
    appends to its buffers in place and takes them over (``extended``); continuing the same state
    again copies it first, so nothing a continuation returned is ever overwritten."""

    def __init__(self, buffers: List[torch.Tensor], filled: List[int]):
        if len(buffers) != len(filled) or any(not 0 <= f <= b.shape[1] for b, f in zip(buffers, filled)):
            raise ValueError(f"filled widths {filled} do not fit buffers of {[b.shape[1] for b in buffers]} channels")
        self.buffers = buffers
        self.filled = filled
        self.extended = False

    def tensors(self) -> List[torch.Tensor]:
        """The filled part of every scale."""
        return [b[:, :f] for b, f in zip(self.buffers, self.filled)]

    def __getitem__(self, index: Union[int, slice]) -> Union[torch.Tensor, List[torch.Tensor]]:
        return self.tensors()[index]

    def __len__(self) -> int:
        return len(self.buffers)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.tensors())

    def select(self, index: Union[torch.Tensor, slice, Sequence[int]]) -> "BufferedScales":
        """The samples ``index`` selects, as a new state whose buffers (whole rows, room included)
        share no memory with this one."""
        if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() == 0):
            raise TypeError("select samples with a slice, a boolean or integer tensor or a sequence of ints; "
                            "a single integer would drop the batch dimension")
        buffers = []
        for b in self.buffers:
            r = b[index]
            if isinstance(index, slice):  # a view: copy, so that appending does not write into this state
                r = r.clone(memory_format=_CL)
            buffers.append(r.contiguous(memory_format=_CL))
        return BufferedScales(buffers, list(self.filled))


def _growth(layer: "MsdLayer") -> List[int]:
    """Per output scale of a dense layer: the channels it appends."""
    return [u.normal.conv.conv.out_channels + (0 if u.down is None else u.down.conv.conv.out_channels)
            for u in layer.units]


class FusedMsdLayer(nn.Module):
    """Inference form of :class:`~timm_exits.models.msdnet.MsdLayer`: batch norms folded, and the
    1x1 bottlenecks that read the same scale (this scale's normal path, the next scale's down path)
    run as one convolution. ``read_widths`` (per input scale): the width of the buffers the merged
    bottlenecks read, when the layer runs inside a :class:`FusedStage` (:meth:`forward_into`)."""

    def __init__(self, layer: "MsdLayer", read_widths: Optional[Sequence[int]] = None):
        super().__init__()
        self.discard = layer.discard
        self.bottleneck = layer.has_bottleneck
        self.reads = layer.reads
        if read_widths is not None and not self.bottleneck:
            raise ValueError("only a layer with 1x1 bottlenecks can read whole buffers")
        if self.bottleneck:
            self.reduce = nn.ModuleDict({
                str(j): FoldedConvAct([getattr(layer.units[k], p).reduce for k, p in users],
                                      None if read_widths is None else read_widths[j])
                for j, users in self.reads.items()})
        self.down = nn.ModuleDict({str(k): FoldedConvAct([u.down.conv]) for k, u in enumerate(layer.units)
                                   if u.down is not None})
        self.normal = nn.ModuleList([FoldedConvAct([u.normal.conv]) for u in layer.units])
        self.growth = _growth(layer)

    def forward_into(self, buffers: List[torch.Tensor], filled: List[int]) -> None:
        """Append this layer's new channels to per-scale ``buffers`` (filled up to ``filled``), in
        place; drops the buffers of discarded scales from both lists."""
        mids = {}
        for j, users in self.reads.items():
            reduce = self.reduce[str(j)]
            mids.update(zip(users, reduce(buffers[j]).split(reduce.widths, 1)))
        for k, normal in enumerate(self.normal):
            a, start = k + self.discard, filled[k + self.discard]
            if str(k) in self.down:
                new = self.down[str(k)](mids[(k, "down")])
                buffers[a][:, start:start + new.shape[1]] = new
                start += new.shape[1]
            new = normal(mids[(k, "normal")])
            buffers[a][:, start:start + new.shape[1]] = new
            filled[a] = start + new.shape[1]
        del buffers[:self.discard], filled[:self.discard]

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        mids = {}
        for j, users in self.reads.items():
            if self.bottleneck:
                reduce = self.reduce[str(j)]
                mids.update(zip(users, reduce(xs[j]).split(reduce.widths, 1)))
            else:
                mids.update((user, xs[j]) for user in users)
        out = []
        for k, normal in enumerate(self.normal):
            pieces = [xs[k + self.discard]]
            if str(k) in self.down:
                pieces.append(self.down[str(k)](mids[(k, "down")]))
            pieces.append(normal(mids[(k, "normal")]))
            out.append(torch.cat(pieces, 1))
        return out


class FusedTransition(nn.Module):
    """Inference form of :class:`~timm_exits.models.msdnet.Transition` (batch norms folded)."""

    def __init__(self, transition: "Transition"):
        super().__init__()
        self.convs = nn.ModuleList([FoldedConvAct([c]) for c in transition.convs])

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.convs, xs)]


class FusedStage(nn.Module):
    """Inference form of an :class:`~timm_exits.models.msdnet.MsdStage` with 1x1 bottlenecks: its
    dense layers append to per-scale buffers. Each run of layers up to a transition works in buffers
    of that run's final widths (plus, for the run that ends the stage, the next stages' channels up
    to their next transition, ``stage.reserve``), so that the next stage appends in place too.

    Takes a :class:`BufferedScales` (or a list of tensors, e.g. the stem's) and returns one."""

    def __init__(self, stage: "MsdStage"):
        super().__init__()
        self.in_widths = tuple(stage.in_widths)
        if not self.in_widths:
            raise ValueError("a fused stage needs its input widths (MsdStage.in_widths, set by MSDNet)")
        reserve = tuple(stage.reserve)
        steps: List[nn.Module] = []
        self.segments: List[Tuple[List[int], Optional[int]]] = []  # (layer indices, transition index)
        self.segment_widths: List[List[int]] = []  # per segment: its buffers' widths, one per input scale
        widths, run, run_widths = list(self.in_widths), [], []
        plain = list(stage)
        for i, m in enumerate(plain):
            if hasattr(m, "reads"):  # a dense layer: its buffers' widths are those of its run
                if not run:
                    end = next((t for t in range(i, len(plain)) if not hasattr(plain[t], "reads")), None)
                    run_widths = self._run_widths(plain[i:end], widths, reserve if end is None else ())
                    self.segment_widths.append(list(run_widths))
                steps.append(FusedMsdLayer(m, run_widths))
                del run_widths[:m.discard]
                run.append(i)
            else:  # a transition ends the run
                steps.append(m.fuse())
                self.segments.append((run, i))
                widths, run = [c.conv.out_channels for c in steps[-1].convs], []
        if run:
            self.segments.append((run, None))
        self.steps = nn.ModuleList(steps)

    @staticmethod
    def _run_widths(layers: Sequence["MsdLayer"], widths: List[int], reserve: Tuple[int, ...]) -> List[int]:
        """Per input scale: its buffer width for the run of ``layers`` (its width after them, plus
        ``reserve`` (per absolute scale) on the scales still kept at the end)."""
        widths, final = list(widths), list(widths)
        scales = list(range(len(widths)))  # input scale index of each current entry
        for layer in layers:
            del widths[:layer.discard], scales[:layer.discard]
            for k, g in enumerate(_growth(layer)):
                widths[k] += g
                final[scales[k]] = widths[k]
        if reserve:
            first = len(reserve) - len(final)  # absolute index of the finest input scale
            for s in scales:
                final[s] += reserve[first + s]
        return final

    def _take_buffers(self, state: Union[BufferedScales, List[torch.Tensor]]) -> Tuple[List[torch.Tensor], List[int]]:
        """Buffers of the first run's widths starting with ``state``: the state's own if it has room
        and no stage has continued it yet (and, under inference mode only, if they are inference
        tensors), otherwise new ones."""
        widths = self.segment_widths[0]
        filled = [x.shape[1] for x in state]
        if tuple(filled) != self.in_widths:
            raise ValueError(f"this fused MSDNet stage reads scales of {list(self.in_widths)} channels, got {filled}")
        if (isinstance(state, BufferedScales) and not state.extended
                and [b.shape[1] for b in state.buffers] == widths
                and all(not b.is_inference() or torch.is_inference_mode_enabled() for b in state.buffers)):
            state.extended = True
            return list(state.buffers), filled
        return self._new_buffers(list(state), widths), filled

    @staticmethod
    def _new_buffers(xs: List[torch.Tensor], widths: List[int]) -> List[torch.Tensor]:
        """Channels-last buffers of ``widths`` channels: each ``x``, then zeros."""
        buffers = []
        for x, width in zip(xs, widths):
            buffer = torch.empty((x.shape[0], width, *x.shape[2:]), dtype=x.dtype, device=x.device, memory_format=_CL)
            buffer[:, :x.shape[1]] = x
            buffer[:, x.shape[1]:].zero_()
            buffers.append(buffer)
        return buffers

    def forward(self, state: Union[BufferedScales, List[torch.Tensor]]) -> BufferedScales:
        buffers, filled = self._take_buffers(state)
        for s, (layers, transition) in enumerate(self.segments):
            if s > 0:  # after a transition: new buffers
                buffers, filled = self._new_buffers(xs, self.segment_widths[s]), [x.shape[1] for x in xs]
            for i in layers:
                self.steps[i].forward_into(buffers, filled)
            if transition is not None:
                xs = self.steps[transition](buffers)
        if self.segments[-1][1] is not None:  # the stage ends with a transition
            return BufferedScales([x.contiguous(memory_format=_CL) for x in xs], [x.shape[1] for x in xs])
        return BufferedScales(buffers, filled)


def fuse_stage(stage: "MsdStage") -> nn.Module:
    """The inference form of a stage: a :class:`FusedStage` if its dense layers have 1x1 bottlenecks
    (to read whole buffers), otherwise its fused layers in sequence (concatenating)."""
    if all(m.has_bottleneck for m in stage if hasattr(m, "reads")):
        return FusedStage(stage)
    return nn.Sequential(*[m.fuse() for m in stage])


def fuse_stem(stem: "MsdStem") -> nn.Module:
    """A copy of the stem with its batch norms folded."""
    fused = copy.deepcopy(stem)
    fused.convs = nn.ModuleList([FoldedConvAct([c]) for c in stem.convs])
    return fused


def fuse_head(head: "MsdHead") -> nn.Module:
    """A copy of an exit head with its batch norms folded (same pool and classifier)."""
    fused = copy.deepcopy(head)
    fused.conv1, fused.conv2 = FoldedConvAct([head.conv1]), FoldedConvAct([head.conv2])
    return fused
