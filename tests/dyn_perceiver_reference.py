"""An independent statement of the Dynamic Perceiver reference forward (LeapLabTHU/Dynamic_Perceiver,
``models/dyn_perceiver_regnet.py`` and ``models/dyn_perceiver_resnet.py`` with the README's flags), in the
reference's own state-dict layout.

A RegNet CNN branch is torchvision's RegNet (which the reference's ``cnn_core/regnet.py`` is), under the
reference's names ``cnn_stem``, ``cnn_body`` and ``classifier_cnn``. A ResNet branch (the reference's
``cnn_core/resnet.py``: ResNet-50 with a channel multiplier on the stem and every stage) is written here as
functions of the state dict, under ``cnn_stem.0`` / ``.1`` (7x7 conv, BN; then ReLU, 3x3 max-pool),
``cnn_body_stage1``..``4`` (bottlenecks: 1x1, 3x3 with the stride, 1x1 to 4x the width, BN after each, a
1x1 strided projection with BN on the first block's shortcut) and ``classifier_cnn``. A MobileNetV3 branch
(``models/dyn_perceiver_mobilenet_v3.py`` on torchvision's ``mobilenet_v3_large`` at a width multiplier) is
written as functions of the state dict too: torchvision's 17 ``features`` (a 3x3 stem conv, 15 inverted
residuals, a last 1x1 conv; every width rounded to a multiple of 8 after scaling; BN eps 1e-3) cut into
``cnn_stem`` (features 0-2) and ``cnn_body_stage1``..``4`` (3-4, 5-7, 8-13, 14-16), and MLP classifiers
(Linear, Hardswish, Dropout, Linear) for the CNN and merged exits. The latent branch is
written as plain functions of the state dict, from the reference's equations:

* attention: q, k, v projections without bias, a position bias added to the keys (x -> z only), one
  softmax over keys scaled by the per-head width^-1/2, an output projection with bias;
* a cross-attention layer is ``q + attn(LN(q), LN(kv))``, then ``+ MLP(.)`` (LN, fc1, GELU, fc2, as wide
  as the queries); a self-attention layer the same with ``kv = q`` and ``mlp_ratio`` times wider MLP;
* token mixer: LN and a linear map over the token axis; expander: LN and a linear map over channels.
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision.models.regnet import BlockParams, RegNet

__all__ = ["reference_cnn", "ReferenceResNet", "ReferenceMobileNetV3", "reference_state_dict", "reference_forward"]


def reference_cnn(depth: int, w_0: int, w_a: float, w_m: float, group_width: int, num_classes: int) -> RegNet:
    """torchvision's RegNetY from its generating parameters (SE ratio 0.25, as ``regnet_y_*``)."""
    params = BlockParams.from_init_params(depth=depth, w_0=w_0, w_a=w_a, w_m=w_m, group_width=group_width, se_ratio=0.25)
    return RegNet(params, num_classes=num_classes)


class ReferenceResNet:
    """The reference's ResNet-50 CNN branch at a channel multiplier, as functions of its state-dict part."""

    def __init__(self, multiplier: float, num_classes: int, layers: Sequence[int] = (3, 4, 6, 3)):
        self.stem = int(64 * multiplier)
        self.planes = [int(c * multiplier) for c in (64, 128, 256, 512)]
        self.layers = layers
        self.num_classes = num_classes

    def widths(self) -> Tuple[List[int], int]:
        """Each stage's input width and the last stage's output width."""
        return [self.stem] + [4 * p for p in self.planes[:3]], 4 * self.planes[3]

    def shapes(self) -> Dict[str, tuple]:
        shapes = {"cnn_stem.0.weight": (self.stem, 3, 7, 7), **_bn_shapes("cnn_stem.1.", self.stem)}
        inplanes = self.stem
        for i, (planes, n) in enumerate(zip(self.planes, self.layers)):
            for j in range(n):
                p = f"cnn_body_stage{i + 1}.{j}."
                shapes.update({p + "conv1.weight": (planes, inplanes, 1, 1), p + "conv2.weight": (planes, planes, 3, 3),
                               p + "conv3.weight": (4 * planes, planes, 1, 1), **_bn_shapes(p + "bn1.", planes),
                               **_bn_shapes(p + "bn2.", planes), **_bn_shapes(p + "bn3.", 4 * planes)})
                if j == 0:
                    shapes.update({p + "downsample.0.weight": (4 * planes, inplanes, 1, 1),
                                   **_bn_shapes(p + "downsample.1.", 4 * planes)})
                inplanes = 4 * planes
        shapes.update({"classifier_cnn.weight": (self.num_classes, inplanes), "classifier_cnn.bias": (self.num_classes,)})
        return shapes

    def forward_stem(self, sd, x):
        x = F.relu(_bn2d(sd, "cnn_stem.1.", F.conv2d(x, sd["cnn_stem.0.weight"], stride=2, padding=3)))
        return F.max_pool2d(x, 3, 2, 1)

    def forward_stage(self, sd, stage, x):
        for j in range(self.layers[stage - 1]):
            p = f"cnn_body_stage{stage}.{j}."
            stride = 2 if j == 0 and stage > 1 else 1
            out = F.relu(_bn2d(sd, p + "bn1.", F.conv2d(x, sd[p + "conv1.weight"])))
            out = F.relu(_bn2d(sd, p + "bn2.", F.conv2d(out, sd[p + "conv2.weight"], stride=stride, padding=1)))
            out = _bn2d(sd, p + "bn3.", F.conv2d(out, sd[p + "conv3.weight"]))
            if j == 0:
                x = _bn2d(sd, p + "downsample.1.", F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride))
            x = F.relu(out + x)
        return x


def _divisible8(v: float) -> int:
    """torchvision's channel rounding: the nearest multiple of 8 (at least 8), never more than 10% below ``v``."""
    new = max(8, int(v + 4) // 8 * 8)
    return new + 8 if new < 0.9 * v else new


# torchvision's mobilenet_v3_large, features 1-15: kernel, expanded width, output width, SE, hard-swish, stride
_MNV3_BLOCKS = [(3, 16, 16, 0, 0, 1), (3, 64, 24, 0, 0, 2), (3, 72, 24, 0, 0, 1), (5, 72, 40, 1, 0, 2),
                (5, 120, 40, 1, 0, 1), (5, 120, 40, 1, 0, 1), (3, 240, 80, 0, 1, 2), (3, 200, 80, 0, 1, 1),
                (3, 184, 80, 0, 1, 1), (3, 184, 80, 0, 1, 1), (3, 480, 112, 1, 1, 1), (3, 672, 112, 1, 1, 1),
                (5, 672, 160, 1, 1, 2), (5, 960, 160, 1, 1, 1), (5, 960, 160, 1, 1, 1)]
_MNV3_STAGES = {"cnn_body_stage1": (3, 5), "cnn_body_stage2": (5, 8), "cnn_body_stage3": (8, 14), "cnn_body_stage4": (14, 17)}


class ReferenceMobileNetV3:
    """The reference's MobileNetV3-Large CNN branch at a width multiplier, as functions of its state-dict part."""

    def __init__(self, multiplier: float, num_classes: int):
        self.num_classes = num_classes
        self.stem = _divisible8(16 * multiplier)
        # per feature 1-15: in, expanded, out widths, kernel, SE width (0: none), hard-swish, stride
        self.blocks, c = [], self.stem
        for k, e, o, se, hs, s in _MNV3_BLOCKS:
            e, o = _divisible8(e * multiplier), _divisible8(o * multiplier)
            self.blocks.append((c, e, o, k, _divisible8(e // 4) if se else 0, hs, s))
            c = o
        self.last = 6 * c
        self.hidden = _divisible8(1280 * multiplier)

    @staticmethod
    def _prefix(feature: int) -> str:
        if feature < 3:
            return f"cnn_stem.{feature}."
        name, (start, _) = next((n, r) for n, r in _MNV3_STAGES.items() if r[0] <= feature < r[1])
        return f"{name}.{feature - start}."

    def _layers(self, feature: int):
        """(state-dict prefix, kind, shape) of each layer of feature ``feature`` (1-15), in order."""
        c, e, o, k, se, _, _ = self.blocks[feature - 1]
        p, layers = self._prefix(feature) + "block.", []
        if e != c:
            layers.append((p + f"{len(layers)}.", "conv", (e, c, 1, 1)))
        layers.append((p + f"{len(layers)}.", "dw", (e, 1, k, k)))
        if se:
            layers.append((p + f"{len(layers)}.", "se", (se, e)))
        layers.append((p + f"{len(layers)}.", "project", (o, e, 1, 1)))
        return layers

    def widths(self) -> Tuple[List[int], int]:
        """Each stage's input width (the output of features 2, 4, 7, 13) and the last conv's width."""
        return [self.blocks[f - 1][2] for f in (2, 4, 7, 13)], self.last

    def shapes(self) -> Dict[str, tuple]:
        shapes = {"cnn_stem.0.0.weight": (self.stem, 3, 3, 3), **_bn_shapes("cnn_stem.0.1.", self.stem)}
        for f in range(1, 16):
            for p, kind, shape in self._layers(f):
                if kind == "se":
                    shapes.update({p + "fc1.weight": shape + (1, 1), p + "fc1.bias": shape[:1],
                                   p + "fc2.weight": shape[::-1] + (1, 1), p + "fc2.bias": shape[1:]})
                else:
                    shapes.update({p + "0.weight": shape, **_bn_shapes(p + "1.", shape[0])})
        last_in = self.blocks[-1][2]
        shapes.update({"cnn_body_stage4.2.0.weight": (self.last, last_in, 1, 1), **_bn_shapes("cnn_body_stage4.2.1.", self.last)})
        shapes.update({"classifier_cnn.0.weight": (self.hidden, self.last), "classifier_cnn.0.bias": (self.hidden,),
                       "classifier_cnn.3.weight": (self.num_classes, self.hidden), "classifier_cnn.3.bias": (self.num_classes,)})
        return shapes

    def _feature(self, sd, f, x):
        if f == 0:
            return F.hardswish(_bn2d(sd, "cnn_stem.0.1.", F.conv2d(x, sd["cnn_stem.0.0.weight"], stride=2, padding=1), 1e-3))
        if f == 16:
            p = "cnn_body_stage4.2."
            return F.hardswish(_bn2d(sd, p + "1.", F.conv2d(x, sd[p + "0.weight"]), 1e-3))
        c, e, o, k, _, hs, s = self.blocks[f - 1]
        act = F.hardswish if hs else F.relu
        out = x
        for p, kind, _ in self._layers(f):
            if kind == "se":
                scale = F.conv2d(out.mean((2, 3), keepdim=True), sd[p + "fc1.weight"], sd[p + "fc1.bias"])
                scale = F.conv2d(F.relu(scale), sd[p + "fc2.weight"], sd[p + "fc2.bias"])
                out = out * F.hardsigmoid(scale)
            elif kind == "dw":
                out = act(_bn2d(sd, p + "1.", F.conv2d(out, sd[p + "0.weight"], stride=s, padding=(k - 1) // 2, groups=e), 1e-3))
            else:
                out = _bn2d(sd, p + "1.", F.conv2d(out, sd[p + "0.weight"]), 1e-3)
                out = act(out) if kind == "conv" else out
        return out + x if s == 1 and c == o else out

    def forward_stem(self, sd, x):
        for f in range(3):
            x = self._feature(sd, f, x)
        return x

    def forward_stage(self, sd, stage, x):
        for f in range(*_MNV3_STAGES[f"cnn_body_stage{stage}"]):
            x = self._feature(sd, f, x)
        return x


class _TorchvisionRegNet:
    """The reference's RegNet branch: torchvision's RegNet under the reference's names."""

    names = {"stem.": "cnn_stem.", "trunk_output.": "cnn_body.", "fc.": "classifier_cnn."}

    def __init__(self, cnn: RegNet):
        self.cnn = cnn
        self.blocks = list(cnn.trunk_output.children())

    def widths(self) -> Tuple[List[int], int]:
        return [next(iter(s.children())).f.a[0].in_channels for s in self.blocks], self.blocks[-1][-1].f.c[0].out_channels

    def shapes(self) -> Dict[str, tuple]:
        shapes = {}
        for key, value in self.cnn.state_dict().items():
            prefix = next(p for p in self.names if key.startswith(p))
            shapes[self.names[prefix] + key[len(prefix):]] = tuple(value.shape)
        return shapes

    def forward_stem(self, sd, x):
        names = {v: k for k, v in self.names.items()}
        self.cnn.load_state_dict({names[p] + k[len(p):]: v for k, v in sd.items() for p in names if k.startswith(p)})
        return self.cnn.stem(x)

    def forward_stage(self, sd, stage, x):
        return self.blocks[stage - 1](x)


def _branch(cnn):
    return cnn if isinstance(cnn, (ReferenceResNet, ReferenceMobileNetV3)) else _TorchvisionRegNet(cnn)


def _cross_shapes(prefix: str, q: int, kv: int, attn: int, keys: int = 0) -> Dict[str, tuple]:
    p = prefix + "cross_attn."
    shapes = {p + "q_norm.weight": (q,), p + "q_norm.bias": (q,), p + "kv_norm.weight": (kv,), p + "kv_norm.bias": (kv,),
              p + "attention.q_proj.weight": (attn, q), p + "attention.k_proj.weight": (attn, kv),
              p + "attention.v_proj.weight": (attn, kv), p + "attention.o_proj.weight": (q, attn),
              p + "attention.o_proj.bias": (q,)}
    if keys:
        shapes[p + "attention.relative_position_bias"] = (1, keys, attn)
    shapes.update(_mlp_shapes(prefix + "mlp.", q, q))
    return shapes


def _mlp_shapes(p: str, chs: int, hidden: int) -> Dict[str, tuple]:
    return {p + "layernorm.weight": (chs,), p + "layernorm.bias": (chs,), p + "fc1.weight": (hidden, chs),
            p + "fc1.bias": (hidden,), p + "fc2.weight": (chs, hidden), p + "fc2.bias": (chs,)}


def _bn_shapes(p: str, chs: int) -> Dict[str, tuple]:
    return {p + "weight": (chs,), p + "bias": (chs,), p + "running_mean": (chs,), p + "running_var": (chs,),
            p + "num_batches_tracked": ()}


def reference_state_dict(cnn, num_latents: int, depths: Sequence[int], mlp_ratio: int, num_classes: int,
                         generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """A random float64 state dict in the reference's layout (variances positive); ``cnn`` is torchvision's
    RegNet or a :class:`ReferenceResNet`."""
    branch = _branch(cnn)
    w, out = branch.widths()
    shapes = {"latent": (num_latents, w[0])}
    for i in range(4):
        shapes[f"dwc{i + 1}_x2z.weight"] = (w[i], 1, 7, 7)
        shapes[f"dwc{i + 1}_x2z.bias"] = (w[i],)
        shapes.update(_cross_shapes(f"cross_att{i + 1}_x2z.", w[i], w[i], w[i], 49))
        if i:
            shapes.update(_cross_shapes(f"cross_att{i + 1}_z2x.", w[i], w[i], w[i] // 8))
        for layer in range(depths[i]):
            p = f"self_att{i + 1}.{layer}."
            shapes.update({p + "self_attn.norm.weight": (w[i],), p + "self_attn.norm.bias": (w[i],),
                           **{p + f"self_attn.attention.{n}_proj.weight": (w[i], w[i]) for n in "qkvo"},
                           p + "self_attn.attention.o_proj.bias": (w[i],)})
            shapes.update(_mlp_shapes(p + "mlp.", w[i], mlp_ratio * w[i]))
    shapes.update(_cross_shapes("last_cross_att_z2x.", out, w[3], out // 8))
    tokens = [num_latents // 2 ** i for i in range(4)]
    for i in range(3):
        shapes.update({f"token_mixer.{i}.0.weight": (tokens[i],), f"token_mixer.{i}.0.bias": (tokens[i],),
                       f"token_mixer.{i}.1.weight": (tokens[i + 1], tokens[i]), f"token_mixer.{i}.1.bias": (tokens[i + 1],),
                       f"token_expander.{i}.0.weight": (w[i],), f"token_expander.{i}.0.bias": (w[i],),
                       f"token_expander.{i}.1.weight": (w[i + 1], w[i]), f"token_expander.{i}.1.bias": (w[i + 1],)})
    shapes.update({"early_classifier3.weight": (num_classes, w[2]), "early_classifier3.bias": (num_classes,),
                   "classifier_att.weight": (num_classes, 2 * w[3]), "classifier_att.bias": (num_classes,),
                   })
    hidden = getattr(branch, "hidden", 0)  # the MobileNetV3 branch's merged classifier is an MLP
    shapes.update({"classifier_merge.1.weight": (hidden or num_classes, out + 2 * w[3]),
                   "classifier_merge.1.bias": (hidden or num_classes,)})
    if hidden:
        shapes.update({"classifier_merge.4.weight": (num_classes, hidden), "classifier_merge.4.bias": (num_classes,)})
    for isc in ("isc3", "isc4"):
        shapes.update({f"{isc}.0.weight": (w[3], num_classes), f"{isc}.0.bias": (w[3],), **_bn_shapes(f"{isc}.1.", w[3])})
    shapes.update(_bn_shapes("classifier_merge.0.", out + 2 * w[3]))
    shapes.update(branch.shapes())
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=generator, dtype=torch.float64) * 0.2
    return sd


def _ln(sd, p, x):
    return F.layer_norm(x, (x.shape[-1],), sd[p + "weight"], sd[p + "bias"], eps=1e-5)


def _attention(sd, p, q_in, kv_in, heads):
    q = q_in @ sd[p + "q_proj.weight"].T
    k = kv_in @ sd[p + "k_proj.weight"].T
    v = kv_in @ sd[p + "v_proj.weight"].T
    if p + "relative_position_bias" in sd:
        k = k + sd[p + "relative_position_bias"]
    b, n, c = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    attn = torch.softmax(split(q) @ split(k).transpose(-1, -2) * (c // heads) ** -0.5, -1)
    o = (attn @ split(v)).transpose(1, 2).reshape(b, n, v.shape[-1])
    return o @ sd[p + "o_proj.weight"].T + sd[p + "o_proj.bias"]


def _mlp(sd, p, x):
    x = _ln(sd, p + "layernorm.", x) @ sd[p + "fc1.weight"].T + sd[p + "fc1.bias"]
    return F.gelu(x) @ sd[p + "fc2.weight"].T + sd[p + "fc2.bias"]


def _cross(sd, p, q, kv):
    out = q + _attention(sd, p + "cross_attn.attention.", _ln(sd, p + "cross_attn.q_norm.", q),
                         _ln(sd, p + "cross_attn.kv_norm.", kv), 1)
    return out + _mlp(sd, p + "mlp.", out)


def _self_stage(sd, stage, z, heads):
    layer = 0
    while f"self_att{stage}.{layer}.mlp.fc1.weight" in sd:
        p = f"self_att{stage}.{layer}."
        h = _ln(sd, p + "self_attn.norm.", z)
        z = z + _attention(sd, p + "self_attn.attention.", h, h, heads)
        z = z + _mlp(sd, p + "mlp.", z)
        layer += 1
    return z


def _x2z(sd, i, z, x):
    kv = F.conv2d(x, sd[f"dwc{i}_x2z.weight"], sd[f"dwc{i}_x2z.bias"], padding=3, groups=x.shape[1]) + x
    kv = F.adaptive_avg_pool2d(kv, 7).flatten(2).transpose(1, 2)
    return _cross(sd, f"cross_att{i}_x2z.", z, kv)


def _z2x(sd, p, x, z):
    b, c, h, w = x.shape
    return _cross(sd, p, x.flatten(2).transpose(1, 2), z).transpose(1, 2).reshape(b, c, h, w)


def _resize(sd, i, z):
    z = _ln(sd, f"token_mixer.{i}.0.", z.transpose(1, 2)) @ sd[f"token_mixer.{i}.1.weight"].T + sd[f"token_mixer.{i}.1.bias"]
    z = z.transpose(1, 2)
    return _ln(sd, f"token_expander.{i}.0.", z) @ sd[f"token_expander.{i}.1.weight"].T + sd[f"token_expander.{i}.1.bias"]


def _bn2d(sd, p, x, eps=1e-5):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], eps=eps)


def _bn1d(sd, p, x):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], eps=1e-5)


def _linear(sd, p, x):
    return x @ sd[p + "weight"].T + sd[p + "bias"]


def _hardswish_mlp(sd, first, last, x):
    """The MobileNetV3 branch's classifiers: Linear ``first``, Hardswish, (Dropout), Linear ``last``."""
    return _linear(sd, last, F.hardswish(_linear(sd, first, x)))


def reference_forward(sd: Dict[str, torch.Tensor], cnn, x: torch.Tensor,
                      heads: Sequence[int] = (1, 2, 4, 8)) -> Tuple[torch.Tensor, ...]:
    """The four exits' logits (early, attention, CNN, merged), in evaluation mode.

    Args:
        sd: the reference-layout state dict (for a RegNet, its CNN part is loaded into ``cnn`` here).
        cnn: torchvision's RegNet of the same widths (evaluation mode, float64), a :class:`ReferenceResNet` or a
            :class:`ReferenceMobileNetV3`.
        x: the images.
        heads: self-attention heads of the four latent stages.
    """
    branch = _branch(cnn)
    z = sd["latent"].expand(x.shape[0], -1, -1)
    x = branch.forward_stem(sd, x)
    z = _self_stage(sd, 1, _x2z(sd, 1, z, x), heads[0])
    for i in (2, 3, 4):
        x = branch.forward_stage(sd, i - 1, x)
        z = _resize(sd, i - 2, z)
        x = _z2x(sd, f"cross_att{i}_z2x.", x, z)
        z = _self_stage(sd, i, _x2z(sd, i, z, x), heads[i - 1])
        if i == 3:
            y_early = _linear(sd, "early_classifier3.", z.mean(1))
    isc = lambda p, y: torch.relu(_bn1d(sd, p + "1.", _linear(sd, p + "0.", y)))  # noqa: E731
    y_att = _linear(sd, "classifier_att.", torch.cat([z.mean(1), isc("isc3.", y_early)], 1))
    x = branch.forward_stage(sd, 4, x)
    pooled = x.mean((2, 3))
    mlp = "classifier_cnn.0.weight" in sd
    y_cnn = _hardswish_mlp(sd, "classifier_cnn.0.", "classifier_cnn.3.", pooled) if mlp else _linear(sd, "classifier_cnn.", pooled)
    x = _z2x(sd, "last_cross_att_z2x.", x, z)
    merged = torch.cat([x.mean((2, 3)), z.mean(1), isc("isc4.", y_att)], 1)
    merged = _bn1d(sd, "classifier_merge.0.", merged)
    y_merge = _hardswish_mlp(sd, "classifier_merge.1.", "classifier_merge.4.", merged) if mlp else \
        _linear(sd, "classifier_merge.1.", merged)
    return y_early, y_att, y_cnn, y_merge
