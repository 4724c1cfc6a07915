"""Backbones with exits as timm citizens: training-mode forward, TorchScript, FX, features_only /
forward_intermediates, pretrained cfgs, registration, optimizer hooks. Tiny configurations throughout;
references are the plain timm backbones with the same weights."""
import copy
import inspect

import pytest
import timm
import torch
from timm.data import resolve_model_data_config
from timm.layers import get_channel_dim, get_spatial_dim
from timm.optim import create_optimizer_v2
from timm.models import get_notrace_functions, get_notrace_modules, group_parameters
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor

import timm_exits  # noqa: F401
from timm_exits import BackboneWithExits
from timm_exits.models import exits as exits_module
from timm_exits.catalogue import load_catalogue

# registered variants in tiny configurations (the kwargs go to the backbone)
TINY = {
    "resnet18_exits": dict(num_classes=5),
    "vit_tiny_patch16_224_exits": dict(num_classes=5, img_size=32),
    "swin_tiny_patch4_window7_224_exits": dict(num_classes=5, img_size=64, window_size=4, embed_dim=16,
                                               depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
}
SIZE = {"resnet18_exits": 64, "vit_tiny_patch16_224_exits": 32, "swin_tiny_patch4_window7_224_exits": 64}
VARIANTS = sorted(load_catalogue("exits")["variants"])


def _tiny(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **{**TINY[name], **kwargs})


def _x(name, batch=2):
    return torch.randn(batch, 3, SIZE[name], SIZE[name], generator=torch.Generator().manual_seed(1))


def _plain_backbone(model, name):
    """A fresh plain timm backbone of the wrapper's architecture with the wrapper's backbone weights (all
    but a pruned classifier or final norm)."""
    plain = timm.create_model(model.backbone.pretrained_cfg["architecture"], **TINY[name])
    missing, unexpected = plain.load_state_dict(model.backbone.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("fc.", "head.", "norm.")) for k in missing)
    return plain.eval()


# ---- training-mode forward (every exit, every parameter)

@pytest.mark.parametrize("name", sorted(TINY))
def test_training_forward_returns_every_exit_and_reaches_every_parameter(name):
    model = _tiny(name).train()
    x = _x(name)
    torch.manual_seed(2)  # the same stochastic depth draws for each call
    outs = model(x)
    assert isinstance(outs, tuple) and len(outs) == model.num_exits
    torch.manual_seed(2)
    for out, ref in zip(outs, model.forward_exits(x)):
        torch.testing.assert_close(out, ref)
    sum(o.mean() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    model.set_multi_exit_training(False)
    torch.manual_seed(2)
    torch.testing.assert_close(model(x), outs[-1])
    model.set_exit(1)
    model.set_multi_exit_training(True)
    assert len(model(x)) == 2


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = _tiny("resnet18_exits").train()
        model.set_grad_checkpointing(checkpointing)
        sum(o.sum() for o in model(_x("resnet18_exits"))).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)


# ---- TorchScript and FX

@pytest.mark.parametrize("name", ["resnet18_exits", "vit_tiny_patch16_224_exits"])
def test_torchscript_computes_the_active_exit(name):
    with timm.set_scriptable(True):
        model = _tiny(name).eval()
    x = _x(name)
    with torch.no_grad():
        last = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), last)
        model.set_exit(1)  # before scripting: the scripted model keeps it
        early = model(x)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), early)
        assert not torch.allclose(early, last)
        scripted.exit_index = 0  # the attribute set_exit changes, settable on the scripted model too
        model.set_exit(0)
        torch.testing.assert_close(scripted(x), model(x))


def _fx(model):
    """timm's FX tracer set-up: its non-traceable modules and functions are leaves."""
    tracer = NodePathTracer(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                            param_shapes_constant=True)
    return torch.fx.GraphModule(model, tracer.trace(model))


@pytest.mark.parametrize("name", ["resnet18_exits", "vit_tiny_patch16_224_exits"])
def test_fx_traces_in_eval_and_training_mode(name):
    model = _tiny(name)
    x = _x(name)
    with torch.no_grad():
        torch.testing.assert_close(_fx(model.eval())(x), model(x))
    model.train()
    traced = _fx(model)
    outs = traced(x)
    assert isinstance(outs, tuple) and len(outs) == model.num_exits
    for out, ref in zip(outs, model(x)):
        torch.testing.assert_close(out, ref)
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in traced.parameters())
    # torchvision's feature extractor on the traced graph: a unit's output, as a forward hook sees it
    unit = model.unit_names()[1]
    extractor = create_feature_extractor(model.eval(), return_nodes={f"backbone.{unit}": "unit"},
                                         tracer_kwargs=dict(leaf_modules=get_notrace_modules(),
                                                            autowrap_functions=get_notrace_functions()))
    seen = []
    model.backbone.get_submodule(unit).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(x)
        torch.testing.assert_close(extractor(x)["unit"], seen[0])


# ---- features_only, forward_intermediates, prune_intermediate_layers

@pytest.mark.parametrize("name, out_indices", [("resnet18_exits", (1, 2, 4)), ("resnet18_exits", None),
                                               ("swin_tiny_patch4_window7_224_exits", (0, 3))])
def test_features_only_gives_the_backbones_feature_maps(name, out_indices):
    kwargs = {} if out_indices is None else dict(out_indices=out_indices)
    features = _tiny(name, features_only=True, **kwargs).eval()
    assert type(features).__name__ == "FeatureGetterNet"
    plain = _plain_backbone(features.model, name)
    wanted = list(range(len(plain.feature_info))) if out_indices is None else list(out_indices)
    assert features.feature_info.channels() == [plain.feature_info[i]["num_chs"] for i in wanted]
    assert features.feature_info.reduction() == [plain.feature_info[i]["reduction"] for i in wanted]
    x = _x(name)
    with torch.no_grad():
        outs = features(x)
        refs = plain.forward_intermediates(x, indices=wanted, intermediates_only=True)
    assert len(outs) == len(wanted)
    for out, ref, c in zip(outs, refs, features.feature_info.channels()):
        assert out.shape[1] == c  # NCHW, Swin's included
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_intermediates_final_is_forward_features(name):
    model = _tiny(name).eval()
    plain = _plain_backbone(model, name)
    x = _x(name)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(final, plain.forward_features(x))
        for a, b in zip(intermediates, plain.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [f["module"] for f in model.feature_info] == [f"backbone.{f['module']}" for f in plain.feature_info]


@pytest.mark.parametrize("out_indices", [(0, 5), (-6,), 0, 6])
def test_out_of_range_feature_indices_are_explained(out_indices):
    with pytest.raises(ValueError, match=r"out of range: this ResNet has 5 feature maps.*\[-5, 4\]"):
        _tiny("resnet18_exits", features_only=True, out_indices=out_indices)
    with pytest.raises(ValueError, match="out of range"):
        _tiny("resnet18_exits").forward_intermediates(_x("resnet18_exits"), indices=out_indices)


def test_pruning_drops_the_exit_heads_and_ends_the_features_at_the_tap():
    model = _tiny("resnet18_exits").eval()
    x = _x("resnet18_exits")
    with torch.no_grad():
        tap = _plain_backbone(model, "resnet18_exits").forward_intermediates(x, indices=[2], intermediates_only=True)[0]
        assert model.prune_intermediate_layers([2], prune_norm=True) == [2]
        assert model.num_exits == 1 and len(model.exits) == 0 and model.num_classes == 0
        torch.testing.assert_close(model.forward_features(x), tap, rtol=0, atol=0)
        assert model(x).shape == tap.shape  # the pruned head: unpooled features
    sum(f.sum() for f in model.train().forward_intermediates(x, indices=[2], intermediates_only=True)).backward()
    assert all(p.grad is not None for p in model.parameters())


# ---- pretrained cfgs, data config, attributes

@pytest.mark.parametrize("name", VARIANTS)
def test_pretrained_cfg_matches_forward_features_and_the_backbone(name):
    with torch.device("meta"):
        model = timm.create_model(name, device="meta").eval()
    arch = model.backbone.pretrained_cfg["architecture"]
    reference = timm.get_pretrained_cfg(arch).to_dict()
    cfg = model.pretrained_cfg
    data = resolve_model_data_config(model)
    assert data["input_size"] == reference["input_size"] and data["mean"] == reference["mean"]
    assert data["std"] == reference["std"] and data["crop_pct"] == reference["crop_pct"]
    assert model.in_chans == cfg["input_size"][0] == 3
    feats = model.forward_features(torch.empty(1, *cfg["input_size"], device="meta"))
    if cfg["pool_size"] is None:  # ViT: tokens
        assert feats.ndim == 3 and feats.shape[-1] == model.num_features
    else:
        fmt = model.output_fmt
        assert [feats.shape[a] for a in get_spatial_dim(fmt)] == list(cfg["pool_size"])
        assert feats.shape[get_channel_dim(fmt)] == model.num_features
    assert model.forward_head(feats, pre_logits=True).shape[1] == model.head_hidden_size
    state = model.state_dict()
    assert all(f"{c}.weight" in state for c in cfg["classifier"]) and f"{cfg['first_conv']}.weight" in state
    assert len(cfg["classifier"]) == model.num_exits


def test_swin_output_format_is_nhwc():
    model = _tiny("swin_tiny_patch4_window7_224_exits").eval()
    assert model.output_fmt == "NHWC"
    assert model.forward_features(_x("swin_tiny_patch4_window7_224_exits")).shape == (2, 2, 2, 128)


def test_other_input_channels_and_an_unpooled_early_exit():
    model = timm.create_model("resnet18_exits", in_chans=1, num_classes=5).eval()
    assert model.in_chans == model.backbone.conv1.in_channels == 1
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        model.reset_classifier(0, "")
        model.set_exit(1)
        torch.testing.assert_close(model(x), model.forward_features(x))  # no pooling, no classifier
        model.reset_classifier(0, "avg")
        torch.testing.assert_close(model(x), model.forward_features(x).mean((2, 3)))


# ---- optimizer hooks

def test_no_weight_decay_and_group_matcher_follow_the_backbone():
    model = _tiny("vit_tiny_patch16_224_exits")
    plain = _plain_backbone(model, "vit_tiny_patch16_224_exits")
    assert model.no_weight_decay() == {f"backbone.{n}" for n in plain.no_weight_decay()}
    names = {n for n, _ in model.named_parameters()}
    assert "backbone.pos_embed" in model.no_weight_decay() and "backbone.pos_embed" in names

    resnet = _tiny("resnet18_exits")
    layer_of = group_parameters(resnet, resnet.group_matcher(), reverse=True)
    plain = _plain_backbone(resnet, "resnet18_exits")
    plain_layer_of = group_parameters(plain, plain.group_matcher(), reverse=True)
    assert all(layer_of[f"backbone.{n}"] == g for n, g in plain_layer_of.items())  # same groups, same order
    # every exit head joins the backbone's head, in the last group
    for i in range(len(resnet.exit_after)):
        assert layer_of[f"exits.{i}.fc.weight"] == layer_of["backbone.fc.weight"] == max(layer_of.values())
    optimizer = create_optimizer_v2(resnet, "sgd", lr=1.0, layer_decay=0.5)
    scale = {id(p): g.get("lr_scale", 1.0) for g in optimizer.param_groups for p in g["params"]}
    params = dict(resnet.named_parameters())
    assert scale[id(params["backbone.layer1.1.conv1.weight"])] < scale[id(params["exits.0.fc.weight"])] == \
        scale[id(params["exits.2.fc.weight"])] == scale[id(params["backbone.fc.weight"])] == 1.0


# ---- registration the timm way

def test_each_variant_has_its_own_entrypoint_in_the_model_file():
    source = inspect.getsource(exits_module)
    catalogue = load_catalogue("exits")["variants"]
    assert sorted(timm.list_models(module="exits")) == VARIANTS
    for name in VARIANTS:
        entrypoint = timm.models.model_entrypoint(name)
        assert entrypoint.__module__ == exits_module.__name__ and f"def {name}(pretrained: bool = False" in source
        assert "model_args = dict(" in inspect.getsource(entrypoint)
        assert entrypoint.__doc__ == catalogue[name]["description"]
        assert name in exits_module.default_cfgs


def test_the_wrapper_class_follows_the_backbone_family():
    assert isinstance(_tiny("resnet18_exits"), exits_module.ResNetWithExits)
    direct = BackboneWithExits(timm.create_model("convnext_atto", num_classes=3))
    assert type(direct).__name__ == "ConvNeXtWithExits" and copy.deepcopy(direct).num_exits == direct.num_exits
    with pytest.raises(TypeError, match="ResNetWithExits wraps a ResNet, got ConvNeXt"):
        exits_module.ResNetWithExits(timm.create_model("convnext_atto"))


def test_exit_heads_refuse_an_unknown_pooling():
    from timm_exits.models.heads import ConvHead, LinearHead
    with pytest.raises(ValueError, match=r"pool must be 'avg', '' \(none\), or 'token'"):
        LinearHead(8, 3, pool="max")
    with pytest.raises(ValueError, match=r"pool must be 'avg' or '' \(none\) for a conv head, got 'token'"):
        ConvHead(8, 3, pool="token")
