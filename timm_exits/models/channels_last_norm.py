"""Training conv-BN-ReLU units channels-last on CPU, with the same mathematics.

oneDNN runs narrow convolutions 1.3-4x faster channels-last than channels-first on CPU, but
PyTorch's channels-last batch norm is several times slower than its channels-first kernel when the
channel count is not a multiple of the vector width (MSDNet's 6, 12, 24 ...). Here the convolutions
stay channels-last and each training-mode batch norm + ReLU runs on a channels-first copy:

* :class:`BatchNormReLU2d` is timm's ``BatchNormAct2d`` (ReLU) with that training path;
* :func:`shared_input_conv_bn_relu` runs several 1x1 conv-BN-ReLU units that read the same tensor as
  one convolution and one batch norm (batch norm is per channel, so this is exact).

Both use the modules' own parameters and update their running statistics as they would. One
difference: a unit whose output nothing uses, merged with one whose output is used, gets a zero
gradient instead of none.
"""
from __future__ import annotations

import copy
from typing import List, Sequence

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, ConvNormAct
from torch import nn

_CHANNELS_LAST = torch.channels_last


class _ChannelsFirstBatchNormReLU(torch.autograd.Function):
    """Training batch norm and ReLU of a channels-last tensor, computed channels-first; the output
    split into channel groups of ``sizes``, each channels-last."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, sizes):
        planar = x.contiguous()
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            planar, weight, bias, running_mean, running_var, True, momentum, eps)
        y.relu_()
        ctx.save_for_backward(planar, y, weight, mean, invstd)
        ctx.eps, ctx.sizes = eps, sizes
        return tuple(part.contiguous(memory_format=_CHANNELS_LAST) for part in y.split(sizes, 1))

    @staticmethod
    def backward(ctx, *grads):
        planar, y, weight, mean, invstd = ctx.saved_tensors
        grad = torch.empty_like(y)
        for part, g in zip(grad.split(ctx.sizes, 1), grads):
            part.copy_(g) if g is not None else part.zero_()
        grad = torch.ops.aten.threshold_backward(grad, y, 0)
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad, planar, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3]))
        if gx is not None:
            gx = gx.contiguous(memory_format=_CHANNELS_LAST)
        return gx, gw, gb, None, None, None, None, None


def channels_first_path_applies(x: torch.Tensor, norms: Sequence[BatchNormAct2d]) -> bool:
    """Whether ``norms`` can take the channels-first training path: training, CPU, channels-last
    input of their own dtype, ReLU, tracked running statistics with one momentum and eps.

    Args:
        x: the input, ``(N, C, H, W)``.
        norms: the norms applied side by side to ``x``'s channels (their widths sum to C).

    Returns:
        ``True`` if :func:`batch_norm_relu` may be used.
    """
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():  # no control flow on traced values
        return False
    first = norms[0]
    return (x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=_CHANNELS_LAST)
            and not torch.jit.is_scripting() and torch.is_grad_enabled()
            and all(n.training and n.affine and n.track_running_stats and n.momentum is not None
                    and isinstance(n.act, nn.ReLU) and isinstance(n.drop, nn.Identity)
                    and n.weight.dtype == x.dtype and n.momentum == first.momentum and n.eps == first.eps
                    for n in norms)
            and x.dtype in (torch.float32, torch.float64))


def batch_norm_relu(x: torch.Tensor, norms: Sequence[BatchNormAct2d]) -> List[torch.Tensor]:
    """``norms`` applied side by side to ``x``'s channels, on the channels-first path (check
    :func:`channels_first_path_applies` first). Their running statistics are updated.

    Args:
        x: the channels-last input, ``(N, C, H, W)``.
        norms: the norms, their widths summing to C.

    Returns:
        One channels-last output per norm, ``(N, norm.num_features, H, W)``.
    """
    sizes = [n.num_features for n in norms]
    for n in norms:
        n.num_batches_tracked.add_(1)
    if len(norms) == 1:
        n = norms[0]
        return list(_ChannelsFirstBatchNormReLU.apply(
            x, n.weight, n.bias, n.running_mean, n.running_var, n.momentum, n.eps, sizes))
    running_mean = torch.cat([n.running_mean for n in norms])
    running_var = torch.cat([n.running_var for n in norms])
    out = _ChannelsFirstBatchNormReLU.apply(
        x, torch.cat([n.weight for n in norms]), torch.cat([n.bias for n in norms]), running_mean, running_var,
        norms[0].momentum, norms[0].eps, sizes)
    with torch.no_grad():
        for n, mean, var in zip(norms, running_mean.split(sizes), running_var.split(sizes)):
            n.running_mean.copy_(mean)
            n.running_var.copy_(var)
    return list(out)


class BatchNormReLU2d(BatchNormAct2d):
    """timm's ``BatchNormAct2d`` with ReLU; in training, on a channels-last CPU tensor, computed on a
    channels-first copy (same result, much faster for narrow layers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if channels_first_path_applies(x, [self]):
            return batch_norm_relu(x, [self])[0]
        return super().forward(x)

    def __prepare_scriptable__(self) -> BatchNormAct2d:
        """TorchScript compiles the plain timm layer (same parameters and buffers): the fast path
        is a training-time optimisation of eager mode."""
        plain = copy.copy(self)
        plain.__class__ = BatchNormAct2d
        return plain


def batch_norm_relu_2d(num_features: int, **kwargs) -> BatchNormReLU2d:
    """Norm-act factory for ``timm.layers.ConvNormAct(norm_layer=...)``."""
    kwargs.pop("act_layer", None)
    return BatchNormReLU2d(num_features, act_layer=nn.ReLU, **kwargs)


def shared_input_conv_bn_relu(x: torch.Tensor, units: Sequence[ConvNormAct]) -> List[torch.Tensor]:
    """The outputs of 1x1 conv-BN-ReLU units that all read ``x``: one convolution over their stacked
    weights, then their batch norms side by side.

    Args:
        x: the input they share, ``(N, C, H, W)``.
        units: timm ``ConvNormAct`` units, each a 1x1 convolution (stride 1, no bias) then a
            batch norm with ReLU.

    Returns:
        One output per unit, in order.
    """
    weight = units[0].conv.weight if len(units) == 1 else torch.cat([u.conv.weight for u in units])
    z = F.conv2d(x, weight)
    norms = [u.bn for u in units]
    if channels_first_path_applies(z, norms):
        return batch_norm_relu(z, norms)
    return [u.bn(part) for u, part in zip(units, z.split([n.num_features for n in norms], 1))]
