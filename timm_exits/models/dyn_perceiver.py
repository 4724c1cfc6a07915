"""Dynamic Perceiver: a CNN and a latent-token branch with four exits (Han et al., ICCV 2023).

The CNN branch is a timm RegNetY, ResNet or MobileNetV3-Large (its stem, four stages and classifier head,
in timm's own layout; a ResNet narrowed by the reference's channel multiplier keeps timm's modules; a
MobileNetV3's four stages are slices of timm's blocks, cut where the reference cuts them). Beside it, a
small set of latent tokens is refined by Perceiver-style attention; the two branches meet at every CNN
stage boundary:

* x -> z: the latents attend to the CNN map (a 7x7 depthwise conv added to it, average-pooled to 7x7,
  with a learnt position bias on the keys), before each latent stage;
* z -> x: the CNN map attends to the latents (from stage 2 on, and once more after the last CNN stage);
* between latent stages a token mixer halves the number of tokens and an expander widens them to the
  next CNN stage's input width.

The four exits come in the reference's order, which is not the CNN's depth order:

1. the latents' mean after latent stage 3 (CNN stages 1-2 computed);
2. the attention exit after latent stage 4 (CNN stage 3 computed), with Inline Subnetwork Collaboration
   (ISC: a projection of exit 1's logits concatenated to its features);
3. the CNN exit, the CNN's own head after CNN stage 4, which runs only now;
4. the merged exit on the pooled CNN map (after a last z -> x attention), the latents' mean and the ISC
   projection of exit 2's logits.

A state is ``[cnn map, latents, logits of exit 1, ..., logits of the exits computed so far]``: every part
has the batch first, so it is sliced by sample, and the ISC inputs travel with it. Each stage computes its
exit's logits (a later exit reads them), so the per-exit cost is accumulated in exit order and every exit
includes the heads before it. Released checkpoints of the reference (LeapLabTHU/Dynamic_Perceiver) load
through :func:`checkpoint_filter_fn`.
"""
import contextlib
import re
from functools import partial
from typing import List, Optional, Sequence, Tuple

import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Mlp, get_act_layer, make_divisible
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.regnet import _filter_fn as regnet_filter_fn
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.regnet import RegNet
from timm.models.resnet import Bottleneck, ResNet
from timm.models.vision_transformer import Block

from .branch_gradients import detach_channels
from .multi_exit import MultiExitModel
from .pretrained import keep_file_classifiers

__all__ = ["DynPerceiver", "LatentStage", "CrossAttentionBlock", "LatentResize", "checkpoint_filter_fn"]

_POOLED = 7  # the CNN map is average-pooled to 7x7 keys for x -> z attention (the reference's spatial reduction)


class CrossAttentionBlock(nn.Module):
    """Pre-norm single-head cross-attention with a residual, then a pre-norm MLP with a residual.

    ``q + attn(norm_q(q), norm_kv(kv))``, then ``+ mlp(norm2(.))`` (MLP as wide as the queries).

    Args:
        q_chs: the query tokens' width (also the output width).
        kv_chs: the key / value tokens' width.
        attn_chs: the width queries and keys (and values) are projected to.
        num_keys: with a position bias: the number of key tokens (a learnt bias added to the keys);
            ``None``: no bias.
    """

    def __init__(self, q_chs: int, kv_chs: int, attn_chs: int, num_keys: Optional[int] = None):
        super().__init__()
        self.scale = attn_chs ** -0.5
        self.norm_q = nn.LayerNorm(q_chs)
        self.norm_kv = nn.LayerNorm(kv_chs)
        self.q = nn.Linear(q_chs, attn_chs, bias=False)
        self.k = nn.Linear(kv_chs, attn_chs, bias=False)
        self.v = nn.Linear(kv_chs, attn_chs, bias=False)
        self.proj = nn.Linear(attn_chs, q_chs)
        self.pos_bias = nn.Parameter(torch.zeros(1, num_keys, attn_chs)) if num_keys else None
        self.norm2 = nn.LayerNorm(q_chs)
        self.mlp = Mlp(q_chs, q_chs)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        k = self.k(kv)
        if self.pos_bias is not None:
            k = k + self.pos_bias
        attn = (self.q(self.norm_q(q)) @ k.transpose(-2, -1) * self.scale).softmax(-1)
        q = q + self.proj(attn @ self.v(kv))
        return q + self.mlp(self.norm2(q))


class LatentResize(nn.Module):
    """Between latent stages: mix the tokens into fewer (a linear map over the token axis), then widen
    each token (a linear map over channels), each after a layer norm.

    Args:
        tokens: the number of tokens in and out.
        chs: the token width in and out.
    """

    def __init__(self, tokens: Tuple[int, int], chs: Tuple[int, int]):
        super().__init__()
        self.token_norm = nn.LayerNorm(tokens[0])
        self.token_mix = nn.Linear(*tokens)
        self.norm = nn.LayerNorm(chs[0])
        self.expand = nn.Linear(*chs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self.token_mix(self.token_norm(z.transpose(1, 2))).transpose(1, 2)
        return self.expand(self.norm(z))


class MapToLatents(nn.Module):
    """x -> z: the latents attend to the CNN map plus its 7x7 depthwise conv, pooled to 7x7.

    Args:
        chs: the map's channels, which is also the latents' width here.
    """

    def __init__(self, chs: int):
        super().__init__()
        self.dwc = nn.Conv2d(chs, chs, 7, padding=3, groups=chs)
        self.pool = nn.AdaptiveAvgPool2d(_POOLED)
        self.attn = CrossAttentionBlock(chs, chs, chs, num_keys=_POOLED * _POOLED)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        kv = self.pool(self.dwc(x) + x)
        return self.attn(z, kv.flatten(2).transpose(1, 2))


class LatentsToMap(nn.Module):
    """z -> x: every position of the CNN map attends to the latents (attention 1/8 of the map's width).

    Args:
        map_chs: the map's channels.
        latent_chs: the latents' width.
    """

    def __init__(self, map_chs: int, latent_chs: int):
        super().__init__()
        self.attn = CrossAttentionBlock(map_chs, latent_chs, map_chs // 8)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = self.attn(x.flatten(2).transpose(1, 2), z)
        return x.transpose(1, 2).reshape(b, c, h, w)


class LatentStage(nn.Module):
    """One latent stage: (from stage 2 on) fewer, wider latents and z -> x, then x -> z and self-attention
    layers (timm's ViT blocks: pre-norm attention and MLP, each with a residual).

    Args:
        chs: the CNN map's channels at this stage's start, which is also the latents' width here.
        depth: self-attention layers.
        num_heads: their heads.
        mlp_ratio: their MLP width factor.
        resize: ``(tokens in, tokens out, width in)`` of the latents coming from the previous stage;
            ``None`` for the first stage.
    """

    def __init__(self, chs: int, depth: int, num_heads: int, mlp_ratio: float,
                 resize: Optional[Tuple[int, int, int]] = None):
        super().__init__()
        self.resize = LatentResize(resize[:2], (resize[2], chs)) if resize else None
        self.to_map = LatentsToMap(chs, chs) if resize else None
        self.to_latents = MapToLatents(chs)
        self.blocks = nn.Sequential(*[Block(chs, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, norm_layer=nn.LayerNorm)
                                      for _ in range(depth)])

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.resize is not None:
            z = self.resize(z)
        if self.to_map is not None:
            x = self.to_map(x, z)
        return x, self.blocks(self.to_latents(z, x))


def _check_input(x: torch.Tensor, in_chans: int) -> None:
    """Refuse anything but a batch of ``in_chans``-channel images."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"DynPerceiver expects images (batch, {in_chans}, H, W), got "
                         f"({', '.join([str(d) for d in x.shape])})")


torch.fx.wrap("_check_input")  # a call in traced graphs, not control flow on traced shapes


def _resized_conv(conv: nn.Conv2d, in_chs: int, out_chs: int) -> nn.Conv2d:
    """``conv`` rebuilt with other channel counts (initialised as timm's ResNet initialises its convs)."""
    new = nn.Conv2d(in_chs, out_chs, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                    conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    return new


# MobileNetV3-Large (Howard et al., 2019, table 1), block by block: kind, kernel, expanded width, output width,
# squeeze-excitation, hard-swish (else ReLU), stride; grouped as timm's mobilenetv3_large_100 groups its blocks
_MOBILENETV3_LARGE = (
    (("ds", 3, 16, 16, False, False, 1),),
    (("ir", 3, 64, 24, False, False, 2), ("ir", 3, 72, 24, False, False, 1)),
    (("ir", 5, 72, 40, True, False, 2),) + (("ir", 5, 120, 40, True, False, 1),) * 2,
    (("ir", 3, 240, 80, False, True, 2), ("ir", 3, 200, 80, False, True, 1)) + (("ir", 3, 184, 80, False, True, 1),) * 2,
    (("ir", 3, 480, 112, True, True, 1), ("ir", 3, 672, 112, True, True, 1)),
    (("ir", 5, 672, 160, True, True, 2),) + (("ir", 5, 960, 160, True, True, 1),) * 2,
)


def _mobilenetv3_large(multiplier: float, **kwargs) -> MobileNetV3:
    """timm's MobileNetV3-Large as the reference builds it (torchvision's ``mobilenet_v3_large``).

    Every width (stem, expanded, output, head) is the width at 1.0 times ``multiplier``, rounded to a multiple
    of 8, where timm expands the already-rounded input width (the two differ below 1.0, e.g. 56 vs 72 in the
    third block at 0.75); batch norms have eps 1e-3 and momentum 0.01; the last 1x1 conv is 6x the last block's
    width and the head's hidden layer is 1280 x ``multiplier`` wide. At 1.0 the modules and parameter names
    are timm's ``mobilenetv3_large_100``.
    """
    width = lambda c: make_divisible(c * multiplier, 8)  # noqa: E731
    in_chs = stem = width(16)
    arch = []
    for group in _MOBILENETV3_LARGE:
        blocks = []
        for kind, k, exp, out, se, hs, s in group:
            # the expansion ratio that makes timm's expanded width the reference's
            blocks.append(f"{kind}_r1_k{k}_s{s}_e{width(exp) / in_chs!r}_c{width(out)}" + ("_se0.25" if se else "")
                          + ("" if hs else "_nre"))
            in_chs = width(out)
        arch.append(blocks)
    arch.append([f"cn_r1_k1_s1_c{6 * in_chs}"])
    se_layer = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU, rd_round_fn=round_channels)
    return MobileNetV3(decode_arch_def(arch), stem_size=stem, fix_stem=True, num_features=width(1280),
                       act_layer=get_act_layer("hard_swish"), norm_layer=partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01),
                       se_layer=se_layer, **kwargs)


def _create_cnn(name: str, multiplier: float, **kwargs) -> nn.Module:
    """The CNN branch: a timm RegNet, ResNet or MobileNetV3-Large.

    ``multiplier`` is the reference's ResNet channel multiplier (its ``resnet50_0375`` etc.): the stage widths
    and the stem width scaled by it. timm's ``channels`` scales the stages; timm's single 7x7 stem conv is
    always 64 wide, so it is narrowed here, with the first block's two convs that read it. For
    ``mobilenetv3_large_100`` it is the reference's MobileNetV3 width multiplier (see :func:`_mobilenetv3_large`).
    """
    if name == "mobilenetv3_large_100":
        return _mobilenetv3_large(multiplier, **kwargs)
    if timm.models.is_model_in_modules(name, ["mobilenetv3"]):
        raise ValueError(f"a MobileNetV3 CNN branch is cnn='mobilenetv3_large_100' with the reference's width as "
                         f"cnn_multiplier (torchvision's channel rounding), got {name!r}")
    if multiplier != 1.0:
        if not timm.models.is_model_in_modules(name, ["resnet"]):
            raise ValueError(f"cnn_multiplier scales a timm ResNet CNN branch (or cnn='mobilenetv3_large_100'); "
                             f"{name!r} is not one")
        kwargs["channels"] = tuple(int(multiplier * c) for c in (64, 128, 256, 512))
    cnn = timm.create_model(name, **kwargs)
    if not isinstance(cnn, (RegNet, ResNet)):
        raise ValueError(f"the CNN branch must be a timm RegNet, ResNet or MobileNetV3-Large, got {name!r} ({type(cnn).__name__})")
    if multiplier != 1.0:
        first = cnn.layer1[0]
        if not isinstance(cnn.conv1, nn.Conv2d) or not isinstance(first, Bottleneck):
            raise ValueError(f"cnn_multiplier needs a ResNet with a single-conv stem and bottleneck blocks (the "
                             f"reference's ResNet-50), got {name!r}")
        width = int(multiplier * 64)
        cnn.conv1 = _resized_conv(cnn.conv1, cnn.conv1.in_channels, width)
        cnn.bn1 = type(cnn.bn1)(width)
        first.conv1 = _resized_conv(first.conv1, width, first.conv1.out_channels)
        first.downsample[0] = _resized_conv(first.downsample[0], width, first.downsample[0].out_channels)
        cnn.feature_info[0]["num_chs"] = width
    return cnn


def _isc(num_classes: int, chs: int) -> nn.Sequential:
    """Inline Subnetwork Collaboration: an earlier exit's logits projected to features."""
    return nn.Sequential(nn.Linear(num_classes, chs), nn.BatchNorm1d(chs), nn.ReLU(inplace=True))


class DynPerceiver(MultiExitModel):
    """Dynamic Perceiver on a timm RegNetY, ResNet or MobileNetV3-Large, four exits (see the module docstring
    for their order).

    The configuration the reference's README trains (spatial reduction, x -> z with depthwise convs,
    z -> x, the last cross-attention and ISC all on); the reference's ablation switches are not offered.

    Args:
        cnn: the timm RegNet or ResNet the CNN branch is (its stem, four stages and head), or
            ``"mobilenetv3_large_100"`` for timm's MobileNetV3-Large built as the reference builds it.
        cnn_multiplier: the reference's channel multiplier: of a ResNet-50-style branch (stem and stage widths
            times it, e.g. 0.375 for its ``resnet50_0375``), or the MobileNetV3 width multiplier (0.75 for its
            ``mobilenetV3_0x75``).
        num_latents: latent tokens in stage 1; stages 2-4 have 1/2, 1/4, 1/8 of them.
        depths: self-attention layers of the four latent stages (the reference's ``3, 3, 9, 3`` times
            its ``--depth_factor``).
        num_heads: self-attention heads of the four latent stages.
        mlp_ratio: the self-attention layers' MLP width factor (the reference's ``--SA_widening_factor``).
        num_classes: the number of classes (> 0: ISC feeds logits forward).
        in_chans: the input channels.
        drop_rate: dropout before every exit's last linear layer (inside the CNN's and the merged exit's
            MLP heads when the CNN's head has a hidden layer, as MobileNetV3's has).
        drop_path_rate: stochastic depth of the CNN branch's blocks (timm's, passed to it).
        multi_exit_training: ``model(x)`` in training mode returns every exit's logits (the default) or,
            ``False``, the last exit's alone (see :meth:`~.MultiExitModel.set_multi_exit_training`).
        device, dtype: where and as what the parameters are created (``None``: torch's defaults).
    """

    def __init__(
            self,
            cnn: str = "regnety_008_tv",
            cnn_multiplier: float = 1.0,
            num_latents: int = 128,
            depths: Sequence[int] = (3, 3, 9, 6),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            mlp_ratio: float = 4.0,
            num_classes: int = 1000,
            in_chans: int = 3,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            multi_exit_training: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"DynPerceiver's exits feed their logits to later exits (ISC): num_classes must be "
                             f">= 1, got {num_classes}")
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"depths and num_heads need one entry per latent stage (4), got {depths} and {num_heads}")
        if num_latents < 8 or num_latents % 8:
            raise ValueError(f"num_latents must be a positive multiple of 8 (halved three times), got {num_latents}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_exits = 4
        self.exit_index = 3
        self.multi_exit_training = multi_exit_training
        self.grad_checkpointing = False
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.cnn = _create_cnn(cnn, cnn_multiplier, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                                   drop_path_rate=drop_path_rate)
            self._build(num_latents, depths, num_heads, mlp_ratio, num_classes, drop_rate)
        if dtype is not None:
            self.to(dtype)

    def _build(self, num_latents: int, depths: Sequence[int], num_heads: Sequence[int], mlp_ratio: float,
               num_classes: int, drop_rate: float) -> None:
        # the latents' width in each stage is the CNN stage's input width: the output width of what precedes it
        # (the reference reads the first block's input channels; for a ResNet, the max-pool keeps the stem's width;
        # a MobileNetV3's stem and stages each end one block after a downsampling block)
        if isinstance(self.cnn, MobileNetV3):
            blocks = self.cnn.blocks
            widths = [b.conv_pwl.out_channels for b in (blocks[1][0], blocks[2][0], blocks[3][0], blocks[5][0])]
        else:
            widths = [info["num_chs"] for info in self.cnn.feature_info[:4]]
        out_chs, hidden = self.cnn.num_features, self.cnn.head_hidden_size
        tokens = [num_latents // 2 ** i for i in range(4)]
        for w, h in zip(widths, num_heads):
            if w % h:
                raise ValueError(f"a latent stage {w} wide cannot have {h} heads (widths {widths}, heads {num_heads})")
        self.latent = nn.Parameter(torch.zeros(num_latents, widths[0]).normal_(0.0, 0.02).clamp_(-2.0, 2.0))
        self.latent_stages = nn.ModuleList(
            LatentStage(widths[i], depths[i], num_heads[i], mlp_ratio,
                        (tokens[i - 1], tokens[i], widths[i - 1]) if i else None) for i in range(4))
        self.to_map_last = LatentsToMap(out_chs, widths[3])
        self.head_drop = nn.Dropout(drop_rate)
        self.head_latent = nn.Linear(widths[2], num_classes)
        self.isc_att = _isc(num_classes, widths[3])
        self.head_att = nn.Linear(2 * widths[3], num_classes)
        self.isc_merge = _isc(num_classes, widths[3])
        merged = out_chs + 2 * widths[3]
        # the merged exit's classifier has the CNN head's form: a linear layer, or (MobileNetV3) an MLP as wide
        self.merge_mlp = hidden != out_chs
        if self.merge_mlp:
            self.head_merge = nn.Sequential(nn.BatchNorm1d(merged), nn.Linear(merged, hidden), nn.Hardswish(),
                                            nn.Dropout(drop_rate), nn.Linear(hidden, num_classes))
        else:
            self.head_merge = nn.Sequential(nn.BatchNorm1d(merged), nn.Linear(merged, num_classes))
        self.exit_widths = [widths[2], 2 * widths[3], hidden, merged]
        self.num_features = self.head_hidden_size = merged

    # --- the multi-exit contract -----------------------------------------------------------------

    def forward_stem(self, x: torch.Tensor) -> List[torch.Tensor]:
        _check_input(x, self.in_chans)
        # the latents as a copy per sample (a view of a parameter would not be sliceable state)
        return [self._cnn_stem(x), self.latent.repeat(x.shape[0], 1, 1)]

    def forward_stage(self, state: List[torch.Tensor], index: int) -> List[torch.Tensor]:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x, z = checkpoint(self._advance, state[0], state[1], index, use_reentrant=False)
        else:
            x, z = self._advance(state[0], state[1], index)
        state = [x, z] + state[2:]
        state.append(self._classify(state, index))
        return state

    def _advance(self, x: torch.Tensor, z: torch.Tensor, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The CNN map and the latents after stage ``index`` (the stage's work before its exit)."""
        if index == 0:  # latent stages 1-3 with CNN stages 1-2
            x, z = self.latent_stages[0](x, z)
            x, z = self.latent_stages[1](self._cnn_stage(x, 1), z)
            x, z = self.latent_stages[2](self._cnn_stage(x, 2), z)
        elif index == 1:  # CNN stage 3, latent stage 4
            x, z = self.latent_stages[3](self._cnn_stage(x, 3), z)
        elif index == 2:  # CNN stage 4
            x = self._cnn_stage(x, 4)
        elif index == 3:
            x = self.to_map_last(x, z)
        else:
            raise IndexError(f"stage index {index} out of range for 4 stages")
        return x, z

    # the CNN families' module names (``hasattr`` on a module is resolved when TorchScript compiles)

    def _cnn_stem(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.cnn, "conv_stem"):  # MobileNetV3: conv, norm, the depthwise-separable block, block 2
            return self.cnn.blocks[1][0](self.cnn.blocks[0](self.cnn.bn1(self.cnn.conv_stem(x))))
        if hasattr(self.cnn, "layer1"):  # ResNet: conv, norm, activation, max-pool
            return self.cnn.maxpool(self.cnn.act1(self.cnn.bn1(self.cnn.conv1(x))))
        return self.cnn.stem(x)

    def _cnn_stage(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """CNN stage ``stage`` (1-4)."""
        if hasattr(self.cnn, "conv_stem"):  # MobileNetV3: the reference's cuts through timm's block groups
            b = self.cnn.blocks
            if stage == 1:
                return b[2][0](b[1][1](x))
            if stage == 2:
                return b[3][0](b[2][2](b[2][1](x)))
            if stage == 3:
                return b[5][0](b[4](b[3][3](b[3][2](b[3][1](x)))))
            return b[6](b[5][2](b[5][1](x)))
        if hasattr(self.cnn, "layer1"):
            if stage == 1:
                return self.cnn.layer1(x)
            if stage == 2:
                return self.cnn.layer2(x)
            return self.cnn.layer3(x) if stage == 3 else self.cnn.layer4(x)
        if stage == 1:
            return self.cnn.s1(x)
        if stage == 2:
            return self.cnn.s2(x)
        return self.cnn.s3(x) if stage == 3 else self.cnn.s4(x)

    def _features(self, state: List[torch.Tensor], index: int) -> torch.Tensor:
        """The features exit ``index``'s classifier reads (for exits 2 and 4, with the ISC of the logits
        of exits 1 and 2)."""
        x, z = state[0], state[1]
        if index == 0:
            return z.mean(1)
        if index == 1:
            return torch.cat([z.mean(1), self.isc_att(state[2])], 1)
        if index == 2:
            return self.cnn.forward_head(x, pre_logits=True)
        return torch.cat([x.mean((2, 3)), z.mean(1), self.isc_merge(state[3])], 1)

    def _classify(self, state: List[torch.Tensor], index: int) -> torch.Tensor:
        if index == 2:
            return self.cnn.forward_head(state[0])
        features = self._features(state, index)
        if index < 3 or not self.merge_mlp:  # an MLP head drops inside, before its last linear layer
            features = self.head_drop(features)
        if index == 0:
            return self.head_latent(features)
        if index == 1:
            return self.head_att(features)
        return self.head_merge(features)

    def forward_exit(self, state: List[torch.Tensor], index: int, pre_logits: bool = False) -> torch.Tensor:
        """Exit ``index``'s logits (computed by its stage), or the features its classifier reads."""
        if not 0 <= index < self.num_exits:
            raise IndexError(f"exit index {index} out of range for {self.num_exits} exits")
        if pre_logits:
            return self._features(state, index)
        return state[2 + index]

    def split_state_grad(self, state: List[torch.Tensor], keep: float) -> List[torch.Tensor]:
        """Deep Feature Surgery splits the channels of the CNN map (dimension 1) and of the latents (the last
        dimension); the logits carried for ISC pass the next stage's gradient whole."""
        return [detach_channels(state[0], keep, 1), detach_channels(state[1], keep, -1)] + list(state[2:])

    # --- timm's model interface ------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The state after the active exit's stage (what :meth:`forward_head` reads)."""
        return self.forward_until(x, self.exit_index)

    def forward_head(self, x: List[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        """The active exit's logits.

        Args:
            x: the output of :meth:`forward_features`.
            pre_logits: return the features the exit's classifier reads instead.

        Returns:
            The logits ``(batch, classes)``, or the features.
        """
        return self.forward_exit(x, self.exit_index, pre_logits)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise lr decay: the CNN stem with the latents, then the CNN
        stages; the latent branch and the heads are unmatched (the last group, the head's)."""
        return dict(stem=r"^cnn\.(?:stem|conv1|conv_stem|bn1)\.|^latent$",
                    blocks=r"^cnn\.(?:s|layer|blocks\.)(\d+)" if coarse else r"^cnn\.(?:s|layer|blocks\.)(\d+)\.b?(\d+)")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head_merge[-1]

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New class-dependent layers for ``num_classes`` classes: the four exits' classifiers and the two ISC
        projections that read logits (fine-tuning); the rest keeps its weights.

        Args:
            num_classes: the new class count (>= 1: there is no headless form, the merged exit's
                features read exit 2's logits).
            global_pool: only ``None`` or ``"avg"`` (the pooling is fixed).
        """
        if num_classes < 1:
            raise ValueError(f"DynPerceiver has no headless form (its merged exit's features read exit 2's logits "
                             f"through ISC): num_classes must be >= 1, got {num_classes}")
        if global_pool not in (None, "avg"):
            raise ValueError(f"DynPerceiver pools by average only, got global_pool={global_pool!r}")
        like = self.head_latent.weight
        linear = lambda i, o: nn.Linear(i, o, device=like.device, dtype=like.dtype)  # noqa: E731
        self.num_classes = num_classes
        self.head_latent = linear(self.head_latent.in_features, num_classes)
        self.head_att = linear(self.head_att.in_features, num_classes)
        self.head_merge[-1] = linear(self.head_merge[-1].in_features, num_classes)
        self.isc_att[0] = linear(num_classes, self.isc_att[0].out_features)
        self.isc_merge[0] = linear(num_classes, self.isc_merge[0].out_features)
        self.cnn.reset_classifier(num_classes)
        self.cnn.get_classifier().to(like.device, like.dtype)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every stage's work (CNN blocks, cross-attention, latent blocks) in
        training: recomputed in the backward pass instead of stored. The exits' heads are not checkpointed.

        Args:
            enable: on or off.
        """
        self.grad_checkpointing = enable


# --- the reference's checkpoint layout -----------------------------------------------------------

_CROSS = [("cross_attn.q_norm.", "norm_q."), ("cross_attn.kv_norm.", "norm_kv."),
          ("cross_attn.attention.q_proj.", "q."), ("cross_attn.attention.k_proj.", "k."),
          ("cross_attn.attention.v_proj.", "v."), ("cross_attn.attention.o_proj.", "proj."),
          ("cross_attn.attention.relative_position_bias", "pos_bias"), ("mlp.layernorm.", "norm2."),
          ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2.")]
_SELF = [("self_attn.norm.", "norm1."), ("self_attn.attention.o_proj.", "attn.proj."), ("mlp.layernorm.", "norm2."),
         ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2.")]
_HEADS = {"early_classifier3.": "head_latent.", "classifier_att.": "head_att.", "isc3.": "isc_att.",
          "isc4.": "isc_merge.", "classifier_merge.": "head_merge.", "latent": "latent"}


def _rename(rest: str, rules: Sequence[Tuple[str, str]], key: str) -> str:
    for old, new in rules:
        if rest.startswith(old):
            return new + rest[len(old):]
    raise KeyError(key)


def _map_latent_key(key: str) -> str:
    m = re.match(r"dwc(\d)_x2z\.(.*)$", key)
    if m:
        return f"latent_stages.{int(m.group(1)) - 1}.to_latents.dwc.{m.group(2)}"
    m = re.match(r"cross_att(\d)_x2z\.(.*)$", key)
    if m:
        return f"latent_stages.{int(m.group(1)) - 1}.to_latents.attn." + _rename(m.group(2), _CROSS, key)
    m = re.match(r"cross_att(\d)_z2x\.(.*)$", key)
    if m:
        return f"latent_stages.{int(m.group(1)) - 1}.to_map.attn." + _rename(m.group(2), _CROSS, key)
    if key.startswith("last_cross_att_z2x."):
        return "to_map_last.attn." + _rename(key[len("last_cross_att_z2x."):], _CROSS, key)
    m = re.match(r"self_att(\d)\.(\d+)\.(.*)$", key)
    if m:
        return f"latent_stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}." + _rename(m.group(3), _SELF, key)
    m = re.match(r"token_(mixer|expander)\.(\d)\.([01])\.(.*)$", key)
    if m:
        part = {("mixer", "0"): "token_norm", ("mixer", "1"): "token_mix",
                ("expander", "0"): "norm", ("expander", "1"): "expand"}[m.group(1), m.group(3)]
        return f"latent_stages.{int(m.group(2)) + 1}.resize.{part}.{m.group(4)}"
    return _rename(key, list(_HEADS.items()), key)


def _map_resnet_key(key: str) -> str:
    """The reference's ResNet branch (timm's ResNet modules regrouped) -> timm's ResNet names."""
    m = re.match(r"cnn_stem\.([01])\.(.*)$", key)  # the stem Sequential: conv1, bn1, act1, maxpool
    if m:
        return ("conv1." if m.group(1) == "0" else "bn1.") + m.group(2)
    m = re.match(r"cnn_body_stage(\d)\.(.*)$", key)
    if m:
        return f"layer{m.group(1)}.{m.group(2)}"
    return "fc." + key[len("classifier_cnn."):]


# torchvision's MobileNetV3 layers inside a block -> timm's: (depthwise-separable, inverted residual without / with
# squeeze-excitation, the last 1x1 conv)
_MOBILENETV3_LAYERS = {
    "ds": [("block.0.0.", "conv_dw."), ("block.0.1.", "bn1."), ("block.1.0.", "conv_pw."), ("block.1.1.", "bn2.")],
    "ir": [("block.0.0.", "conv_pw."), ("block.0.1.", "bn1."), ("block.1.0.", "conv_dw."), ("block.1.1.", "bn2."),
           ("block.2.0.", "conv_pwl."), ("block.2.1.", "bn3.")],
    "ir_se": [("block.0.0.", "conv_pw."), ("block.0.1.", "bn1."), ("block.1.0.", "conv_dw."), ("block.1.1.", "bn2."),
              ("block.2.fc1.", "se.conv_reduce."), ("block.2.fc2.", "se.conv_expand."), ("block.3.0.", "conv_pwl."),
              ("block.3.1.", "bn3.")],
    "cn": [("0.", "conv."), ("1.", "bn1.")],
}
_MOBILENETV3_STAGE_START = {"cnn_stem": 0, "cnn_body_stage1": 3, "cnn_body_stage2": 5, "cnn_body_stage3": 8,
                            "cnn_body_stage4": 14}


def _mobilenetv3_blocks(cnn: MobileNetV3) -> List[Tuple[int, int, nn.Module]]:
    """timm's MobileNetV3 blocks in the order they run, each with its group and index in the group."""
    return [(i, j, block) for i, group in enumerate(cnn.blocks) for j, block in enumerate(group)]


def _map_mobilenetv3_key(key: str, blocks: List[Tuple[int, int, nn.Module]],
                         value: torch.Tensor) -> Tuple[str, torch.Tensor]:
    """The reference's MobileNetV3 branch (torchvision's ``features`` 0-16 regrouped into ``cnn_stem`` and
    ``cnn_body_stage1``..``4``; its head MLP ``classifier_cnn``) -> timm's names (the head's first linear layer
    is timm's 1x1 ``conv_head``). ``blocks``: :func:`_mobilenetv3_blocks` of the model's branch."""
    m = re.match(r"classifier_cnn\.([03])\.(weight|bias)$", key)
    if m:
        if m.group(1) == "3":
            return "classifier." + m.group(2), value
        return "conv_head." + m.group(2), value[:, :, None, None] if m.group(2) == "weight" else value
    m = re.match(r"(cnn_stem|cnn_body_stage\d)\.(\d+)\.(.*)$", key)
    if not m:
        raise KeyError(key)
    feature = _MOBILENETV3_STAGE_START[m.group(1)] + int(m.group(2))
    if feature == 0:  # the stem conv and its norm
        return _rename(m.group(3), [("0.", "conv_stem."), ("1.", "bn1.")], key), value
    i, j, block = blocks[feature - 1]
    kind = ("cn" if hasattr(block, "conv") else "ds" if not hasattr(block, "conv_pwl")
            else "ir" if isinstance(block.se, nn.Identity) else "ir_se")
    return f"blocks.{i}.{j}." + _rename(m.group(3), _MOBILENETV3_LAYERS[kind], key), value


def checkpoint_filter_fn(state_dict: dict, model: DynPerceiver) -> dict:
    """Map a reference checkpoint (LeapLabTHU/Dynamic_Perceiver, its RegNet, ResNet and MobileNetV3 models)
    onto this model; a state dict in this package's own layout passes through unchanged.

    A RegNet branch (torchvision's RegNet layout under ``cnn_stem``, ``cnn_body`` and ``classifier_cnn``)
    goes through timm's own RegNet filter; a ResNet branch (timm's ResNet modules under ``cnn_stem.0`` /
    ``.1`` and ``cnn_body_stage1``..``4``) and a MobileNetV3 branch (torchvision's MobileNetV3 layers under
    ``cnn_stem``, ``cnn_body_stage1``..``4`` and the MLP ``classifier_cnn``) are renamed; the separate q / k / v projections of the latents'
    self-attention are stacked into timm's ``qkv``.

    Args:
        state_dict: the checkpoint's state dict (``model`` / ``model_ema`` already taken out by the
            caller or by timm; ``module.`` stripped).
        model: the model it is loaded into.

    Returns:
        The state dict keyed by the model's names.
    """
    state_dict = state_dict.get("model", state_dict)
    if not any(k.startswith("cnn_stem.") for k in state_dict):
        return state_dict
    cnn, out, qkv = {}, {}, {}
    resnet, mobilenet = isinstance(model.cnn, ResNet), isinstance(model.cnn, MobileNetV3)
    blocks = _mobilenetv3_blocks(model.cnn) if mobilenet else []
    for key, value in state_dict.items():
        try:
            if resnet and key.startswith(("cnn_stem.", "cnn_body_stage", "classifier_cnn.")):
                out["cnn." + _map_resnet_key(key)] = value
            elif mobilenet and key.startswith(("cnn_stem.", "cnn_body_stage", "classifier_cnn.")):
                name, value = _map_mobilenetv3_key(key, blocks, value)
                out["cnn." + name] = value
            elif key.startswith(("cnn_stem.", "cnn_body.", "classifier_cnn.")):
                tv_key = key.replace("cnn_stem.", "stem.").replace("cnn_body.", "trunk_output.").replace("classifier_cnn.", "fc.")
                cnn[tv_key] = value
            elif m := re.match(r"(self_att\d\.\d+)\.self_attn\.attention\.([qkv])_proj\.weight$", key):
                qkv.setdefault(m.group(1), {})[m.group(2)] = value
            else:
                out[_map_latent_key(key)] = value
        except (KeyError, IndexError):
            raise ValueError(f"{key!r} is not a key of a reference Dynamic Perceiver checkpoint with a "
                             f"{type(model.cnn).__name__} branch; is this file one, for this model?") from None
    if cnn:
        out.update({f"cnn.{k}": v for k, v in regnet_filter_fn(cnn).items()})
    for prefix, parts in qkv.items():
        stage, layer = re.match(r"self_att(\d)\.(\d+)", prefix).groups()
        out[f"latent_stages.{int(stage) - 1}.blocks.{layer}.attn.qkv.weight"] = torch.cat([parts[p] for p in "qkv"])
    return out


def _create_dyn_perceiver(variant: str, pretrained: bool = False, **kwargs) -> DynPerceiver:
    if kwargs.get("features_only"):
        raise ValueError(f"{variant} has no features_only form: a CNN stage's output is changed by the latents' "
                         f"attention before the next stage reads it; use forward_exits or forward_exit(pre_logits=True)")
    # the merged exit's classifier, in this layout or the reference's, tells the file's class count (ISC layers read
    # it); with a MobileNetV3 branch it is the last layer of an MLP
    last = 4 if kwargs.get("cnn") == "mobilenetv3_large_100" else 1
    kwargs = keep_file_classifiers(variant, pretrained, kwargs, classifiers=(f"head_merge.{last}", f"classifier_merge.{last}"))
    return build_model_with_cfg(DynPerceiver, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(cnn_head: str = "cnn.head.fc", merge_head: str = "head_merge.1", **kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "cnn.stem.conv",
        "classifier": ("head_latent", "head_att", cnn_head, merge_head, "isc_att.0", "isc_merge.0"), "license": "mit", **kwargs,
    }


def _resnet_cfg() -> dict:
    return _cfg(cnn_head="cnn.fc", first_conv="cnn.conv1")


def _mobilenetv3_cfg() -> dict:
    return _cfg(cnn_head="cnn.classifier", merge_head="head_merge.4", first_conv="cnn.conv_stem")


# CIFAR-10 training-set statistics
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

default_cfgs = generate_default_cfgs({
    "dyn_perceiver_regnety_004": _cfg(),
    "dyn_perceiver_regnety_008": _cfg(),
    "dyn_perceiver_regnety_016": _cfg(),
    "dyn_perceiver_regnety_032": _cfg(),
    "dyn_perceiver_regnety_002_cifar": _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(1, 1), crop_pct=1.0,
                                            mean=CIFAR10_MEAN, std=CIFAR10_STD),
    "dyn_perceiver_resnet50_0375": _resnet_cfg(),
    "dyn_perceiver_resnet50_050": _resnet_cfg(),
    "dyn_perceiver_resnet50_0625": _resnet_cfg(),
    "dyn_perceiver_resnet50_075": _resnet_cfg(),
    "dyn_perceiver_resnet50": _resnet_cfg(),
    "dyn_perceiver_mobilenetv3_large_075": _mobilenetv3_cfg(),
    "dyn_perceiver_mobilenetv3_large_100": _mobilenetv3_cfg(),
})

# the reference README's flags: --depth_factor 1 1 1 2 (self-attention layers 3, 3, 9, 6) --SA_widening_factor 4
_README_ARGS = dict(num_latents=128, depths=(3, 3, 9, 6), num_heads=(1, 2, 4, 8), mlp_ratio=4.0)


@register_model
def dyn_perceiver_regnety_004(pretrained: bool = False, **kwargs) -> DynPerceiver:
    """Dynamic Perceiver on RegNetY-400MF, 128 latents (the reference's reg400m_perceiver_t128, README flags)."""
    model_args = dict(_README_ARGS, cnn="regnety_004")
    return _create_dyn_perceiver("dyn_perceiver_regnety_004", pretrained, **dict(model_args, **kwargs))


@register_model
def dyn_perceiver_regnety_008(pretrained: bool = False, **kwargs) -> DynPerceiver:
    """Dynamic Perceiver on RegNetY-800MF, 128 latents (the reference's reg800m_perceiver_t128, README flags)."""
    model_args = dict(_README_ARGS, cnn="regnety_008_tv")
    return _create_dyn_perceiver("dyn_perceiver_regnety_008", pretrained, **dict(model_args, **kwargs))


@register_model
def dyn_perceiver_regnety_016(pretrained: bool = False, **kwargs) -> DynPerceiver:
    """Dynamic Perceiver on RegNetY-1.6GF, 128 latents (the reference's reg1x6g_perceiver_t128, README flags)."""
    model_args = dict(_README_ARGS, cnn="regnety_016")
    return _create_dyn_perceiver("dyn_perceiver_regnety_016", pretrained, **dict(model_args, **kwargs))


@register_model
def dyn_perceiver_regnety_032(pretrained: bool = False, **kwargs) -> DynPerceiver:
    """Dynamic Perceiver on RegNetY-3.2GF, 128 latents (the reference's reg3x2g_perceiver_t128, README flags)."""
    model_args = dict(_README_ARGS, cnn="regnety_032")
    return _create_dyn_perceiver("dyn_perceiver_regnety_032", pretrained, **dict(model_args, **kwargs))


@register_model
def dyn_perceiver_regnety_002_cifar(pretrained: bool = False, **kwargs) -> DynPerceiver:
    """Dynamic Perceiver on RegNetY-200MF for 32x32 images, 64 latents, the README's latent depths."""
    model_args = dict(_README_ARGS, cnn="regnety_002", num_latents=64, num_classes=10)
    return _create_dyn_perceiver("dyn_perceiver_regnety_002_cifar", pretrained, **dict(model_args, **kwargs))


# the README's ResNet command: --depth_factor 1 1 1 1 (self-attention layers 3, 3, 9, 3) --SA_widening_factor 4
_RESNET_ARGS = dict(_README_ARGS, cnn="resnet50", depths=(3, 3, 9, 3))


@register_model
def dyn_perceiver_resnet50_0375(pretrained: bool = False, **kwargs) -> DynPerceiver:
    """Dynamic Perceiver on ResNet-50 x0.375, 128 latents (the reference's resnet50_0375_perceiver_t128, README flags)."""
    model_args = dict(_RESNET_ARGS, cnn_multiplier=0.375)
    return _create_dyn_perceiver("dyn_perceiver_resnet50_0375", pretrained, **dict(model_args, **kwargs))


@register_model
def dyn_perceiver_resnet50_050(pretrained: bool = False, **kwargs) -> DynPerceiver:
    """Dynamic Perceiver on ResNet-50 x0.5, 128 latents (the reference's resnet50_050_perceiver_t128, README flags)."""
    model_args = dict(_RESNET_ARGS, cnn_multiplier=0.5)
    return _create_dyn_perceiver("dyn_perceiver_resnet50_050", pretrained, **dict(model_args, **kwargs))


@register_model
def dyn_perceiver_resnet50_0625(pretrained: bool = False, **kwargs) -> DynPerceiver:
    """Dynamic Perceiver on ResNet-50 x0.625, 128 latents (the reference's resnet50_0625_perceiver_t128, README flags)."""
    model_args = dict(_RESNET_ARGS, cnn_multiplier=0.625)
    return _create_dyn_perceiver("dyn_perceiver_resnet50_0625", pretrained, **dict(model_args, **kwargs))


@register_model
def dyn_perceiver_resnet50_075(pretrained: bool = False, **kwargs) -> DynPerceiver:
    """Dynamic Perceiver on ResNet-50 x0.75, 128 latents (the reference's resnet50_075_perceiver_t128, README flags)."""
    model_args = dict(_RESNET_ARGS, cnn_multiplier=0.75)
    return _create_dyn_perceiver("dyn_perceiver_resnet50_075", pretrained, **dict(model_args, **kwargs))


@register_model
def dyn_perceiver_resnet50(pretrained: bool = False, **kwargs) -> DynPerceiver:
    """Dynamic Perceiver on ResNet-50, 128 latents (the reference's resnet50_perceiver_t128, README flags)."""
    return _create_dyn_perceiver("dyn_perceiver_resnet50", pretrained, **dict(_RESNET_ARGS, **kwargs))


# the README's MobileNetV3 command: --depth_factor 1 1 1 3 (self-attention layers 3, 3, 9, 9) --SA_widening_factor 4
_MOBILENETV3_ARGS = dict(_README_ARGS, cnn="mobilenetv3_large_100", depths=(3, 3, 9, 9))


@register_model
def dyn_perceiver_mobilenetv3_large_075(pretrained: bool = False, **kwargs) -> DynPerceiver:
    """Dynamic Perceiver on MobileNetV3-Large x0.75, 128 latents (the reference's mobilenetV3_0x75_perceiver_t128, README flags)."""
    model_args = dict(_MOBILENETV3_ARGS, cnn_multiplier=0.75)
    return _create_dyn_perceiver("dyn_perceiver_mobilenetv3_large_075", pretrained, **dict(model_args, **kwargs))


@register_model
def dyn_perceiver_mobilenetv3_large_100(pretrained: bool = False, **kwargs) -> DynPerceiver:
    """Dynamic Perceiver on MobileNetV3-Large, 128 latents (the reference's mobilenetV3_perceiver_t128, the README's MobileNetV3 flags)."""
    return _create_dyn_perceiver("dyn_perceiver_mobilenetv3_large_100", pretrained, **dict(_MOBILENETV3_ARGS, **kwargs))
