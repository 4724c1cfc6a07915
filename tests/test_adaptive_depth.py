"""Adaptive Depth Networks: sub-path split, skip-aware twins, published costs, weights, exits."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_exits  # noqa: F401
from timm_exits import add_exits, make_adaptive_depth
from timm_exits.models.adaptive_depth import SkipAware, Skippable
from timm_exits.profile import profile_exits
from timm_exits.catalogue import load_catalogue

from helpers import randomise_norms

CATALOGUE = load_catalogue("adn")["variants"]
TINY = {
    "resnet18": {},
    "resnet26": {},
    "vit_tiny_patch16_224": {"img_size": 64},
    "deit_tiny_patch16_224": {"img_size": 64},
    "swin_tiny_patch4_window7_224": {"img_size": 64, "window_size": 4},
}


def _pair(name, **kwargs):
    """A plain timm model with non-trivial norms and an ADN copy with the same weights."""
    torch.manual_seed(0)
    plain = randomise_norms(timm.create_model(name, num_classes=5, **TINY[name], **kwargs)).eval()
    adn = make_adaptive_depth(timm.create_model(name, num_classes=5, **TINY[name], **kwargs)).eval()
    from timm_exits.models.adaptive_depth import checkpoint_filter_fn
    adn.load_state_dict(checkpoint_filter_fn(plain.state_dict(), adn))
    return plain, adn


def _meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def test_registered_variants():
    for name in ("resnet50_adn", "vit_base_patch16_224_adn", "resnet18_adn", "vit_tiny_patch16_224_adn",
                 "deit_small_patch16_224_adn", "swin_tiny_patch4_window7_224_adn"):
        assert timm.is_model(name) and name in CATALOGUE


def test_sub_paths_follow_the_paper():
    resnet = _meta("resnet50_adn")
    assert [len(s.skippable) for s in resnet.depth_stages] == [1, 2, 3, 1]
    layers = [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]
    assert [sum(not isinstance(b, Skippable) for b in layer) for layer in layers] == [2, 2, 3, 2]
    # skip-aware twins of bn1, bn2, bn3 in every mandatory block, none elsewhere
    assert [len(s.skip_aware) for s in resnet.depth_stages] == [6, 6, 9, 6]
    assert isinstance(resnet.layer1[0].bn3, SkipAware) and not isinstance(resnet.layer1[0].downsample[1], SkipAware)
    vit = _meta("vit_base_patch16_224_adn")
    assert [i for i, b in enumerate(vit.blocks) if isinstance(b, Skippable)] == [2, 5, 8, 11]
    assert isinstance(vit.blocks[0].norm1, SkipAware) and not isinstance(vit.norm, SkipAware)
    swin = _meta("swin_tiny_patch4_window7_224_adn")
    assert [sum(not isinstance(b, Skippable) for b in layer.blocks) for layer in swin.layers] == [1, 1, 3, 1]
    assert isinstance(swin.layers[1].downsample.norm, SkipAware)  # patch merging uses its own stage's flag
    assert swin.layers[1].downsample.norm in swin.depth_stages[1].skip_aware
    assert resnet.depth_configs()[0] == "FFFF" and resnet.depth_configs()[-1] == "TTTT" and len(resnet.depth_configs()) == 16


@pytest.mark.parametrize("name", list(TINY))
def test_super_net_equals_the_plain_model(name):
    plain, adn = _pair(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert adn.depth_config == "FFFF"
        assert torch.allclose(adn(x), plain(x), atol=1e-5)


@pytest.mark.parametrize("name", ["resnet26", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_base_net_runs_only_mandatory_blocks_with_their_twin_norms(name):
    _, adn = _pair(name)
    ran = []
    for module_name, module in adn.named_modules():
        if module.__class__.__name__ in ("BasicBlock", "Bottleneck", "Block", "SwinTransformerBlock"):
            module.register_forward_hook(lambda *a, n=module_name: ran.append(n))
    x = torch.randn(1, 3, 64, 64)
    adn.set_depth("TTTT")
    with torch.no_grad():
        base = adn(x)
    blocks = [n for n, m in adn.named_modules()
              if m.__class__.__name__ in ("BasicBlock", "Bottleneck", "Block", "SwinTransformerBlock")]
    skippable = [n for n in blocks if n.endswith(".block")]  # the blocks wrapped in Skippable
    assert skippable and ran == [n for n in blocks if n not in skippable]
    # the twins are what the base-net uses: changing them changes it, and leaves the super-net alone
    with torch.no_grad():
        adn.set_depth("FFFF")
        super_before = adn(x)
        for stage in adn.depth_stages:
            for pair in stage.skip_aware:
                if hasattr(pair.skip, "bias") and pair.skip.bias is not None:
                    pair.skip.bias.add_(0.5)
        assert torch.allclose(adn(x), super_before)
        adn.set_depth("TTTT")
        assert not torch.allclose(adn(x), base, atol=1e-3)


def test_mixed_configs_skip_only_their_stages():
    _, adn = _pair("resnet18")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outputs = {}
        for config in ("FFFF", "TFFF", "FFFT", "TTTT"):
            adn.set_depth(config)
            outputs[config] = adn(x)
    assert adn.layer1[1].skipped and adn.layer4[1].skipped
    assert len({tuple(o.flatten().tolist()) for o in outputs.values()}) == 4
    adn.set_depth([True, False, True, False])
    assert adn.depth_config == "TFTF" and adn.layer1[1].skipped and not adn.layer2[1].skipped


def test_depth_context_restores_and_bad_configs_are_explained():
    adn = _meta("resnet18_adn")
    adn.set_depth("TFTF")
    with adn.depth("TTTT"):
        assert adn.depth_config == "TTTT"
    assert adn.depth_config == "TFTF"
    with pytest.raises(ValueError, match="depth config must be 4 letters T \\(skip\\) / F \\(run\\)"):
        adn.set_depth("TTF")
    with pytest.raises(ValueError, match="needs 4 flags, got 2"):
        adn.set_depth([True, False])
    with pytest.raises(ValueError, match="already has skippable sub-paths"):
        make_adaptive_depth(adn)
    with pytest.raises(TypeError, match="supports timm ResNet, VisionTransformer and SwinTransformer"):
        make_adaptive_depth(timm.create_model("mobilenetv3_small_050"))
    with pytest.raises(ValueError, match="cannot be grouped into 5 equal pseudo-stages"):
        make_adaptive_depth(timm.create_model("vit_tiny_patch16_224", img_size=32), num_stages=5)


def test_no_drop_path_in_mandatory_blocks_of_a_skipped_stage():
    torch.manual_seed(0)
    adn = make_adaptive_depth(timm.create_model("vit_tiny_patch16_224", img_size=32, drop_path_rate=0.9)).train()
    adn.set_multi_exit_training(False)  # one training pass at the selected depth
    x = torch.randn(2, 3, 32, 32)
    adn.set_depth("TTTT")
    torch.manual_seed(1)
    a = adn(x)
    torch.manual_seed(2)
    assert torch.equal(adn(x), a)  # deterministic: no drop-path anywhere in the base-net
    adn.set_depth("FFFF")
    torch.manual_seed(1)
    b = adn(x)
    torch.manual_seed(2)
    assert not torch.equal(adn(x), b)


def test_resnet50_costs_reproduce_the_published_gflops():
    adn = _meta("resnet50_adn")
    published = CATALOGUE["resnet50_adn"]["reference"]["macs_norm_gflops"]
    macs_ffff = None
    for config, gflops in published.items():
        adn.set_depth(config)
        assert abs(profile_exits(adn, convention="macs_norm")[0].macs / 1e9 - gflops) <= 0.02, config
    # in plain MACs, every skipped bottleneck removes 17 p^2 HW = 17 * 64^2 * 56^2 (the same in each stage)
    skipped_per_stage = [1, 2, 3, 1]
    for config in adn.depth_configs():
        adn.set_depth(config)
        macs = profile_exits(adn)[0].macs
        macs_ffff = macs if config == "FFFF" else macs_ffff
        removed = sum(n for n, c in zip(skipped_per_stage, config) if c == "T")
        assert macs == macs_ffff - removed * 17 * 64 ** 2 * 56 ** 2
        assert macs == CATALOGUE["resnet50_adn"]["expected"]["macs"][config]


def test_vit_and_swin_costs_reproduce_the_published_gflops():
    vit = _meta("vit_base_patch16_224_adn")
    n, d = 197, 768
    for config, gflops in CATALOGUE["vit_base_patch16_224_adn"]["reference"]["macs_norm_gflops"].items():
        vit.set_depth(config)
        assert abs(profile_exits(vit, convention="macs_norm")[0].macs / 1e9 - gflops) <= 0.02, config
    vit.set_depth("FFFF")
    full = profile_exits(vit)[0].macs
    vit.set_depth("TTFF")
    assert full - profile_exits(vit)[0].macs == 2 * (12 * n * d * d + 2 * n * n * d)  # two blocks removed
    swin = _meta("swin_tiny_patch4_window7_224_adn")
    for config, gflops in CATALOGUE["swin_tiny_patch4_window7_224_adn"]["reference"]["macs_gflops"].items():
        swin.set_depth(config)
        assert abs(profile_exits(swin)[0].macs / 1e9 - gflops) <= 0.02, config


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_catalogue_costs_are_the_models(name):
    adn = _meta(name)
    expected = CATALOGUE[name]["expected"]
    assert sum(p.numel() for p in adn.parameters()) == expected["params"]
    for config in ("FFFF", "TFTF", "TTTT"):
        adn.set_depth(config)
        assert profile_exits(adn)[0].macs == expected["macs"][config]
        assert profile_exits(adn, convention="macs_norm")[0].macs == expected["macs_norm"][config]


def test_plain_timm_weights_load_with_twins_copied(tmp_path):
    torch.manual_seed(0)
    plain = randomise_norms(timm.create_model("resnet18")).eval()
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, path)
    adn = timm.create_model("resnet18_adn", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    pair = adn.layer2[0].bn1
    assert torch.equal(pair.main.weight, plain.layer2[0].bn1.weight) and torch.equal(pair.skip.weight, pair.main.weight)
    assert torch.equal(pair.skip.running_var, plain.layer2[0].bn1.running_var)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(adn(x), plain(x), atol=1e-5)
    # an ADN checkpoint round-trips, twins included
    with torch.no_grad():
        adn.layer2[0].bn1.skip.bias.add_(1.0)
    own = tmp_path / "resnet18_adn.safetensors"
    save_file({k: v.contiguous() for k, v in adn.state_dict().items()}, own)
    again = timm.create_model("resnet18_adn", pretrained=True, pretrained_cfg_overlay=dict(file=str(own)))
    assert torch.equal(again.layer2[0].bn1.skip.bias, adn.layer2[0].bn1.skip.bias)
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        timm.create_model("resnet18_adn", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "nothing.pth")))


def test_adn_and_exits_combine():
    torch.manual_seed(0)
    model = add_exits(timm.create_model("resnet18_adn", num_classes=5)).eval()
    x = torch.randn(2, 3, 64, 64)
    costs = {}
    for config in ("FFFF", "TTTT"):
        model.backbone.set_depth(config)
        with torch.no_grad():
            assert [o.shape for o in model.forward_exits(x)] == [(2, 5)] * 4
        costs[config] = [c.macs for c in profile_exits(model, input_size=(3, 64, 64))]
    assert all(t < f for t, f in zip(costs["TTTT"], costs["FFFF"]))


def test_profile_command_takes_a_depth():
    import json
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "timm_exits.cli", "profile", "resnet50_adn", "--depth", "TTFF",
                          "--json", "--convention", "macs_norm"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["depth"] == "TTFF" and abs(out["exits"][0]["macs"] / 1e9 - 3.46) <= 0.02
