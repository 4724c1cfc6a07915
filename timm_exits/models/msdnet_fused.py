"""MSDNet's fused inference path: what ``timm.utils.reparameterize_model`` turns an eval-mode
:class:`~timm_exits.models.msdnet.MSDNet` into (each ``fuse()`` of ``msdnet.py`` calls an entry point
here and returns a new module; the plain model is never modified).

* batch norms folded into the convolutions (:class:`FoldedConvAct`), channels-last weights;
* the 1x1 bottlenecks of a dense layer that read the same scale merged into one unit, computed as
  a matrix product over the pixels (:class:`FoldedPointwise`);
* each run of dense layers (up to a transition or the stage's end) writes its new channels into
  per-scale buffers of the run's final widths, allocated once when the run starts, instead of
  concatenating at every layer (a concatenation copies every earlier channel again). The 1x1 units
  read the filled channels at the start of a buffer in place (a strided matrix), so the room not
  yet written is neither copied nor multiplied.

Between fused stages the state is what the plain model passes, one channels-last tensor per scale,
so the early-exit executor compacts it the same way: a stage called on it allocates buffers that end
with the stage (room for later stages would be allocated, and its memory paged in: channels-last
interleaves it with the features, for samples that leave at the exit in between). A full pass, which
keeps every sample (MSDNet's ``forward_exits`` and ``model(x)``), runs the stages itself instead
(:func:`full_pass`): its buffers have room up to the next transition, however many stages away, so each
stage appends to what the one before wrote.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from timm.layers import ConvNormAct
from torch import nn

if TYPE_CHECKING:  # msdnet.py imports this module
    from .msdnet import MsdHead, MsdLayer, MsdStage, MsdStem, Transition

__all__ = ["FoldedConvAct", "FoldedPointwise", "FusedMsdLayer", "FusedStage", "FusedTransition", "full_pass",
           "fuse_stage", "fuse_stem", "fuse_head"]


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
    channels side by side): one convolution with the batch norms folded in, then ReLU."""

    def __init__(self, units: Sequence[ConvNormAct]):
        super().__init__()
        weights, biases = zip(*[_folded(u) for u in units])
        first = units[0].conv
        weight = torch.cat(weights)
        self.conv = nn.Conv2d(first.in_channels, weight.shape[0], first.kernel_size, first.stride, first.padding,
                              first.dilation, bias=True, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            self.conv.bias.copy_(torch.cat(biases))
        self.conv.to(memory_format=torch.channels_last)
        self.conv.requires_grad_(False)  # an inference form: see FusedStage.forward
        self.widths = [w.shape[0] for w in weights]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the convolution without a module call of its own (its overhead shows at batch 1)
        return torch.relu_(self.conv._conv_forward(x, self.conv.weight, self.conv.bias))


class FoldedPointwise(FoldedConvAct):
    """A folded 1x1 conv-BN-ReLU computed as one matrix product over the pixels of a channels-last
    input, reading only its first ``in_channels`` channels: a wider buffer (features, then room for
    channels not yet written) is read in place, without a copy and without multiplying its room."""

    def __init__(self, units: Sequence[ConvNormAct]):
        if any(u.conv.kernel_size != (1, 1) or u.conv.stride != (1, 1) or u.conv.padding != (0, 0) for u in units):
            raise ValueError("a pointwise unit must be a 1x1 convolution with stride 1 and no padding")
        super().__init__(units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        in_chs = self.conv.in_channels
        if c < in_chs:
            raise ValueError(f"this 1x1 convolution reads {in_chs} channels, got {c}")
        pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c)[:, :in_chs]  # a view for a channels-last x
        bias = self.conv.bias
        assert bias is not None  # folded units always have one (and TorchScript needs to know)
        out = torch.addmm(bias, pixels, self.conv.weight.reshape(-1, in_chs).t())
        return torch.relu_(out.view(n, h, w, -1).permute(0, 3, 1, 2))

    def forward_parts(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The outputs of the merged units, each its own channels-last tensor (the convolutions that
        read them are several times slower on a channel slice of a wider tensor)."""
        out = self.forward(x)
        if len(self.widths) == 1:
            return [out]
        return [part.contiguous(memory_format=torch.channels_last) for part in out.split(self.widths, 1)]


def _growth(layer: "MsdLayer") -> List[int]:
    """Per output scale of a dense layer: the channels it appends."""
    return [u.normal.conv.conv.out_channels + (0 if u.down is None else u.down.conv.conv.out_channels)
            for u in layer.units]


class FusedMsdLayer(nn.Module):
    """Inference form of :class:`~timm_exits.models.msdnet.MsdLayer`: batch norms folded, and the
    1x1 bottlenecks that read the same scale (this scale's normal path, the next scale's down path)
    run as one matrix product (:class:`FoldedPointwise`), which also reads the features at the start
    of a wider buffer in place (:meth:`forward_into`, inside a :class:`FusedStage`)."""

    def __init__(self, layer: "MsdLayer"):
        super().__init__()
        self.discard = layer.discard
        self.bottleneck = layer.has_bottleneck
        # what each 3x3 convolution reads is numbered by slot: 2k for unit k's normal path, 2k + 1 for its down path
        self.read_scales = list(layer.reads)
        self.read_slots = [[2 * k + (path == "down") for k, path in users] for users in layer.reads.values()]
        self.reduce = nn.ModuleList([FoldedPointwise([getattr(layer.units[k], p).reduce for k, p in users])
                                     for users in layer.reads.values()] if self.bottleneck else [])
        self.has_down = [u.down is not None for u in layer.units]
        self.down = nn.ModuleList([nn.Identity() if u.down is None else FoldedConvAct([u.down.conv])
                                   for u in layer.units])
        self.normal = nn.ModuleList([FoldedConvAct([u.normal.conv]) for u in layer.units])

    def _mids(self, xs: List[torch.Tensor]) -> Dict[int, torch.Tensor]:
        """Per slot: the tensor its 3x3 convolution reads (a bottleneck's output, or a scale itself)."""
        mids: Dict[int, torch.Tensor] = {}
        if self.bottleneck:
            for i, reduce in enumerate(self.reduce):
                for slot, part in zip(self.read_slots[i], reduce.forward_parts(xs[self.read_scales[i]])):
                    mids[slot] = part
        else:
            for scale, slots in zip(self.read_scales, self.read_slots):
                for slot in slots:
                    mids[slot] = xs[scale]
        return mids

    def forward_into(self, buffers: List[torch.Tensor], filled: List[int]) -> Tuple[List[torch.Tensor], List[int]]:
        """Append this layer's new channels to per-scale buffers, in place.

        Args:
            buffers: one channels-last buffer per input scale, with room for the new channels.
            filled: per scale, the channels already written at the start of its buffer.

        Returns:
            ``(buffers, filled)`` of the scales it keeps.
        """
        mids = self._mids(buffers)
        filled = list(filled)
        for k, (normal, down) in enumerate(zip(self.normal, self.down)):
            a = k + self.discard
            start = filled[a]
            if self.has_down[k]:
                new = down(mids[2 * k + 1])
                buffers[a][:, start:start + new.shape[1]] = new
                start += new.shape[1]
            new = normal(mids[2 * k])
            buffers[a][:, start:start + new.shape[1]] = new
            filled[a] = start + new.shape[1]
        return buffers[self.discard:], filled[self.discard:]

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        mids = self._mids(xs)
        out: List[torch.Tensor] = []
        for k, (normal, down) in enumerate(zip(self.normal, self.down)):
            pieces = [xs[k + self.discard]]
            if self.has_down[k]:
                pieces.append(down(mids[2 * k + 1]))
            pieces.append(normal(mids[2 * k]))
            out.append(torch.cat(pieces, 1))
        return out


class FusedTransition(nn.Module):
    """Inference form of :class:`~timm_exits.models.msdnet.Transition` (batch norms folded)."""

    def __init__(self, transition: "Transition"):
        super().__init__()
        self.convs = nn.ModuleList([FoldedPointwise([c]) for c in transition.convs])

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        return [conv(xs[i]) for i, conv in enumerate(self.convs)]

    def forward_into(self, buffers: List[torch.Tensor], filled: List[int]) -> Tuple[List[torch.Tensor], List[int]]:
        """The transition on buffers whose first channels are the features (the 1x1 units read only those).

        Args:
            buffers: one channels-last buffer per scale.
            filled: per scale, the channels of features at the start of its buffer.

        Returns:
            ``(outputs, widths)``: new tensors, and their channels.
        """
        out = self.forward(buffers)
        return out, [x.shape[1] for x in out]


def _with_room(xs: List[torch.Tensor], filled: List[int], widths: List[int]) -> List[torch.Tensor]:
    """Per scale: ``x`` itself if it holds ``width`` channels, else a new channels-last buffer of
    ``width`` channels starting with the ``filled`` channels of ``x`` (the rest unset)."""
    buffers: List[torch.Tensor] = []
    for x, n, width in zip(xs, filled, widths):
        if x.shape[1] >= width:
            buffers.append(x)
            continue
        buffer = torch.empty([x.shape[0], width, x.shape[2], x.shape[3]], dtype=x.dtype, device=x.device,
                             memory_format=torch.channels_last)
        buffer[:, :n] = x[:, :n]
        buffers.append(buffer)
    return buffers


class FusedStage(nn.Module):
    """Inference form of an :class:`~timm_exits.models.msdnet.MsdStage` with 1x1 bottlenecks: each run
    of dense layers up to a transition (or the stage's end) appends to per-scale buffers. Called on a
    list of per-scale channels-last tensors, it allocates buffers of the run's final widths and returns
    a list; :func:`full_pass` runs it on buffers as wide as the whole pass wants instead
    (:meth:`forward_into`)."""

    def __init__(self, stage: "MsdStage"):
        from .msdnet import MsdLayer  # msdnet.py imports this module

        super().__init__()
        self.in_widths = list(stage.in_widths)
        if not self.in_widths:
            raise ValueError("a fused stage needs its input widths (MsdStage.in_widths, set by MSDNet)")
        steps: List[nn.Module] = []
        # a segment is a run of dense layers, then a transition or the stage's end; per segment: its buffers'
        # widths (one per input scale) and how many of its input scales it drops
        self.segment_widths: List[List[int]] = []
        self.segment_discards: List[int] = []
        self.opens: List[int] = []  # per step: the segment whose buffers it allocates (a run's first layer), or -1
        widths, run = list(self.in_widths), []
        for m in stage:
            if isinstance(m, MsdLayer):
                steps.append(FusedMsdLayer(m))
                self.opens.append(-1 if run else len(self.segment_widths))
                run.append(m)
            else:  # a transition ends the run
                steps.append(m.fuse())
                self.opens.append(-1)
                self._end_run(run, widths)
                widths, run = [c.conv.out_channels for c in steps[-1].convs], []
        if run:
            self._end_run(run, widths)
        self.steps = nn.ModuleList(steps)

    def _end_run(self, run: List["MsdLayer"], widths: List[int]) -> None:
        """Record a segment: the dense layers ``run`` on inputs of ``widths``."""
        final, scales = list(widths), list(range(len(widths)))  # input scale of each current entry
        for layer in run:
            del scales[:layer.discard]
            for k, g in enumerate(_growth(layer)):
                final[scales[k]] += g
        self.segment_widths.append(final)
        self.segment_discards.append(len(widths) - len(scales))

    def forward_into(self, buffers: List[torch.Tensor], filled: List[int],
                     plan: List[List[int]]) -> Tuple[List[torch.Tensor], List[int]]:
        """The stage's steps on per-scale buffers, appending where they have room and allocating each
        run's buffers where not.

        Args:
            buffers: one channels-last buffer per input scale.
            filled: per scale, the channels already written at the start of its buffer; they must be
                the stage's input widths.
            plan: per run of dense layers, the channels of the buffers it allocates, per input scale.

        Returns:
            ``(buffers, filled)`` after the stage.
        """
        if filled != self.in_widths:
            raise ValueError(f"this fused MSDNet stage reads scales of {self.in_widths} channels, got {filled}")
        for i, step in enumerate(self.steps):
            segment = self.opens[i]
            if segment >= 0:
                buffers = _with_room(buffers, filled, plan[segment])
            buffers, filled = step.forward_into(buffers, filled)
        return buffers, filled

    def forward(self, state: List[torch.Tensor]) -> List[torch.Tensor]:
        if not torch.jit.is_scripting():
            self._refuse_gradients(state)
        xs, _ = self.forward_into(list(state), [x.shape[1] for x in state], self.segment_widths)
        return xs

    @torch.jit.unused
    def _refuse_gradients(self, state: List[torch.Tensor]) -> None:
        if torch.is_grad_enabled() and (any(x.requires_grad for x in state) or
                                        any(p.requires_grad for p in self.parameters())):
            raise RuntimeError("MSDNet's fused inference path computes no gradients (its stages write into buffers in "
                               "place): run it under torch.no_grad() or torch.inference_mode(), or take gradients "
                               "from the plain model")


def _full_pass_plan(stages: Sequence[FusedStage]) -> List[List[List[int]]]:
    """Per stage, per run of dense layers: the widths of buffers with room for every layer up to the run's
    next transition, in this stage or a later one of ``stages``."""
    plan: List[List[List[int]]] = []
    ahead: Optional[List[int]] = None  # the widths the next stage's first run wants, per its input scale
    for stage in reversed(stages):
        widths = [list(w) for w in stage.segment_widths]
        if isinstance(stage.steps[-1], FusedMsdLayer) and ahead is not None:  # its last run goes on in the next stage
            widths[-1] = widths[-1][:stage.segment_discards[-1]] + ahead
        ahead = widths[0] if isinstance(stage.steps[0], FusedMsdLayer) else None
        plan.insert(0, widths)
    return plan


def full_pass(stages: Sequence[FusedStage], state: List[torch.Tensor]) -> Iterator[List[torch.Tensor]]:
    """Every sample through the stages in order. Each run of dense layers appends to buffers wide
    enough for every layer up to its next transition, however many stages away, so a stage goes on
    writing where the one before stopped.

    Args:
        stages: consecutive fused stages, the first reading the stem's output.
        state: the stem's output, one channels-last tensor per scale.

    Yields:
        The state after each stage (per scale, the filled channels at the start of a buffer).
    """
    buffers, filled = list(state), [x.shape[1] for x in state]
    for stage, plan in zip(stages, _full_pass_plan(stages)):
        stage._refuse_gradients(buffers)
        buffers, filled = stage.forward_into(buffers, filled, plan)
        yield [b[:, :n] for b, n in zip(buffers, filled)]


def fuse_stage(stage: "MsdStage") -> nn.Module:
    """The inference form of a stage: a :class:`FusedStage` if its dense layers have 1x1 bottlenecks
    (to read whole buffers) and nothing in it was pruned, otherwise its fused layers in sequence (those
    pruned of unread paths copied unfused), each concatenating its new channels."""
    from .msdnet import MsdLayer, ScaleSequential  # msdnet.py imports this module

    if all(m.complete for m in stage) and all(m.has_bottleneck for m in stage if isinstance(m, MsdLayer)):
        return FusedStage(stage)
    return ScaleSequential(*[m.fuse() for m in stage])


def fuse_stem(stem: "MsdStem") -> nn.Module:
    """A copy of the stem with its batch norms folded (a copy of it as it is if they are already)."""
    fused = copy.deepcopy(stem)
    if all(isinstance(c, FoldedConvAct) for c in stem.convs):
        return fused
    fused.convs = nn.ModuleList([FoldedConvAct([c]) for c in stem.convs])
    return fused


def fuse_head(head: "MsdHead") -> nn.Module:
    """A copy of an exit head with its batch norms folded (same pool and classifier; a copy of it as
    it is if they are already)."""
    fused = copy.deepcopy(head)
    if isinstance(head.conv1, FoldedConvAct):
        return fused
    fused.conv1, fused.conv2 = FoldedConvAct([head.conv1]), FoldedConvAct([head.conv2])
    return fused
