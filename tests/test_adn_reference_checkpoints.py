"""Checkpoints of the ADN reference implementation (github.com/wchkang/depth) load into our ADN models.

The reference networks are torchvision's ResNet-50, ViT and Swin with a twin ``<norm>_skip`` next to
each norm of a mandatory block (and of each patch merging); their training script saves
``{'model': state_dict}``. Each test builds such a checkpoint from a torchvision network with random
weights and twins, computes the reference forward for every depth configuration with the reference's
own skip rules (written out below from its models/*.py), and compares with the timm model loaded
through ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``.
"""
import argparse
import itertools

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50
from torchvision.models.swin_transformer import SwinTransformer as TorchvisionSwin
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

import timm_exits  # noqa: F401

from helpers import randomise_norms

CONFIGS = ["".join(c) for c in itertools.product("FT", repeat=4)]


def _randomise(module: nn.Module) -> nn.Module:
    """Non-trivial norms, class token and head (torchvision initialises them to constants)."""
    randomise_norms(module)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.2)
        for name, p in module.named_parameters():
            if name.endswith("class_token"):
                p.normal_(0, 1)
    return module


def _twin(norm: nn.Module) -> nn.Module:
    """A skip-aware twin with its own random parameters (and statistics)."""
    twin = type(norm)(norm.weight.shape[0], eps=norm.eps)
    return _randomise(twin).eval()


def _save(tmp_path, state_dict: dict, prefix: str = "") -> str:
    path = str(tmp_path / "reference.pth")
    torch.save({"model": {prefix + k: v for k, v in state_dict.items()}}, path)
    return path


def _load(name: str, path: str, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs).eval()


def _assert_all_configs(model: nn.Module, reference, x: torch.Tensor, net: nn.Module) -> None:
    with torch.no_grad():
        # the reference forward written out here is torchvision's own for the super-net
        torch.testing.assert_close(reference(x, [False] * 4), net(x), atol=1e-5, rtol=1e-4)
        for config in CONFIGS:
            model.set_depth(config)
            skip = [c == "T" for c in config]
            torch.testing.assert_close(model(x), reference(x, skip), atol=1e-5, rtol=1e-4, msg=config)


# ResNet-50 (models/resnet.py): in a stage of n blocks, block i >= max(1, min(n - 1, (n + 1) // 2)) is
# skippable; every other block owns bn1_skip, bn2_skip, bn3_skip, used while its stage skips.

def _resnet_skippable(n: int, i: int) -> bool:
    return i >= 1 and i >= min(n - 1, (n + 1) // 2)


@pytest.fixture(scope="module")
def resnet_reference():
    torch.manual_seed(0)
    net = _randomise(resnet50(width_per_group=16)).eval()  # narrow bottlenecks, ResNet-50's layout
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    twins = {(s, i): [_twin(b.bn1), _twin(b.bn2), _twin(b.bn3)]
             for s, layer in enumerate(layers) for i, b in enumerate(layer) if not _resnet_skippable(len(layer), i)}
    state_dict = dict(net.state_dict())
    for (s, i), norms in twins.items():
        for k, norm in enumerate(norms, 1):
            state_dict.update({f"layer{s + 1}.{i}.bn{k}_skip.{n}": v for n, v in norm.state_dict().items()})

    def forward(x, skip):
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for s, layer in enumerate(layers):
            for i, b in enumerate(layer):
                if skip[s] and _resnet_skippable(len(layer), i):
                    continue
                bn1, bn2, bn3 = twins[s, i] if skip[s] else (b.bn1, b.bn2, b.bn3)
                out = F.relu(bn1(b.conv1(x)))
                out = F.relu(bn2(b.conv2(out)))
                out = bn3(b.conv3(out))
                x = F.relu(out + (x if b.downsample is None else b.downsample(x)))
        return net.fc(torch.flatten(net.avgpool(x), 1))

    return state_dict, forward, net


def test_resnet50_reference_checkpoint(tmp_path, resnet_reference):
    state_dict, reference, net = resnet_reference
    assert sum(k.endswith("bn1_skip.weight") for k in state_dict) == 9  # mandatory [2, 2, 3, 2]
    model = _load("resnet50_adn", _save(tmp_path, state_dict, prefix="module."), base_width=16)  # as under DDP
    _assert_all_configs(model, reference, torch.randn(2, 3, 32, 32), net)


class _NotWeights:
    """Stands for any pickled object other than tensors, plain data and the command line."""


def test_reference_training_file_loads_and_pickled_code_is_still_refused(tmp_path, resnet_reference):
    state_dict, reference, net = resnet_reference
    path = tmp_path / "checkpoint.pth"  # as train_adn.py saves it: weights, optimizer, epoch, command line
    torch.save({"model": state_dict, "optimizer": {}, "epoch": 89,
                "args": argparse.Namespace(model="resnet50", lr=0.5, skip_cfg=None)}, path)
    model = _load("resnet50_adn", str(path), base_width=16)
    _assert_all_configs(model, reference, torch.randn(2, 3, 32, 32), net)
    torch.save({"model": state_dict, "args": _NotWeights()}, path)  # any other object: refused
    with pytest.raises(RuntimeError, match="weights_only=True blocked loading this checkpoint"):
        _load("resnet50_adn", str(path), base_width=16)


def test_unknown_key_is_named(tmp_path, resnet_reference):
    state_dict = resnet_reference[0]
    junk = {**state_dict, "layer1.0.se.fc.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected key 'layer1\.0\.se\.fc\.weight'.*models/resnet\.py"):
        _load("resnet50_adn", _save(tmp_path, junk), base_width=16)


def test_other_depth_split_is_refused(tmp_path, resnet_reference):
    state_dict = resnet_reference[0]
    # twins for layer1.2 (skippable here): the checkpoint's split is not ours
    extra = {**state_dict, **{k.replace("layer1.1.", "layer1.2."): v for k, v in state_dict.items()
                              if k.startswith("layer1.1.bn1_skip.")}}
    with pytest.raises(ValueError, match=r"no place for \['layer1\.2\.bn1_skip\."):
        _load("resnet50_adn", _save(tmp_path, extra), base_width=16)
    # no twins for layer3.2 (mandatory here)
    fewer = {k: v for k, v in state_dict.items() if not k.startswith("layer3.2.bn2_skip.")}
    with pytest.raises(ValueError, match=r"no weights for \['layer3\.2\.bn2\.skip\.weight \(twin of layer3\.2\.bn2"):
        _load("resnet50_adn", _save(tmp_path, fewer), base_width=16)


# ViT (models/vision_transformer.py): blocks in pseudo-stages of 3, block i skippable iff (i + 1) % 3 == 0,
# stage i // 3; the others own ln_1_skip and ln_2_skip. A narrow ViT with ViT-B's 12 blocks.

def _vit_reference(twins: bool):
    torch.manual_seed(0)
    net = _randomise(TorchvisionViT(image_size=32, patch_size=8, num_layers=12, num_heads=2, hidden_dim=32,
                                    mlp_dim=64)).eval()
    blocks = list(net.encoder.layers)
    norms = {i: [_twin(b.ln_1), _twin(b.ln_2)] if twins else [b.ln_1, b.ln_2]
             for i, b in enumerate(blocks) if (i + 1) % 3}
    state_dict = dict(net.state_dict())
    if twins:
        for i, (ln_1, ln_2) in norms.items():
            for name, norm in (("ln_1_skip", ln_1), ("ln_2_skip", ln_2)):
                state_dict.update({f"encoder.layers.encoder_layer_{i}.{name}.{n}": v
                                   for n, v in norm.state_dict().items()})

    def forward(x, skip):
        x = net._process_input(x)
        x = torch.cat([net.class_token.expand(x.shape[0], -1, -1), x], dim=1) + net.encoder.pos_embedding
        for i, b in enumerate(blocks):
            if skip[i // 3] and (i + 1) % 3 == 0:
                continue
            ln_1, ln_2 = norms[i] if skip[i // 3] else (b.ln_1, b.ln_2)
            y = ln_1(x)
            x = x + b.self_attention(y, y, y, need_weights=False)[0]
            x = x + b.mlp(ln_2(x))
        return net.heads(net.encoder.ln(x)[:, 0])

    return state_dict, forward, net


VIT = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, mlp_ratio=2.0)


def test_vit_reference_checkpoint(tmp_path):
    state_dict, reference, net = _vit_reference(twins=True)
    model = _load("vit_base_patch16_224_adn", _save(tmp_path, state_dict), **VIT)
    _assert_all_configs(model, reference, torch.randn(2, 3, 32, 32), net)


def test_vit_torchvision_weights_without_twins(tmp_path):
    """Plain torchvision ViT weights: twins start as copies of their norms."""
    state_dict, reference, net = _vit_reference(twins=False)
    model = _load("vit_base_patch16_224_adn", _save(tmp_path, state_dict), **VIT)
    _assert_all_configs(model, reference, torch.randn(2, 3, 32, 32), net)


def test_vit_reference_ema_weights(tmp_path):
    """A training checkpoint with ``model_ema`` (torch's AveragedModel: ``module.`` keys, ``n_averaged``):
    timm's loader takes the EMA weights, the ViT/Swin recipes' evaluated ones."""
    state_dict, reference, net = _vit_reference(twins=True)
    ema = {"module." + k: v for k, v in state_dict.items()}
    ema["n_averaged"] = torch.tensor(7)
    path = str(tmp_path / "checkpoint.pth")
    torch.save({"model": {k: torch.zeros_like(v) for k, v in state_dict.items()}, "model_ema": ema, "epoch": 3}, path)
    _assert_all_configs(_load("vit_base_patch16_224_adn", path, **VIT), reference, torch.randn(2, 3, 32, 32), net)


def test_vit_representation_layer_is_refused(tmp_path):
    state_dict = _vit_reference(twins=True)[0]
    state_dict["heads.pre_logits.weight"] = torch.zeros(32, 32)
    with pytest.raises(ValueError, match=r"unexpected key 'heads\.pre_logits\.weight'"):
        _load("vit_base_patch16_224_adn", _save(tmp_path, state_dict), **VIT)


# Swin-T (models/swin_transformer.py): patch embedding ``pre``; ``features`` alternates stages
# (features.2s) and patch mergings (features.2s-1, run with the flag of stage s); depths [2, 2, 6, 2],
# the first [1, 1, 3, 1] blocks mandatory with norm1_skip / norm2_skip, every merging with norm_skip.
# Narrow, window 2 on 64x64 images: stages of 16, 8, 4 and 2 patches (the last unshifted).

SWIN_BASE = [1, 1, 3, 1]


def _merge_2x2(x: torch.Tensor) -> torch.Tensor:
    """The reference's neighbourhood order: (0, 0), (1, 0), (0, 1), (1, 1) as (row, column)."""
    return torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)


def test_swin_reference_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = _randomise(TorchvisionSwin(patch_size=[4, 4], embed_dim=16, depths=[2, 2, 6, 2], num_heads=[1, 2, 2, 4],
                                     window_size=[2, 2])).eval()
    stages = [net.features[2 * s + 1] for s in range(4)]
    merges = {s: net.features[2 * s] for s in range(1, 4)}
    block_twins = {(s, i): [_twin(b.norm1), _twin(b.norm2)] for s in range(4) for i, b in enumerate(stages[s])
                   if i < SWIN_BASE[s]}
    merge_twins = {s: _twin(m.norm) for s, m in merges.items()}
    # torchvision's features.0 (patch embedding) is the reference's ``pre``; the rest shift down by one
    state_dict = {}
    for key, value in net.state_dict().items():
        head, _, rest = key.partition(".")
        j, _, rest = rest.partition(".")
        if head == "features":
            key = f"pre.{rest}" if j == "0" else f"features.{int(j) - 1}.{rest}"
        state_dict[key] = value
    for (s, i), (n1, n2) in block_twins.items():
        for name, norm in (("norm1_skip", n1), ("norm2_skip", n2)):
            state_dict.update({f"features.{2 * s}.{i}.{name}.{n}": v for n, v in norm.state_dict().items()})
    for s, norm in merge_twins.items():
        state_dict.update({f"features.{2 * s - 1}.norm_skip.{n}": v for n, v in norm.state_dict().items()})

    def reference(x, skip):
        x = net.features[0](x)
        for s in range(4):
            if s:
                x = merges[s].reduction((merge_twins[s] if skip[s] else merges[s].norm)(_merge_2x2(x)))
            for i, b in enumerate(stages[s]):
                if skip[s] and i >= SWIN_BASE[s]:
                    continue
                norm1, norm2 = block_twins[s, i] if skip[s] else (b.norm1, b.norm2)
                x = x + b.attn(norm1(x))
                x = x + b.mlp(norm2(x))
        return net.head(net.norm(x).mean((1, 2)))

    model = _load("swin_tiny_patch4_window7_224_adn", _save(tmp_path, state_dict),
                  img_size=64, window_size=2, embed_dim=16, num_heads=(1, 2, 2, 4))
    _assert_all_configs(model, reference, torch.randn(2, 3, 64, 64), net)
