"""MSDNet's fused inference path computes the same function as the plain model: every exit, random
weights and trained-looking batch-norm statistics, for the variants' different layouts."""
import pytest
import timm
import torch
from timm.utils import reparameterize_model
from torch import nn

import timm_exits  # noqa: F401  (registers the models)
from timm_exits import MSDNet
from timm_exits.inference import EarlyExitExecutor
from timm_exits.models.msdnet import FoldedConvAct, FusedMsdLayer


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


CASES = [
    ("msdnet_cifar_7exit", {}, 32),                              # lin_grow, 3 scales
    ("msdnet_cifar_anytime_7exit", {}, 32),                      # even steps
    ("msdnet_cifar_5exit", dict(bottleneck=False), 32),          # no 1x1 bottlenecks to merge
    ("msdnet_cifar_5exit", dict(prune="min", reduction=0.5), 32),
    ("msdnet_imagenet_5exit", dict(num_channels=8, growth_rate=4), 224),  # 4 scales, biased stem conv
]


@pytest.mark.parametrize("name,kwargs,size", CASES)
def test_fused_model_gives_the_plain_models_outputs(name, kwargs, size):
    torch.manual_seed(0)
    model = _randomise(timm.create_model(name, num_classes=10, **kwargs))
    fused = reparameterize_model(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected, got = model.forward_exits(x), fused.forward_exits(x)
    assert len(got) == model.num_exits
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()


def test_shared_input_bottlenecks_are_merged():
    model = _randomise(timm.create_model("msdnet_cifar_7exit"))
    fused = reparameterize_model(model)
    layers = [m for m in fused.modules() if isinstance(m, FusedMsdLayer)]
    first = layers[0]  # 3 scales: scale 0 feeds the normal path of 0 and the down path of 1, ...
    assert sorted(first.reads) == [0, 1, 2] and [len(first.reads[j]) for j in (0, 1, 2)] == [2, 2, 1]
    plain_1x1 = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    fused_1x1 = sum(1 for m in fused.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    assert fused_1x1 < 0.7 * plain_1x1
    assert all(m.conv.weight.is_contiguous(memory_format=torch.channels_last) for m in fused.modules()
               if isinstance(m, FoldedConvAct))


def test_the_executor_runs_the_fused_model_with_the_same_predictions():
    torch.manual_seed(1)
    model = _randomise(MSDNet(num_blocks=3, base=1, step=1, num_channels=4, growth_rate=2, gr_factor=[1, 2],
                              bn_factor=[1, 2], stem_type="cifar", head_channels=8, num_classes=3, img_size=16))
    fused = reparameterize_model(model)
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        confidence = [z.softmax(1).amax(1).median().item() for z in model.forward_exits(x)]
    thresholds = [confidence[0], confidence[1], -1e8]  # about half leave at each exit
    plain, fast = EarlyExitExecutor(model, thresholds)(x), EarlyExitExecutor(fused, thresholds)(x)
    assert torch.equal(plain.exits, fast.exits) and torch.equal(plain.preds, fast.preds)
    assert 0 < (plain.exits == 0).sum() < len(x)  # some samples left early, some did not


def test_fusing_needs_conv_bn_relu_units():
    model = timm.create_model("msdnet_cifar_5exit", num_classes=3).eval()
    model.stem.convs[0].bn.act = nn.GELU()
    with pytest.raises(ValueError, match="expects conv-BN-ReLU units"):
        reparameterize_model(model)


def test_stages_append_in_place_only_to_states_no_one_extended():
    """A fused stage appends to the buffer its input is the filled part of; continuing twice from
    the same state must not overwrite what the first continuation returned."""
    model = _randomise(timm.create_model("msdnet_cifar_7exit", num_classes=10))
    fused = reparameterize_model(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        state = fused.forward_stage(fused.forward_stem(x), 0)
        first = fused.forward_stage(state, 1)
        kept = [t.clone() for t in first]
        second = fused.forward_stage(state, 1)
        expected = model.forward_stage(model.forward_stage(model.forward_stem(x), 0), 1)
    for a, b, c, e in zip(first, kept, second, expected):
        assert torch.equal(a, b) and torch.allclose(c, e, rtol=1e-4, atol=1e-5)
