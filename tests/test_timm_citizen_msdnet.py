"""MSDNet as a timm citizen: the training-mode forward, timm's feature API (features_only,
forward_intermediates, prune_intermediate_layers), unpooled heads, TorchScript and torch.fx."""
import copy
import io

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models._features import FeatureGetterNet

import timm_exits  # noqa: F401

from helpers import randomise_norms

TINY = dict(num_channels=8, growth_rate=4, head_channels=16, num_classes=5)  # msdnet_cifar_5exit, narrower


def _tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("msdnet_cifar_5exit", **{**TINY, **kwargs})


def test_training_forward_returns_every_exit_and_trains_every_parameter():
    model = _tiny(channels_last_training=False).train()
    x = torch.randn(4, 3, 32, 32)
    outputs = model(x)
    assert isinstance(outputs, tuple) and len(outputs) == model.num_exits == 5
    torch.manual_seed(1)
    for a, b in zip(outputs, model.forward_exits(x)):
        assert torch.allclose(a, b, atol=1e-6)
    sum(o.mean() for o in outputs).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_single_tensor_losses_fail_loudly_and_the_switch_gives_one_tensor():
    model = _tiny().train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    with pytest.raises(TypeError):
        F.cross_entropy(model(x), y)  # a loss written for one tensor does not silently train one exit
    model.set_exit(2)
    assert len(model(x)) == 3  # exits 1..k
    model.set_exit(None)
    model.set_multi_exit_training(False)
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (4, 5)
    model.eval()
    model.set_multi_exit_training(True)
    assert isinstance(model(x), torch.Tensor)  # evaluation always gives one tensor


def test_unpooled_heads_match_the_cfg_and_forward_features():
    model = randomise_norms(_tiny()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert tuple(feats.shape[2:]) == model.pretrained_cfg["pool_size"] == (2, 2)
        assert feats.shape[1] == model.num_features == model.head_hidden_size
        pooled = model.forward_head(feats, pre_logits=True)
        assert torch.allclose(pooled, feats.mean((2, 3)), atol=1e-6)  # the 2x2 average pool
        model.reset_classifier(0, "")
        assert torch.allclose(model(x), feats, atol=1e-6)
        model.reset_classifier(3)  # a classifier reads pooled features again
        assert model(x).shape == (2, 3)
    unpooled = _tiny(num_classes=0, global_pool="").eval()
    assert unpooled(x).shape == (2, model.num_features, 2, 2)
    with pytest.raises(ValueError, match="needs num_classes=0"):
        _tiny(global_pool="")
    with pytest.raises(ValueError, match="fixed 2x2 average"):
        _tiny(global_pool="max")


@pytest.mark.parametrize("name", timm.list_models("msdnet*"))
def test_every_variant_cfg_pool_size_is_what_forward_features_returns(name):
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        feats = model.forward_features(torch.empty(1, *model.pretrained_cfg["input_size"]))
    assert tuple(feats.shape[1:]) == (model.num_features, *model.pretrained_cfg["pool_size"])


def test_features_only_gives_every_stage_coarsest_map():
    model = randomise_norms(_tiny()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = [model.forward_until(x, i)[-1] for i in range(model.num_exits)]  # the contract's stage path
        features = FeatureGetterNet(copy.deepcopy(model), out_indices=(1, 3)).eval()
        got = features(x)
    assert features.feature_info.channels() == [model.stage_widths[1], model.stage_widths[3]]
    assert features.feature_info.reduction() == [4, 4]  # 32x32 input, coarsest of 3 scales is 8x8
    assert len(got) == 2 and torch.equal(got[0], expected[1]) and torch.equal(got[1], expected[3])
    # the factory path: all stages by default, and only the stages up to the deepest index are kept
    created = timm.create_model("msdnet_cifar_7exit", features_only=True)
    assert created.feature_info.channels() == timm.create_model("msdnet_cifar_7exit").stage_widths
    shallow = timm.create_model("msdnet_cifar_5exit", features_only=True, out_indices=(0, 1), **TINY)
    assert len(shallow.model.stages) == 2 and len(shallow.model.exits) == 0


def test_pruned_feature_extractor_uses_every_parameter():
    features = timm.create_model("msdnet_cifar_5exit", features_only=True, out_indices=(0, 2), **TINY).train()
    sum(f.sum() for f in features(torch.randn(2, 3, 32, 32))).backward()
    assert not [n for n, p in features.named_parameters() if p.grad is None]


def test_out_of_range_feature_indices_are_refused():
    with pytest.raises(ValueError, match=r"out of range: this MSDNet has 5 feature maps .* \[-5, 4\]"):
        timm.create_model("msdnet_cifar_5exit", features_only=True, out_indices=(0, 5), **TINY)
    with pytest.raises(ValueError, match=r"a count in \[1, 5\]"):
        _tiny().forward_intermediates(torch.randn(1, 3, 32, 32), indices=6)
    with pytest.raises(ValueError, match="NCHW"):
        _tiny().forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NHWC")


def test_forward_intermediates_follows_timms_contract():
    model = randomise_norms(_tiny()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x), atol=1e-6)
        assert len(maps) == model.num_exits == len(model.feature_info)
        for i, m in enumerate(maps):
            assert torch.equal(m, model.forward_until(x, i)[-1])
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(last_two, maps[-2:])] == [True, True]
        # stop_early: nothing after the deepest index; the final features are that stage's exit's
        early, (first,) = model.forward_intermediates(x, indices=[0], stop_early=True)
        model.set_exit(0)
        assert torch.allclose(early, model.forward_features(x), atol=1e-6) and torch.equal(first, maps[0])


@pytest.mark.parametrize("exit_index", [0, 4])
def test_torchscript_computes_what_eager_computes(exit_index):
    with timm.set_scriptable(True):
        model = randomise_norms(_tiny()).eval()
    model.set_exit(exit_index)
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()  # a real TorchScript program: it survives save and load without Python code
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.forward_exits(x)[exit_index]
        assert torch.allclose(loaded(x), expected, atol=1e-5)
    with pytest.raises(torch.jit.Error, match="expects images of shape"):
        loaded(torch.randn(1, 3, 64, 64))


class _TimmTracer(torch.fx.Tracer):
    """torch.fx with timm's leaf modules and wrapped functions, as timm's own FX tests trace."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(get_notrace_functions()), param_shapes_constant=True)

    def is_leaf_module(self, module, name):
        return isinstance(module, tuple(get_notrace_modules())) or super().is_leaf_module(module, name)


def _fx(model):
    return torch.fx.GraphModule(model, _TimmTracer().trace(model))


def test_fx_traces_eval_and_training_graphs():
    model = randomise_norms(_tiny()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(_fx(model)(x), model(x), atol=1e-5)
    # training graph: every exit (the tuple), gradients as in eager mode's straightforward step
    eager = _tiny(channels_last_training=False).train()
    traced = _fx(copy.deepcopy(eager))
    outs = traced(x)
    assert len(outs) == eager.num_exits
    sum(o.square().mean() for o in outs).backward()
    sum(o.square().mean() for o in eager(x)).backward()
    grads = dict(traced.named_parameters())
    for name, p in eager.named_parameters():
        assert torch.allclose(grads[name].grad, p.grad, atol=1e-5), name
