"""MSDNet through timm's API: registration, shapes, the multi-exit contract, errors, compile."""
import pytest
import timm
import torch

import timm_exits  # noqa: F401
from timm_exits import MSDNet, slice_state

VARIANTS = {  # the reference configurations: name -> (exits, input, classes)
    "msdnet_imagenet_5exit": (5, 224, 1000),
    "msdnet_imagenet_5exit_step6": (5, 224, 1000),
    "msdnet_imagenet_5exit_step7": (5, 224, 1000),
    "msdnet_cifar_7exit": (7, 32, 100),
    "msdnet_cifar_5exit": (5, 32, 100),
    "msdnet_cifar_anytime_7exit": (7, 32, 100),
    "msdnet_cifar_anytime_10exit": (10, 32, 100),
}


def tiny(**kwargs):
    """3 exits, 3 scales, with scale drops and transitions (lin_grow: 1 + 2 + 3 layers)."""
    args = dict(num_blocks=3, base=1, step=1, step_mode="lin_grow", num_channels=8, growth_rate=4,
                gr_factor="1-2-4", bn_factor="1-2-4", stem_type="cifar", head_channels=16, num_classes=5, img_size=32)
    torch.manual_seed(0)
    return MSDNet(**{**args, **kwargs})


def test_every_variant_is_listed():
    assert sorted(timm.list_models("msdnet*")) == sorted(VARIANTS)


@pytest.mark.parametrize("name", [n for n in VARIANTS if "cifar" in n])
def test_cifar_variants_run_every_exit(name):
    exits, size, classes = VARIANTS[name]
    model = timm.create_model(name).eval()
    assert tuple(model.pretrained_cfg["input_size"]) == (3, size, size) and model.pretrained_cfg["num_classes"] == classes
    with torch.no_grad():
        outs = model.forward_exits(torch.randn(2, 3, size, size))
    assert len(outs) == model.num_exits == exits
    assert all(o.shape == (2, classes) for o in outs)
    cifar10 = timm.create_model(name, num_classes=10).eval()
    assert cifar10(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", [n for n in VARIANTS if "imagenet" in n])
def test_imagenet_variants_shapes(name):
    exits, size, classes = VARIANTS[name]
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        outs = model.forward_exits(torch.empty(2, 3, size, size))
    assert len(outs) == exits and all(o.shape == (2, classes) for o in outs)
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406)


def test_imagenet_step4_runs_on_real_images():
    model = timm.create_model("msdnet_imagenet_5exit").eval()
    with torch.no_grad():
        outs = model.forward_exits(torch.randn(1, 3, 224, 224))
    assert [tuple(o.shape) for o in outs] == [(1, 1000)] * 5 and all(torch.isfinite(o).all() for o in outs)


def _record_calls(model):
    calls = []
    for name, module in list(model.stages.named_children()) + list(model.exits.named_children()):
        kind = "stage" if module in list(model.stages) else "exit"
        module.register_forward_hook(lambda m, i, o, kind=kind, name=name: calls.append((kind, int(name))))
    return calls


@pytest.mark.parametrize("k", [0, 1, 2])
def test_stop_at_exit_k_runs_only_what_it_needs(k):
    model = tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        every = model.forward_exits(x)
        calls = _record_calls(model)
        model.set_exit(k)
        out = model(x)
    assert torch.allclose(out, every[k], atol=1e-6)
    assert calls == [("stage", i) for i in range(k + 1)] + [("exit", k)]


def test_default_exit_is_the_last_and_negative_indices_count_from_the_end():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last = model.forward_exits(x)[-1]
        assert torch.allclose(model(x), last, atol=1e-6)
        model.set_exit(-2)
        assert model.exit_index == 1
        model.set_exit(None)
        assert torch.allclose(model(x), last, atol=1e-6)


def test_forward_features_and_head():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_exit(1)
        feats = model.forward_features(x)
        # the exit head's convolutions (two 3x3/2) on the coarsest scale (8x8) after stage 1, unpooled
        coarse = model.forward_until(x, 1)[-1]
        assert coarse.shape == (2, model.stage_widths[1], 8, 8)
        assert torch.allclose(feats, model.exits[1].conv2(model.exits[1].conv1(coarse)))
        assert feats.shape == (2, model.exit_widths[1], 2, 2)
        assert torch.allclose(model.forward_head(feats), model(x), atol=1e-6)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, model.exit_widths[1])
        assert torch.allclose(model.get_classifier()(pooled), model(x), atol=1e-6)


def test_stage_by_stage_on_a_subset_equals_running_the_subset_alone():
    model = tiny().eval()
    x = torch.randn(6, 3, 32, 32)
    keep = torch.tensor([0, 2, 5])
    with torch.no_grad():
        state = model.forward_stem(x)
        state = model.forward_stage(state, 0)
        assert isinstance(state, list) and all(s.shape[0] == 6 for s in state)
        state = slice_state(state, keep)  # drop samples after exit 1
        tail = []
        for i in (1, 2):
            state = model.forward_stage(state, i)
            tail.append(model.forward_exit(state, i))
        alone = model.forward_exits(x[keep])
    for a, b in zip(tail, alone[1:]):
        assert torch.allclose(a, b, atol=1e-5)


def test_reset_classifier_changes_every_exit():
    model = tiny()
    model.reset_classifier(7)
    assert model.num_classes == 7
    assert all(o.shape == (2, 7) for o in model.forward_exits(torch.randn(2, 3, 32, 32)))
    model.reset_classifier(0)
    outs = model.forward_exits(torch.randn(2, 3, 32, 32))
    assert [o.shape[1] for o in outs] == model.exit_widths


def test_device_and_dtype_arguments_reach_every_layer():
    model = timm.create_model("msdnet_cifar_5exit", device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}
    model.reset_classifier(3)
    assert model.exits[0].fc.weight.device.type == "meta" and model.exits[0].fc.weight.dtype == torch.bfloat16


def test_trains_end_to_end_with_dropout_and_one_channel():
    model = tiny(in_chans=1, drop_rate=0.2).train()
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = sum(torch.nn.functional.cross_entropy(o, y) for o in model.forward_exits(x))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.exits[0].drop.p == 0.2


@pytest.mark.parametrize("shape, message", [
    ((2, 3, 64, 64), r"\(batch, 3, 32, 32\), got \(2, 3, 64, 64\)"),
    ((2, 1, 32, 32), r"\(batch, 3, 32, 32\), got \(2, 1, 32, 32\)"),
    ((3, 32, 32), r"\(batch, 3, 32, 32\), got \(3, 32, 32\)"),
])
def test_wrong_input_names_the_expected_size(shape, message):
    with pytest.raises(ValueError, match=message):
        tiny()(torch.randn(*shape))


@pytest.mark.parametrize("kwargs, message", [
    (dict(step_mode="linear"), "step_mode must be 'even' or 'lin_grow'"),
    (dict(prune="none"), "prune must be 'max' or 'min'"),
    (dict(growth_rate=3, gr_factor="1-1-2", bn_factor="1-1-2"), "growth_rate \\* gr_factor must be even"),
    (dict(gr_factor="1-2-x"), "gr_factor must look like '1-2-4'"),
    (dict(bn_factor=[1, 2]), "one entry per scale"),
    (dict(img_size=64), "must reduce the coarsest scale to 1x1; img_size=\\(64, 64\\) gives a 16x16"),
    (dict(stem_type="tiny"), "stem_type must be 'cifar' or 'imagenet'"),
    (dict(weight_init="xavier"), "weight_init must be 'torch' or 'he'"),
    (dict(num_blocks=0), "num_blocks, base and step must be >= 1"),
])
def test_bad_arguments_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_bad_exit_index_and_pool_are_explained():
    model = tiny()
    with pytest.raises(ValueError, match=r"exit index must be in \[-3, 2\], got 3"):
        model.set_exit(3)
    with pytest.raises(ValueError, match="fixed 2x2 average"):
        model.reset_classifier(10, global_pool="max")


def test_prune_min_builds_and_runs():
    model = tiny(prune="min").eval()
    outs = model.forward_exits(torch.randn(2, 3, 32, 32))
    assert len(outs) == 3
    # prune='min' drops scales only in the last S-1 layers
    assert [p.out_scales for block in model.plan for p in block] == [3, 3, 3, 3, 2, 1]


def test_reference_style_arguments_and_no_bottleneck():
    model = tiny(bottleneck=False, gr_factor=[1, 2, 4], bn_factor="1-2-4")
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in model.stages[0][0].modules())
    assert model.forward_exits(torch.randn(1, 3, 32, 32))[-1].shape == (1, 5)


@pytest.mark.slow
def test_torch_compile_gives_the_same_outputs():
    model = tiny(num_blocks=1).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_torch_jit_trace_gives_the_same_outputs():
    model = tiny(num_blocks=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        assert torch.allclose(traced(torch.flip(x, [0])), model(torch.flip(x, [0])), atol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients():
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    grads = []
    for enable in (False, True):
        model = tiny().train()
        model.set_grad_checkpointing(enable)
        sum(torch.nn.functional.cross_entropy(o, y) for o in model.forward_exits(x)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_layer_decay_groups_go_from_stem_to_the_heads():
    from timm.optim import create_optimizer_v2
    model = tiny()
    optimizer = create_optimizer_v2(model, "sgd", lr=1.0, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    stem = scale[id(model.stem.convs[0].conv.weight)]
    stage0, exit0 = scale[id(model.stages[0][0].units[0].normal.conv.conv.weight)], scale[id(model.exits[0].fc.weight)]
    last = scale[id(model.exits[-1].fc.weight)]
    assert stem < stage0 < exit0 == last == 1.0  # every exit head is a new head: the last group's rate
