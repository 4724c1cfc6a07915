"""MSDNet against the reference: costs and parameters per exit, widths, initialisation.

Expected numbers are those of the reference code (MSDNet-PyTorch: its op counter, its layer widths
and schedules, as the MSDNet and IMTA papers report them), or, for variants without published numbers,
from the independent reference counter in ``msdnet_reference.py`` (itself checked against the
published numbers below).
"""
import math

import pytest
import timm
import torch

import timm_exits  # noqa: F401
from timm_exits.models.msdnet import MSDNet, msdnet_plan
from timm_exits.profile import profile_exits
from timm_exits.catalogue import load_catalogue

from msdnet_reference import reference_for

CATALOGUE = load_catalogue("msdnet")["variants"]

# the reference op counter and parameter count per exit, millions (IMTA's Table 1 for CIFAR)
CIFAR7_OPS = [6.8599, 14.3500, 27.2914, 48.4489, 76.4326, 108.8505, 137.2810]
CIFAR7_PARAMS = [0.2997, 0.6497, 1.1114, 1.7272, 2.3850, 3.0522, 3.9667]
CIFAR7_CONV_MACS = [6.78, 14.18, 27.00, 48.00, 75.84, 108.11, 136.48]
IMAGENET4_OPS = [339.90, 685.46, 1008.16, 1254.47, 1360.53]
IMAGENET4_PARAMS = [4.239, 8.772, 13.073, 16.748, 23.958]


def _reference_costs(name):
    v = CATALOGUE[name]
    ref = reference_for(v["reference_command"])
    size = timm.models.get_pretrained_cfg(name).input_size
    _, costs = ref.run(ref.meta_state_dict(), torch.empty(1, *size, device="meta"))
    return costs


def _meta_model(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def test_reference_counter_reproduces_the_published_numbers():
    cifar = _reference_costs("msdnet_cifar_7exit")
    assert [round(c["ops"] / 1e6, 4) for c in cifar] == CIFAR7_OPS
    assert [round(c["params"] / 1e6, 4) for c in cifar] == CIFAR7_PARAMS
    imagenet = _reference_costs("msdnet_imagenet_5exit")
    assert [round(c["ops"] / 1e6, 2) for c in imagenet] == IMAGENET4_OPS
    assert [round(c["params"] / 1e6, 3) for c in imagenet] == IMAGENET4_PARAMS


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_every_variant_matches_the_reference_counter_and_catalogue(name):
    model = _meta_model(name)
    ops = profile_exits(model, convention="msdnet")
    macs = profile_exits(model, convention="macs")
    reference = _reference_costs(name)
    expected = CATALOGUE[name]["expected"]
    assert [c.macs for c in ops] == [r["ops"] for r in reference] == expected["msdnet_ops"]
    assert [c.macs for c in macs] == [r["macs"] for r in reference] == expected["macs"]
    assert [c.params for c in ops] == [r["params"] for r in reference] == expected["params"]
    assert [c.params for c in macs] == expected["params"]
    assert model.num_exits == len(expected["params"]) == len(reference)


def test_published_numbers_of_the_profiled_models():
    ops = profile_exits(_meta_model("msdnet_cifar_7exit"), convention="msdnet")
    assert [round(c.macs / 1e6, 4) for c in ops] == CIFAR7_OPS
    assert [round(c.params / 1e6, 4) for c in ops] == CIFAR7_PARAMS
    # "macs" = conv MACs + linear MACs (128 x 100 per head)
    macs = profile_exits(_meta_model("msdnet_cifar_7exit"), convention="macs")
    assert [round((c.macs - 12800 * c.exit) / 1e6, 2) for c in macs] == CIFAR7_CONV_MACS
    ops = profile_exits(_meta_model("msdnet_imagenet_5exit"), convention="msdnet")
    assert [round(c.macs / 1e6, 2) for c in ops] == IMAGENET4_OPS
    assert [round(c.params / 1e6, 3) for c in ops] == IMAGENET4_PARAMS


def test_catalogue_reference_entries_agree_with_the_models():
    for name, v in CATALOGUE.items():
        ref = v.get("reference")
        if not ref:
            continue
        ops = profile_exits(_meta_model(name), convention="msdnet")
        if "msdnet_ops" in ref:
            digits = len(str(ref["msdnet_ops"][0]).split(".")[1])
            assert [round(c.macs / 1e6, 4) for c in ops] == pytest.approx(ref["msdnet_ops"], abs=10 ** -digits)
            assert [c.params / 1e6 for c in ops] == pytest.approx(ref["params"], abs=10 ** -digits)
        else:  # a band read off a plot
            first, last = ref["msdnet_ops_first_last"]
            assert abs(ops[0].macs / 1e6 - first) <= 0.2 and abs(ops[-1].macs / 1e6 - last) <= 0.2


def test_head_widths_match_the_reference():
    cifar = _meta_model("msdnet_cifar_7exit")
    assert cifar.stage_widths == [88, 136, 208, 304, 260, 200, 368]
    assert cifar.exit_widths == [128] * 7
    assert _meta_model("msdnet_imagenet_5exit").stage_widths == [384, 384, 352, 304, 560]
    imagenet = _meta_model("msdnet_imagenet_5exit")
    assert imagenet.exit_widths == imagenet.stage_widths  # ImageNet heads keep D channels


def test_imagenet_step4_schedule_matches_the_reference():
    plan = msdnet_plan(5, 4, 4, "even", 32, 16, 4)
    widths_after = [[p.transition_width or p.width + 16 for p in block] for block in plan]
    assert widths_after == [[48, 64, 80, 96], [112, 64, 80, 96], [112, 128, 72, 88], [104, 120, 136, 76],
                            [92, 108, 124, 140]]
    scales = [p.out_scales for block in plan for p in block]
    assert scales == [4] * 5 + [3] * 5 + [2] * 5 + [1] * 5
    # transitions after l = 6, 11, 16, with the scale drops
    transitions = [i + 1 for i, p in enumerate(p for block in plan for p in block) if p.transition_width]
    assert transitions == [6, 11, 16]


def test_cifar_transitions_and_scales_match_the_reference():
    plan = [p for block in msdnet_plan(7, 1, 1, "lin_grow", 16, 6, 3) for p in block]
    assert len(plan) == 28
    assert [i + 1 for i, p in enumerate(plan) if p.transition_width] == [11, 21]
    assert [plan[10].width + 6, plan[10].transition_width] == [82, 41]
    assert [plan[20].width + 6, plan[20].transition_width] == [101, 50]


def test_bottleneck_widths_match_the_reference():
    cifar = _meta_model("msdnet_cifar_7exit")
    # first layer, 3 scales: s1 normal c->6, s2 down c->6 / normal 2c->12, s3 down 2c->24 / normal 4c->48
    units = cifar.stages[0][0].units
    assert units[0].normal.reduce.conv.out_channels == 6
    assert (units[1].down.reduce.conv.out_channels, units[1].normal.reduce.conv.out_channels) == (6, 12)
    assert (units[2].down.reduce.conv.out_channels, units[2].normal.reduce.conv.out_channels) == (24, 48)
    assert units[2].down.conv.conv.out_channels == 12 and units[2].down.conv.conv.stride == (2, 2)
    # last block keeps only scale 3: normal-only unit 4c -> 96 -> 24
    last = cifar.stages[6][-1].units
    assert len(last) == 1 and last[0].down is None
    assert (last[0].normal.reduce.conv.out_channels, last[0].normal.conv.conv.out_channels) == (96, 24)
    imagenet = _meta_model("msdnet_imagenet_5exit")
    first = imagenet.stages[0][0].units
    assert [u.normal.reduce.conv.out_channels for u in first] == [16, 32, 128, 128]
    assert [u.down.reduce.conv.out_channels for u in first[1:]] == [16, 64, 128]
    only = imagenet.stages[4][-1].units
    assert len(only) == 1 and only[0].normal.reduce.conv.out_channels == 256


def test_imagenet_stem_is_the_reference_stem():
    model = _meta_model("msdnet_imagenet_5exit")
    first = model.stem.convs[0].conv
    assert (first.kernel_size, first.stride, first.padding, first.bias is not None) == ((7, 7), (2, 2), (3, 3), True)
    assert isinstance(model.stem.pool, torch.nn.MaxPool2d)
    convs_with_bias = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None]
    assert convs_with_bias == ["stem.convs.0.conv"]


def _wide_model(weight_init):
    torch.manual_seed(0)
    return MSDNet(num_blocks=1, base=1, step=1, num_channels=64, growth_rate=64, gr_factor=[1], bn_factor=[4],
                  stem_type="cifar", head_channels=256, num_classes=10, img_size=8, weight_init=weight_init)


def test_default_init_is_pytorch_default_and_he_is_optional():
    torch_init, he_init = _wide_model("torch"), _wide_model("he")
    conv = torch_init.exits[0].conv2.conv  # 256 -> 256, 3x3
    fan_in = 256 * 9
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.02)
    assert torch_init.exits[0].fc.bias.abs().max() > 0
    conv = he_init.exits[0].conv2.conv
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.02)
    assert he_init.exits[0].fc.bias.abs().max() == 0
    for model in (torch_init, he_init):
        bn = model.exits[0].conv2.bn
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
