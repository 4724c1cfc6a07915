"""Exit heads for timm backbones.

A head maps the backbone state after some stage (``NCHW`` maps for CNNs, ``NHWC`` maps for Swin,
``NLC`` tokens for ViTs) to logits:

* ``linear``: [norm], global pool, linear. The default; norm is a LayerNorm for transformers.
* ``conv``: MSDNet-style, two 3x3 stride-2 conv-BN-ReLU, global average pool, linear (NCHW only).
* ``sdn``: SDN's internal classifier (Kaya et al., ICML 2019): mixed max / average pooling to about
  4x4, flatten, linear; built for one map size (NCHW and NHWC maps; not tokens).
* ``ztw``: ZTW's pooled head (Wołczyk et al., NeurIPS 2021): the same mixed pooling, adaptive to
  exactly 4x4 whatever the map size, flatten, linear (NCHW and NHWC maps; not tokens).

``pool=''`` (timm's ``global_pool=''``) leaves the features unpooled, meant for ``num_classes=0`` like
``forward_head`` of a timm model reset with ``reset_classifier(0, '')``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import ConvNormAct

__all__ = ["HEAD_TYPES", "LinearHead", "ConvHead", "MixedPool", "SDNHead", "ZTWHead", "create_head", "classifier",
           "reset_head_classifier"]

HEAD_TYPES = ("linear", "conv", "sdn", "ztw")


def classifier(width: int, num_classes: int, device=None, dtype=None) -> nn.Module:
    """The linear layer of a head; an identity for ``num_classes=0`` (the head then gives features).

    Args:
        width: its number of inputs.
        num_classes: its number of outputs; 0: no layer.
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).

    Returns:
        An ``nn.Linear``, or an ``nn.Identity`` for 0 classes.
    """
    return nn.Linear(width, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()


def reset_head_classifier(head: nn.Module, width: int, num_classes: int, pool: Optional[str] = None,
                          device=None, dtype=None) -> None:
    """Give a head a fresh ``fc``, in the head's training mode.

    Args:
        head: an exit head (with an ``fc``).
        width: the number of inputs of the new ``fc`` (the head's ``num_features``).
        num_classes: its number of outputs; 0: an identity (the head gives features).
        pool: the head's new pooling, for heads that have one; ``None`` keeps it.
        device, dtype: of the new ``fc``; ``None``: those of the head's parameters.
    """
    if pool is not None and hasattr(head, "pool"):
        head.pool = pool
    ref = next(head.parameters(), None)
    dd = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
    dd.update({k: v for k, v in dict(device=device, dtype=dtype).items() if v is not None})
    head.fc = classifier(width, num_classes, **dd).train(head.training)


class LinearHead(nn.Module):
    """[LayerNorm], pool to one vector per sample, dropout, linear.

    Args:
        in_chs: the width of the state (channels, or token width).
        num_classes: the number of logits; 0: no linear layer (the head gives features).
        layout: the state's layout: ``nchw``, ``nhwc`` or ``nlc`` (tokens).
        pool: ``avg`` (spatial mean or mean of the patch tokens), ``token`` (the class token; ``nlc``
            with a prefix token only) or ``''`` (no pooling: the [normalised] features; meant for
            ``num_classes=0``).
        num_prefix_tokens: the class / register tokens in front of the patch tokens (``nlc``).
        norm: a LayerNorm over the width (before pooling for tokens and NHWC maps, after it for NCHW).
        drop_rate: dropout before the linear layer.
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(
            self,
            in_chs: int,
            num_classes: int,
            layout: str = "nchw",
            pool: str = "avg",
            num_prefix_tokens: int = 0,
            norm: bool = False,
            drop_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if layout not in ("nchw", "nhwc", "nlc"):
            raise ValueError(f"layout must be 'nchw', 'nhwc' or 'nlc', got {layout!r}")
        if pool not in ("avg", "token", "") or (pool == "token" and (layout != "nlc" or num_prefix_tokens < 1)):
            raise ValueError(f"pool must be 'avg', '' (none), or 'token' for token sequences with a class token; "
                             f"got {pool!r}")
        self.layout, self.pool, self.num_prefix_tokens = layout, pool, num_prefix_tokens
        self.norm = nn.LayerNorm(in_chs, **dd) if norm else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.num_features = in_chs
        self.fc = classifier(in_chs, num_classes, **dd)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "":
            return x
        if self.layout == "nchw":
            return x.mean((2, 3))
        if self.layout == "nhwc":
            return x.mean((1, 2))
        return x[:, 0] if self.pool == "token" else x[:, self.num_prefix_tokens:].mean(1)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # CNN maps: pool, then normalise the vector; token maps: normalise each token, then pool
        if self.layout != "nchw":
            x = self._pool(self.norm(x))
        elif self.pool == "":
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            x = self.norm(self._pool(x))
        return x if pre_logits else self.fc(self.drop(x))


class ConvHead(nn.Module):
    """Two 3x3 stride-2 conv-BN-ReLU, global average pool, dropout, linear (the MSDNet head, with a
    global pool so that it fits any resolution).

    Args:
        in_chs: the channels of the NCHW state.
        num_classes: the number of logits; 0: no linear layer (the head gives features).
        width: the channels of the two convolutions; ``None``: ``in_chs``.
        drop_rate: dropout before the linear layer.
        pool: ``avg`` (global average) or ``''`` (none).
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(self, in_chs: int, num_classes: int, width: Optional[int] = None, drop_rate: float = 0.0,
                 pool: str = "avg", device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if pool not in ("avg", ""):
            raise ValueError(f"pool must be 'avg' or '' (none) for a conv head, got {pool!r}")
        self.pool = pool
        width = width or in_chs
        self.conv1 = ConvNormAct(in_chs, width, 3, stride=2, padding=1, **dd)
        self.conv2 = ConvNormAct(width, width, 3, stride=2, padding=1, **dd)
        self.drop = nn.Dropout(drop_rate)
        self.num_features = width
        self.fc = classifier(width, num_classes, **dd)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        if self.pool == "avg":
            x = x.mean((2, 3))
        return x if pre_logits else self.fc(self.drop(x))


class MixedPool(nn.Module):
    """``alpha * maxpool(x) + (1 - alpha) * avgpool(x)``, ``alpha`` one learnable scalar drawn from
    U(0, 1). As in SDN's and ZTW's code, ``alpha`` has no sigmoid or clamp: training may take it outside
    [0, 1].

    Args:
        size: (H, W) of the pooling window and stride (SDN), or of the output with ``adaptive``.
        adaptive: adaptive pooling to a ``size`` output (ZTW).
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(self, size: Tuple[int, int], adaptive: bool = False, device=None, dtype=None):
        super().__init__()
        self.size, self.adaptive = size, adaptive
        self.alpha = nn.Parameter(torch.rand(1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adaptive:
            return (self.alpha * F.adaptive_max_pool2d(x, self.size)
                    + (1 - self.alpha) * F.adaptive_avg_pool2d(x, self.size))
        return self.alpha * F.max_pool2d(x, self.size) + (1 - self.alpha) * F.avg_pool2d(x, self.size)


class SDNHead(nn.Module):
    """SDN's internal classifier for maps of ``map_size`` (H, W): where both sides are >= 4, a
    :class:`MixedPool` with the window ``(H // 4, W // 4)`` (a 4x4 output for sides divisible by 4),
    else no pooling; then flatten (channel-major, as ``view`` of an NCHW map) and one linear layer,
    which fixes the input size.

    Args:
        in_chs: the channels of the map.
        num_classes: the number of logits; 0: no linear layer (the head gives features).
        map_size: (H, W) of the map it reads.
        layout: ``nchw``, or ``nhwc`` (Swin; read as NCHW).
        drop_rate: dropout before the linear layer.
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(self, in_chs: int, num_classes: int, map_size: Sequence[int], layout: str = "nchw",
                 drop_rate: float = 0.0, device=None, dtype=None):
        super().__init__()
        _check_spatial(layout, "sdn")
        h, w = map_size
        self.map_size = (int(h), int(w))
        self.nhwc = layout == "nhwc"
        if min(h, w) >= 4:
            kernel = (h // 4, w // 4)
            self.pooling = MixedPool(kernel, device=device, dtype=dtype)
            h, w = h // kernel[0], w // kernel[1]
        else:
            self.pooling = nn.Identity()
        self.num_features = in_chs * h * w
        self.drop = nn.Dropout(drop_rate)
        self.fc = classifier(self.num_features, num_classes, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        if (x.shape[-2], x.shape[-1]) != self.map_size:
            raise ValueError(f"this sdn exit head was built for {self.map_size[0]}x{self.map_size[1]} maps, got "
                             f"{x.shape[-2]}x{x.shape[-1]}: build the model for this input size "
                             f"(add_exits(..., input_size=...))")
        x = self.pooling(x).flatten(1)
        return x if pre_logits else self.fc(self.drop(x))


class ZTWHead(nn.Module):
    """ZTW's pooled head (``pooled_head`` of ``gmum/Zero-Time-Waste``, without convolutions): a
    :class:`MixedPool` adaptive to ``pool_size`` x ``pool_size`` (4x4) on every map, so a 2x2 map is
    repeated to 4x4 and a 6x6 one pooled in overlapping 2x2 windows; then flatten (channel-major) and one
    linear layer of ``in_chs * pool_size**2`` inputs, whatever the input size.

    Args:
        in_chs: the channels of the map.
        num_classes: the number of logits; 0: no linear layer (the head gives features).
        layout: ``nchw``, or ``nhwc`` (Swin; read as NCHW).
        pool_size: the side of the pooled map.
        drop_rate: dropout before the linear layer.
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(self, in_chs: int, num_classes: int, layout: str = "nchw", pool_size: int = 4,
                 drop_rate: float = 0.0, device=None, dtype=None):
        super().__init__()
        _check_spatial(layout, "ztw")
        self.nhwc = layout == "nhwc"
        self.pooling = MixedPool((pool_size, pool_size), adaptive=True, device=device, dtype=dtype)
        self.num_features = in_chs * pool_size * pool_size
        self.drop = nn.Dropout(drop_rate)
        self.fc = classifier(self.num_features, num_classes, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        x = self.pooling(x).flatten(1)
        return x if pre_logits else self.fc(self.drop(x))


def _check_spatial(layout: str, kind: str) -> None:
    """The mixed-pooling heads read spatial maps, not token sequences."""
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"the {kind!r} head pools a spatial map (NCHW or NHWC); this backbone gives {layout} "
                         f"tokens: use head='linear' (class token or mean of the patch tokens)")


def create_head(kind: str, in_chs: int, num_classes: int, layout: str, width: Optional[int] = None,
                drop_rate: float = 0.0, **kwargs) -> nn.Module:
    """An exit head.

    Args:
        kind: ``linear``, ``conv``, ``sdn`` or ``ztw`` (see :data:`HEAD_TYPES`).
        in_chs: the width of the state it reads (channels, or token width).
        num_classes: the number of logits; 0: no linear layer (the head gives features).
        layout: the state's layout: ``nchw``, ``nhwc`` or ``nlc`` (tokens).
        width: the ``conv`` head's width (``None``: ``in_chs``); the others ignore it.
        drop_rate: dropout before the linear layer.
        **kwargs: the head's own keywords: ``device`` and ``dtype`` for all; ``pool``,
            ``num_prefix_tokens`` and ``norm`` for ``linear``; ``pool`` for ``conv``; ``map_size``
            (required) for ``sdn``.

    Returns:
        A :class:`LinearHead`, :class:`ConvHead`, :class:`SDNHead` or :class:`ZTWHead`.
    """
    dd = {k: v for k, v in kwargs.items() if k in ("device", "dtype")}
    if kind == "linear":
        return LinearHead(in_chs, num_classes, layout=layout, drop_rate=drop_rate, **kwargs)
    if kind == "conv":
        if layout != "nchw":
            raise ValueError(f"the 'conv' head needs NCHW feature maps (a CNN backbone), this backbone gives {layout}")
        return ConvHead(in_chs, num_classes, width=width, drop_rate=drop_rate, pool=kwargs.get("pool", "avg"), **dd)
    if kind == "sdn":
        if kwargs.get("map_size") is None:
            raise ValueError("the 'sdn' head needs the map size it reads (map_size=(H, W))")
        return SDNHead(in_chs, num_classes, kwargs["map_size"], layout=layout, drop_rate=drop_rate, **dd)
    if kind == "ztw":
        return ZTWHead(in_chs, num_classes, layout=layout, drop_rate=drop_rate, **dd)
    raise ValueError(f"head must be one of {HEAD_TYPES}, got {kind!r}")
