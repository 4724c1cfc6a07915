"""Exits for timm backbones: every supported family, the contract, costs, weights, errors."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_exits  # noqa: F401
from timm_exits import BackboneWithExits, add_exits, slice_state
from timm_exits.profile import profile_exits
from timm_exits.catalogue import load_catalogue

from helpers import randomise_norms

# tiny members of every supported family, at 64x64
FAMILIES = {
    "resnet18": {},  # ResNet, BasicBlock
    "resnet26": {},  # ResNet, Bottleneck
    "resnext50_32x4d": {},  # ResNet class, grouped convolutions
    "convnext_atto": {},
    "efficientnet_b0": {},
    "mobilenetv3_small_050": {},
    "vit_tiny_patch16_224": {"img_size": 64},
    "deit_tiny_patch16_224": {"img_size": 64},
    "swin_tiny_patch4_window7_224": {"img_size": 64, "window_size": 4},
}
SUPPORTED = list(FAMILIES)


def _backbone(name, **kwargs):
    torch.manual_seed(0)
    return randomise_norms(timm.create_model(name, **{"num_classes": 5, **FAMILIES[name], **kwargs})).eval()


@pytest.mark.parametrize("name", SUPPORTED)
def test_exits_leave_the_final_logits_unchanged(name):
    backbone = _backbone(name)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        reference = backbone(x)
        model = add_exits(backbone).eval()
        outs = model.forward_exits(x)
        assert torch.allclose(outs[-1], reference, atol=1e-5)
        assert torch.allclose(model(x), reference, atol=1e-5)
    assert len(outs) == model.num_exits == 4 and all(o.shape == (3, 5) for o in outs)


@pytest.mark.parametrize("name", SUPPORTED)
def test_stage_by_stage_on_a_subset_equals_forward_exits(name):
    model = add_exits(_backbone(name)).eval()
    x = torch.randn(4, 3, 64, 64)
    keep = torch.tensor([1, 3])
    with torch.no_grad():
        full = model.forward_exits(x)
        state = model.forward_stage(model.forward_stem(x), 0)
        assert torch.allclose(model.forward_exit(state, 0), full[0], atol=1e-5)
        state = slice_state(state, keep)
        for i in range(1, model.num_exits):
            state = model.forward_stage(state, i)
            assert torch.allclose(model.forward_exit(state, i), full[i][keep], atol=1e-4)


@pytest.mark.parametrize("name", SUPPORTED)
def test_every_family_trains_forward_and_backward(name):
    model = add_exits(_backbone(name)).train()
    y = torch.tensor([0, 1, 2, 3])
    loss = sum(torch.nn.functional.cross_entropy(o, y) for o in model.forward_exits(torch.randn(4, 3, 64, 64)))
    loss.backward()
    for head in model.exits:
        assert head.fc.weight.grad is not None and head.fc.weight.grad.abs().sum() > 0
    stem = next(model.backbone.parameters())
    assert stem.grad is not None and stem.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_exit_costs_add_the_heads_to_the_backbone(name):
    backbone = _backbone(name)
    model = add_exits(backbone)
    costs = profile_exits(model)
    plain = profile_exits(backbone, input_size=model.pretrained_cfg["input_size"])[0]
    head_macs = sum(w * 5 for w in model.exit_widths[:-1])  # linear heads: width x classes
    assert costs[-1].macs == plain.macs + head_macs
    head_params = sum(p.numel() for p in model.exits.parameters())
    assert costs[-1].params == plain.params + head_params
    assert all(a.macs < b.macs for a, b in zip(costs, costs[1:]))


def test_stop_at_exit_runs_only_the_needed_units():
    model = add_exits(_backbone("resnet18")).eval()
    ran = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        model.backbone.get_submodule(name).register_forward_hook(lambda *a, n=name: ran.append(n))
    model.set_exit(1)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert ran == ["layer1", "layer2"] and out.shape == (1, 5)
    assert model.get_classifier() is model.exits[1].fc
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert model.forward_head(feats, pre_logits=True).shape == (1, model.exit_widths[1])


def test_chosen_exits_and_the_conv_head():
    model = add_exits(_backbone("resnet18"), exits=[1, 2], head="conv", head_width=32).eval()
    assert model.num_exits == 3 and model.exit_after == [1, 2] and model.exit_widths == [32, 32, 512]
    assert [o.shape for o in model.forward_exits(torch.randn(2, 3, 64, 64))] == [(2, 5)] * 3
    vit = add_exits(_backbone("vit_tiny_patch16_224"), exits=[0, 10])
    assert vit.exit_after == [0, 10] and vit.exits[0].pool == "token"


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(exits=[3]), ValueError, r"exits must be distinct unit indices in \[0, 2\]"),
    (dict(exits=[1, 1]), ValueError, "distinct"),
    (dict(head="mlp"), ValueError, "head must be one of"),
])
def test_bad_exit_arguments_are_explained(kwargs, error, message):
    with pytest.raises(error, match=message):
        add_exits(_backbone("resnet18"), **kwargs)


def test_conv_head_on_a_transformer_and_unsupported_backbones_are_refused():
    with pytest.raises(ValueError, match="'conv' head needs NCHW feature maps"):
        add_exits(_backbone("vit_tiny_patch16_224"), head="conv")
    with pytest.raises(TypeError, match="DenseNet is not a supported backbone; supported timm families: ResNet"):
        add_exits(timm.create_model("densenet121"))
    with pytest.raises(ValueError, match="need a model name"):
        add_exits(_backbone("resnet18"), num_classes=3)


def test_reset_classifier_reaches_every_exit():
    model = add_exits(_backbone("resnet18"))
    model.reset_classifier(7)
    assert model.num_classes == 7
    assert all(o.shape == (1, 7) for o in model.forward_exits(torch.randn(1, 3, 64, 64)))


def _drop_rates(model: BackboneWithExits) -> tuple:
    """Dropout before each exit head's classifier, and the backbone head's (timm's drop_rate / head_drop)."""
    own = getattr(model.backbone, "drop_rate", None)
    if own is None:
        own = model.backbone.head_drop.p
    return [e.drop.p for e in model.exits], own


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_drop_rate_is_timms_dropout_before_every_exit(name):
    kwargs = dict(num_classes=5, **FAMILIES[name])
    assert _drop_rates(add_exits(name, drop_rate=0.3, **kwargs)) == ([0.3] * 3, 0.3)
    assert _drop_rates(timm.create_model(f"{name}_exits", drop_rate=0.3, **kwargs)) == ([0.3] * 3, 0.3)
    assert _drop_rates(add_exits(_backbone(name), drop_rate=0.3)) == ([0.3] * 3, 0.0)  # a built model keeps its own
    assert _drop_rates(add_exits(name, **kwargs)) == ([0.0] * 3, 0.0)


def test_registered_variants_and_their_catalogue_costs():
    catalogue = load_catalogue("exits")["variants"]
    for required in ("resnet18_exits", "resnet50_exits", "vit_tiny_patch16_224_exits", "convnext_tiny_exits",
                     "efficientnet_b0_exits", "mobilenetv3_large_100_exits", "deit_small_patch16_224_exits",
                     "swin_tiny_patch4_window7_224_exits"):
        assert required in catalogue and timm.is_model(required)
    for name, v in catalogue.items():
        with torch.device("meta"):
            model = timm.create_model(name)
            plain = timm.create_model(model.backbone.pretrained_cfg["architecture"])
        assert isinstance(model, BackboneWithExits) and model.num_exits == len(v["expected"]["macs"])
        costs = profile_exits(model)
        assert [c.macs for c in costs] == v["expected"]["macs"]
        assert [c.params for c in costs] == v["expected"]["params"]
        heads = sum(w * 1000 for w in model.exit_widths[:-1])
        assert costs[-1].macs == profile_exits(plain)[0].macs + heads
        assert model.pretrained_cfg["classifier"][-1].startswith("backbone.")


def test_backbone_weights_and_whole_model_checkpoints_load_from_files(tmp_path):
    backbone = _backbone("resnet18", num_classes=1000)
    vanilla = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, vanilla)
    x = torch.randn(2, 3, 64, 64)
    model = timm.create_model("resnet18_exits", pretrained=True, pretrained_cfg_overlay=dict(file=str(vanilla))).eval()
    with torch.no_grad():
        assert torch.allclose(model.forward_exits(x)[-1], backbone(x), atol=1e-5)
    whole = tmp_path / "resnet18_exits.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, whole)
    again = timm.create_model("resnet18_exits", pretrained=True, pretrained_cfg_overlay=dict(file=str(whole))).eval()
    with torch.no_grad():
        for a, b in zip(again.forward_exits(x), model.forward_exits(x)):
            assert torch.equal(a, b)
    other = timm.create_model("resnet18_exits", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(vanilla)))
    assert torch.equal(other.backbone.conv1.weight, backbone.conv1.weight) and other.num_classes == 10
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        timm.create_model("resnet18_exits", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "missing.safetensors")))
