"""ADN networks as timm citizens: timm's wrappers and hooks, training forward, TorchScript, FX, registration.

Every check compares against an independent reference: the plain timm model of the same family with the
weights of the selected sub-network put in by hand (skipped blocks replaced by ``nn.Identity``, each
skip-aware norm by the twin its stage uses), so that a depth configuration is what the ADN paper says.
"""
import copy
import re
import warnings

import pytest
import timm
import torch
from torch import nn
from timm.models._features import FeatureGetterNet, FeatureListNet

import timm_exits  # noqa: F401
from timm_exits.models import adaptive_depth
from timm_exits.models.adaptive_depth import SkipAware, Skippable, SkippableAttnBlock, set_depth
from timm_exits.catalogue import load_catalogue

from helpers import randomise_norms

# tiny configurations of the registered variants; same block counts as the variants (the depth split)
TINY = {
    "resnet18_adn": ("resnet18", {}),
    "vit_tiny_patch16_224_adn": ("vit_tiny_patch16_224", dict(img_size=64, embed_dim=48)),
    "swin_tiny_patch4_window7_224_adn": ("swin_tiny_patch4_window7_224",
                                         dict(img_size=64, window_size=4, embed_dim=24, num_heads=(1, 2, 2, 4))),
}
# the stage of a block from its path and the blocks that are skippable (paper's split: the second half)
STAGE = {"resnet18_adn": (r"layer(\d)\.(\d+)", lambda g: (int(g[0]) - 1, int(g[1]) >= 1)),
         "vit_tiny_patch16_224_adn": (r"blocks\.(\d+)", lambda g: (int(g[0]) // 3, int(g[0]) % 3 == 2)),
         "swin_tiny_patch4_window7_224_adn": (r"layers\.(\d)\.(?:blocks\.(\d+)|downsample)",
                                              lambda g: (int(g[0]), g[1] is not None and int(g[1]) >= (1, 1, 3, 1)[int(g[0])]))}


def _adn(name, **kwargs):
    torch.manual_seed(0)
    return randomise_norms(timm.create_model(name, num_classes=5, **TINY[name][1], **kwargs)).eval()


def _reference(name, adn, config):
    """The plain timm model computing ``adn``'s sub-network ``config``, built from the paper's split."""
    pattern, where = STAGE[name]
    ref = timm.create_model(TINY[name][0], num_classes=5, **TINY[name][1]).eval()
    ref.load_state_dict({k: v for k, v in adn.state_dict().items() if k in ref.state_dict()}, strict=False)
    for path, module in adn.named_modules():
        if not isinstance(module, (SkipAware, Skippable)):
            continue
        stage, skippable = where(re.match(pattern, path).groups())
        skip = config[stage] == "T"
        if isinstance(module, Skippable):
            assert skippable, path
            ref.set_submodule(path, _Removed() if skip else copy.deepcopy(module.block))
        else:
            assert not skippable or path.endswith("downsample.norm"), path
            ref.set_submodule(path, copy.deepcopy(module.skip if skip else module.main))
    # every tensor of the reference came from the ADN model: by name, or with a replaced module
    replaced = tuple(p + "." for p, m in adn.named_modules() if isinstance(m, (SkipAware, Skippable)))
    assert all(k in adn.state_dict() or k.startswith(replaced) for k in ref.state_dict())
    return ref.eval()


class _Removed(nn.Identity):
    """A skipped block: its input, whatever the arguments (ViT blocks get attention-mask ones)."""

    def forward(self, x, *args, **kwargs):
        return x


@pytest.mark.parametrize("name", list(TINY))
def test_depth_configs_compute_the_reference_sub_networks(name):
    adn = _adn(name)
    x = torch.randn(2, 3, 64, 64)
    outputs = {}
    with torch.no_grad():
        for config in ("FFFF", "TFTF", "TTTT"):
            adn.set_depth(config)
            outputs[config] = adn(x)
            torch.testing.assert_close(outputs[config], _reference(name, adn, config)(x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(outputs["FFFF"], outputs["TTTT"], atol=1e-3)


def test_skippable_wrapper_takes_what_the_block_takes():
    vit = _adn("vit_tiny_patch16_224_adn")
    resnet = _adn("resnet18_adn")
    assert type(vit.blocks[2]) is SkippableAttnBlock and type(resnet.layer1[1]) is Skippable
    # ViT blocks are called with timm's attention-mask arguments; the reference ViT gets the same
    x, mask = torch.randn(1, 3, 64, 64), torch.zeros(17, 17)
    mask[:, -3:] = float("-inf")  # hide three patches
    with torch.no_grad():
        vit.set_depth("TFFT")
        torch.testing.assert_close(vit(x, attn_mask=mask), _reference("vit_tiny_patch16_224_adn", vit, "TFFT")(x, attn_mask=mask))
    # wrapped attributes read through the wrapper, as timm code does (Swin: block.norm1.weight, set_input_size)
    assert vit.blocks[0].norm1.weight is vit.blocks[0].norm1.main.weight

    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(TypeError, match=r"whose forward takes \(x, y\); supported: \(x\) and \(x, attn_mask, is_causal\)"):
        adaptive_depth._skippable(TwoInputs(), 0, 1)


@pytest.mark.parametrize("name", ["resnet18_adn", "swin_tiny_patch4_window7_224_adn"])
def test_swin_and_resnet_resize_and_reset_with_switches(name):
    adn = _adn(name)
    if name.startswith("swin"):
        adn.set_input_size(img_size=(96, 96))  # timm walks blocks and their norms: through the wrappers
    adn.reset_classifier(0)
    with torch.no_grad():
        assert adn(torch.randn(1, 3, 96, 96)).shape == (1, adn.num_features)


@pytest.mark.parametrize("name", ["resnet18_adn", "vit_tiny_patch16_224_adn"])
def test_training_forward_returns_super_and_base_logits(name):
    adn = _adn(name).train()
    adn.set_depth("TFTF")
    x = torch.randn(4, 3, 64, 64)
    super_logits, base_logits = adn(x)  # training mode: ADN's two passes (batch statistics in the norms)
    assert adn.depth_config == "TFTF"  # restored
    torch.testing.assert_close(super_logits, _reference(name, adn, "FFFF").train()(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(base_logits, _reference(name, adn, "TTTT").train()(x), rtol=1e-4, atol=1e-5)
    (super_logits.sum() + base_logits.sum()).backward()
    assert all(p.grad is not None for p in adn.parameters())  # twins included
    adn.set_multi_exit_training(False)
    torch.testing.assert_close(adn(x), _reference(name, adn, "TFTF").train()(x), rtol=1e-4, atol=1e-5)
    ema = copy.deepcopy(adn)  # timm's EMA copies the model: switches and depth come along
    assert ema.depth_config == "TFTF" and not ema.multi_exit_training
    torch.testing.assert_close(ema(x), adn(x))
    adn.eval()
    adn.set_multi_exit_training(True)
    with torch.no_grad():
        assert isinstance(adn(x), torch.Tensor)


# timm's features_only wrapper and default out_indices for each base family
FEATURES = {"resnet18_adn": FeatureListNet, "vit_tiny_patch16_224_adn": FeatureGetterNet,
            "swin_tiny_patch4_window7_224_adn": FeatureListNet}


@pytest.mark.parametrize("name", list(FEATURES))
def test_features_only_follows_the_active_depth(name):
    base, tiny = TINY[name]
    torch.manual_seed(0)
    feats = timm.create_model(name, features_only=True, **tiny).eval()
    plain_feats = timm.create_model(base, features_only=True, **tiny)
    assert type(feats) is FEATURES[name] and type(plain_feats) is FEATURES[name]
    assert feats.feature_info.out_indices == plain_feats.feature_info.out_indices
    assert feats.feature_info.channels() == plain_feats.feature_info.channels()
    randomise_norms(feats)
    x = torch.randn(1, 3, 64, 64)
    # the reference: the plain model of the sub-network (weights: the feature model's), wrapped alike
    full = _adn(name)
    full.load_state_dict(_full_state(feats.model if isinstance(feats, FeatureGetterNet) else feats, full), strict=False)
    with torch.no_grad():
        for config in ("FFFF", "TTTT", "FTFT"):
            assert set_depth(feats, config) == config
            ref_feats = _wrap_like(feats, _reference(name, full, config))
            for a, b in zip(feats(x), ref_feats(x)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="depth config must be 4 letters"):
        set_depth(feats, "TT")


def _full_state(feats, full):
    """The feature model's weights under the full model's names (FeatureListNet flattens ``layers.0`` to
    ``layers_0``)."""
    state = {}
    for key, value in feats.state_dict().items():
        state[re.sub(r"^(layers)_(\d)", r"\1.\2", key)] = value
    assert set(state) <= set(full.state_dict())
    return state


def _wrap_like(feats, ref):
    if isinstance(feats, FeatureGetterNet):
        return FeatureGetterNet(ref, out_indices=feats.out_indices).eval()
    return FeatureListNet(ref, out_indices=feats.feature_info.out_indices, output_fmt=feats.output_fmt.value,
                          flatten_sequential=isinstance(ref, timm.models.SwinTransformer)).eval()


@pytest.mark.parametrize("name, bad, levels", [("resnet18_adn", (1, 5), 5), ("swin_tiny_patch4_window7_224_adn", (0, 4), 4),
                                               ("vit_tiny_patch16_224_adn", 13, 12), ("resnet18_adn", (), 5)])
def test_out_of_range_out_indices_are_explained(name, bad, levels):
    with pytest.raises(ValueError, match=rf"has {levels} feature maps .* in \[-{levels}, {levels - 1}\] or a count in \[1, {levels}\]"):
        timm.create_model(name, features_only=True, out_indices=bad, **TINY[name][1])


@pytest.mark.parametrize("name", list(TINY))
def test_forward_intermediates_and_pruning_follow_the_active_depth(name):
    adn = _adn(name)
    adn.set_depth("TFFT")
    ref = _reference(name, adn, "TFFT")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = adn.forward_intermediates(x)
        ref_final, ref_inter = ref.forward_intermediates(x)
        torch.testing.assert_close(final, ref_final, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(final, adn.forward_features(x), rtol=1e-4, atol=1e-5)
        for a, b in zip(inter, ref_inter, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        ref = _reference(name, adn, "TTTT")
        kept = adn.prune_intermediate_layers(indices=[1], prune_head=True)
        assert kept == [1]
        adn.set_depth("TTTT")  # a full-length configuration, also with the later stages pruned
        for a, b in zip(adn.forward_intermediates(x, indices=kept, intermediates_only=True),
                        ref.forward_intermediates(x, indices=kept, intermediates_only=True), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18_adn", "vit_tiny_patch16_224_adn"])  # Swin: timm's suite scripts it
def test_torchscript_reads_the_switches_at_run_time(name):
    with timm.set_scriptable(True):
        adn = _adn(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(adn)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for config in ("TTTT", "FTFT", "FFFF"):
            assert set_depth(scripted, config) == config
            torch.testing.assert_close(scripted(x), _reference(name, adn, config)(x), rtol=1e-4, atol=1e-5)


def test_fx_graph_fixes_the_depth_selected_at_trace_time():
    adn = _adn("resnet18_adn")
    x = torch.randn(1, 3, 64, 64)
    adn.set_depth("TTTT")
    traced = torch.fx.symbolic_trace(adn)
    adn.set_depth("FFFF")
    with torch.no_grad():
        torch.testing.assert_close(traced(x), _reference("resnet18_adn", adn, "TTTT")(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(traced(x), adn(x), atol=1e-3)
    # in training mode the trace holds both passes
    adn.train()
    train_graph = torch.fx.symbolic_trace(adn)
    out = train_graph(x)
    assert isinstance(out, tuple) and len(out) == 2


def test_registration_the_timm_way():
    catalogue = load_catalogue("adn")["variants"]
    names = ["deit_small_patch16_224_adn", "resnet18_adn", "resnet50_adn", "swin_tiny_patch4_window7_224_adn",
             "vit_base_patch16_224_adn", "vit_tiny_patch16_224_adn"]
    assert timm.list_models("*_adn") == names == sorted(adaptive_depth.default_cfgs)
    for name in names:
        entrypoint = getattr(adaptive_depth, name)
        assert timm.models.model_entrypoint(name) is entrypoint
        assert entrypoint.__doc__ == catalogue[name]["description"]
        # the timm base model's cfg: same weights, preprocessing and head
        base = timm.models.get_pretrained_cfg(catalogue[name]["backbone"]).to_dict()
        ours = timm.models.get_pretrained_cfg(name).to_dict()
        assert {k: v for k, v in ours.items() if k != "architecture"} == \
               {k: v for k, v in base.items() if k not in ("architecture", "tag")}
    with torch.device("meta"):
        vit = timm.create_model("vit_tiny_patch16_224_adn", num_stages=2)
        assert [i for i, b in enumerate(vit.blocks) if isinstance(b, Skippable)] == [3, 4, 5, 9, 10, 11]
        with pytest.raises(TypeError):
            timm.create_model("resnet18_adn", not_a_model_arg=1)
