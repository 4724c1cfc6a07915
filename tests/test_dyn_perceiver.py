"""Dynamic Perceiver: reference checkpoints load and give the reference forward's outputs, the multi-exit
contract, costs in exit order, clear errors."""
import copy

import pytest
import timm
import torch

import timm_exits  # noqa: F401
from timm_exits.catalogue import load_catalogue
from timm_exits.inference.executor import EarlyExitExecutor
from timm_exits.models.dyn_perceiver import (DynPerceiver, _map_mobilenetv3_key, _map_resnet_key, _mobilenetv3_blocks,
                                            checkpoint_filter_fn)
from timm_exits.models.multi_exit import slice_state
from timm_exits.profile import profile_exits

from dyn_perceiver_reference import (ReferenceMobileNetV3, ReferenceResNet, reference_cnn, reference_forward,
                                     reference_state_dict)

# a narrow RegNetY (timm's regnety_002: its widths are divisible by its group width, so torchvision's
# rounding gives the same network), few latents and layers: the whole network at 32x32 in milliseconds
TINY = dict(cnn="regnety_002", num_latents=16, depths=(1, 1, 1, 2), num_classes=10)
TINY_TV = dict(depth=13, w_0=24, w_a=36.44, w_m=2.49, group_width=8, num_classes=10)


def _tiny(**kwargs) -> DynPerceiver:
    torch.manual_seed(0)
    return timm.create_model("dyn_perceiver_regnety_008", **dict(TINY, **kwargs)).eval()


# a ResNet-50 at the reference's channel multiplier 1/8 (stem 8 wide, stages 32 / 64 / 128 / 256 out)
TINY_RESNET = dict(TINY, cnn="resnet50", cnn_multiplier=0.125)
# MobileNetV3-Large at width 0.25 (stage inputs 8 / 16 / 24 / 40 wide, last conv 240, head MLP 320)
TINY_MOBILENET = dict(TINY, cnn="mobilenetv3_large_100", cnn_multiplier=0.25)
FAMILIES = {"regnet": ("dyn_perceiver_regnety_008", TINY), "resnet": ("dyn_perceiver_resnet50_0375", TINY_RESNET),
            "mobilenetv3": ("dyn_perceiver_mobilenetv3_large_075", TINY_MOBILENET)}


def _reference(seed: int = 0, family: str = "regnet"):
    cnn = {"regnet": lambda: reference_cnn(**TINY_TV).double().eval(), "resnet": lambda: ReferenceResNet(0.125, 10),
           "mobilenetv3": lambda: ReferenceMobileNetV3(0.25, 10)}[family]()
    sd = reference_state_dict(cnn, 16, (1, 1, 1, 2), 4, 10, torch.Generator().manual_seed(seed))
    return cnn, sd


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_reference_checkpoint_gives_the_reference_outputs_exactly(family):
    cnn, sd = _reference(family=family)
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval().double()
    model.load_state_dict(checkpoint_filter_fn(sd, model))  # strict: every key maps, none is missing
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected = reference_forward(sd, cnn, x)
        got = model.forward_exits(x)
    assert len(got) == 4
    for k, (e, g) in enumerate(zip(expected, got)):
        assert e.abs().max() > 1  # not a trivially small output
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10, msg=f"exit {k + 1}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_released_checkpoint_file_loads_through_timm(tmp_path, family):
    cnn, sd = _reference(seed=2, family=family)
    file = tmp_path / "dyn_perceiver.pth"
    torch.save({"model": sd}, file)  # the reference saves {"model": ...}
    name, kwargs = FAMILIES[family]
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        expected = reference_forward(sd, cnn, x)
        got = model.double().forward_exits(x)  # timm loads the file's float64 values into float32 parameters
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_the_filter_passes_our_layout_and_refuses_a_foreign_key():
    model = _tiny()
    own = model.state_dict()
    assert checkpoint_filter_fn(own, model) is own
    _, sd = _reference()
    sd["something_else.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="something_else.weight"):
        checkpoint_filter_fn(sd, model)
    _, resnet_sd = _reference(family="resnet")  # a ResNet checkpoint for a RegNet model
    with pytest.raises(ValueError, match="cnn_body_stage1.*RegNet branch"):
        checkpoint_filter_fn(resnet_sd, model)


def test_the_reference_channel_multiplier_narrows_timm_s_resnet_stem_and_stages():
    """timm's 7x7 stem is always 64 wide; the reference's scales with the multiplier, as its stages do."""
    model = timm.create_model("dyn_perceiver_resnet50_0375")
    cnn = model.cnn
    assert (cnn.conv1.out_channels, cnn.bn1.num_features, cnn.layer1[0].conv1.in_channels) == (24, 24, 24)
    assert cnn.layer1[0].downsample[0].in_channels == 24
    assert [layer[-1].conv3.out_channels for layer in (cnn.layer1, cnn.layer2, cnn.layer3, cnn.layer4)] == [96, 192, 384, 768]
    assert [s.to_latents.dwc.in_channels for s in model.latent_stages] == [24, 96, 192, 384]
    with pytest.raises(ValueError, match="cnn_multiplier scales a timm ResNet"):
        _tiny(cnn_multiplier=0.5)
    with pytest.raises(ValueError, match="bottleneck blocks"):
        _tiny(cnn="resnet18", cnn_multiplier=0.5)
    with pytest.raises(ValueError, match="must be a timm RegNet, ResNet or MobileNetV3-Large"):
        _tiny(cnn="efficientnet_b0")


def test_the_mobilenetv3_branch_is_built_as_the_reference_builds_it():
    """torchvision's rounding of every scaled width (timm's mobilenetv3_large_075 expands 72, not 56, in its
    third block), BN eps 1e-3, a head 1280 x 0.75 wide, an MLP merged classifier, and the stage cuts."""
    model = timm.create_model("dyn_perceiver_mobilenetv3_large_075")
    cnn = model.cnn
    assert [b.conv_pw.out_channels for b in (cnn.blocks[1][0], cnn.blocks[1][1], cnn.blocks[3][1], cnn.blocks[4][0])] \
        == [48, 56, 152, 360]
    assert cnn.blocks[2][0].se.conv_reduce.out_channels == 16  # torchvision: multiple of 8 of 56 // 4
    assert {m.eps for m in cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    assert (cnn.num_features, cnn.head_hidden_size, cnn.conv_head.out_channels) == (720, 960, 960)
    assert [s.to_latents.dwc.in_channels for s in model.latent_stages] == [24, 32, 64, 120]
    assert [type(m).__name__ for m in model.head_merge] == ["BatchNorm1d", "Linear", "Hardswish", "Dropout", "Linear"]
    assert model.get_classifier() is model.head_merge[4]
    with pytest.raises(ValueError, match="cnn='mobilenetv3_large_100'"):
        _tiny(cnn="mobilenetv3_large_075")
    # the stage cuts: CNN stage 4 (exit 3) adds timm's blocks 5.1, 5.2, 6 and the head, nothing else
    with torch.device("meta"):
        costs = profile_exits(timm.create_model("dyn_perceiver_mobilenetv3_large_075", **TINY_MOBILENET), (3, 32, 32))
        tiny = timm.create_model("dyn_perceiver_mobilenetv3_large_075", **TINY_MOBILENET)
    count = lambda *ms: sum(p.numel() for m in ms for p in m.parameters())  # noqa: E731
    b = tiny.cnn.blocks
    assert costs[2].params - costs[1].params == count(b[5][1], b[5][2], b[6], tiny.cnn.conv_head, tiny.cnn.classifier)


def test_the_contract_stage_by_stage_slicing_and_stopping_early():
    model = _tiny()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        exits = model.forward_exits(x)
        assert torch.equal(model(x), exits[-1])
        state = model.forward_stem(x)
        for k in range(4):
            state = model.forward_stage(state, k)
            assert len(state) == 3 + k  # the map, the latents, the logits of exits 1..k+1
            assert torch.equal(model.forward_exit(state, k), exits[k])
            model.set_exit(k)
            assert torch.equal(model(x), exits[k])
        # a state sliced after exit 2 carries exit 2's logits for ISC: the rest of the samples' exits agree
        state = slice_state(model.forward_until(x, 1), [1, 3])
        for k in (2, 3):
            state = model.forward_stage(state, k)
            torch.testing.assert_close(model.forward_exit(state, k), exits[k][[1, 3]], rtol=1e-5, atol=1e-5)
        assert model.forward_exit(state, 3, pre_logits=True).shape == (2, model.num_features)


def test_the_isc_inputs_matter():
    model = _tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        state = model.forward_until(x, 2)
        reference = model.forward_stage(state, 3)[-1]
        state[3] = state[3] + 1.0  # exit 2's logits, which the merged exit reads
        assert not torch.allclose(model.forward_stage(state, 3)[-1], reference)


def test_training_forward_returns_every_exit_and_every_parameter_learns():
    model = _tiny().train()
    outputs = model(torch.randn(2, 3, 32, 32))
    assert len(outputs) == 4
    sum(o.sum() for o in outputs).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_executor_answers_as_the_exits_do():
    model = _tiny()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        exits = model.forward_exits(x)
    probs = exits[0].softmax(-1).max(-1).values
    threshold = probs.median().item()
    result = EarlyExitExecutor(model, [threshold, 2.0, 2.0, 0.0])(x)
    early = probs >= threshold
    assert early.any() and (~early).any()
    torch.testing.assert_close(result.logits[early], exits[0][early])
    torch.testing.assert_close(result.logits[~early], exits[3][~early], rtol=1e-5, atol=1e-5)
    assert result.exits.tolist() == [0 if e else 3 for e in early.tolist()]


def test_costs_accumulate_in_exit_order():
    """Exit 2 (the latents after CNN stage 3) comes before CNN stage 4, which exit 3 adds."""
    with torch.device("meta"):
        model = timm.create_model("dyn_perceiver_regnety_008", **TINY)
    costs = profile_exits(model, (3, 32, 32))
    macs = [c.macs for c in costs]
    assert macs == sorted(macs) and len(set(macs)) == 4
    s4 = sum(p.numel() for p in model.cnn.s4.parameters())
    head = sum(p.numel() for p in model.cnn.head.parameters())
    assert costs[2].params - costs[1].params == s4 + head  # exit 3 adds CNN stage 4 and its head, nothing else


def test_bad_input_is_a_clear_error():
    model = _tiny()
    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        _tiny(num_classes=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        _tiny(num_latents=12)


def test_timm_s_model_api_fine_tuning_checkpointing_and_refusals():
    model = _tiny(cnn="resnet50", cnn_multiplier=0.125)
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.cnn.num_classes == 5
    with torch.no_grad():
        assert [o.shape for o in model.forward_exits(x)] == [(2, 5)] * 4  # the ISC projections read 5 logits
    with pytest.raises(ValueError, match="no headless form"):
        model.reset_classifier(0)
    with pytest.raises(ValueError, match="no features_only form"):
        timm.create_model("dyn_perceiver_regnety_008", features_only=True, **TINY)


@pytest.mark.parametrize("family", [TINY, TINY_RESNET, TINY_MOBILENET], ids=["regnet", "resnet", "mobilenetv3"])
def test_grad_checkpointing_recomputes_the_stages_and_keeps_the_gradients(family):
    model = _tiny(**family).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    calls = []
    model.latent_stages[3].register_forward_pre_hook(lambda *_: calls.append(1))  # (recomputation stops early)

    def grads(checkpointing):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        calls.clear()
        sum(o.sum() for o in model.forward_exits(x)).backward()
        return len(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    stored_calls, stored = grads(False)
    recomputed_calls, recomputed = grads(True)
    assert (stored_calls, recomputed_calls) == (1, 2)  # the checkpointed stage runs again in the backward pass
    assert stored.keys() == recomputed.keys()
    for name in stored:
        torch.testing.assert_close(recomputed[name], stored[name], rtol=0, atol=1e-12, msg=name)


# --- the training loss (the reference's engine.py), restated by hand in float64 -----------------------

def _hand_loss(z, y, cnn, att, merge, kd, t):
    """sum of the weighted CEs and kd * sum_{early, att, cnn} T^2 KL(softmax(sg(merge)/T) || softmax(z/T)),
    from log-softmax sums written out."""
    def ce(logits):
        logp = logits - logits.logsumexp(1, keepdim=True)
        return -(logp.gather(1, y[:, None])).mean()

    def kl(student, teacher):
        p = torch.exp(teacher / t - (teacher / t).logsumexp(1, keepdim=True))
        log_q = student / t - (student / t).logsumexp(1, keepdim=True)
        return (p * (p.log() - log_q)).sum() / student.shape[0] * t * t

    early, attn, c, m = z
    loss = cnn * ce(c) + att * (ce(attn) + ce(early)) + merge * ce(m)
    return loss + kd * sum(kl(s, m.detach()) for s in (early, attn, c))


@pytest.mark.parametrize("options, weights", [
    ({}, (1.0, 0.5, 1.0, 0.5, 1.0)),  # the README's flags
    (dict(cnn_weight=0.25, att_weight=0.25, merge_weight=0.5, kd_weight=0.5, temperature=4.0),
     (0.25, 0.25, 0.5, 0.5, 4.0)),  # the code's argument defaults, with KD switched on
    (dict(kd_weight=0.0), (1.0, 0.5, 1.0, 0.0, 1.0)),
])
def test_the_loss_and_its_gradient_equal_a_hand_restatement(options, weights):
    from timm_exits.train.techniques import DynPerceiver as Loss
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    y = torch.randint(0, 7, (5,), generator=g)
    terms = Loss(**options).losses(logits, y)
    assert set(terms) == {"early", "att", "cnn", "merge"} | ({"kd"} if weights[3] else set())
    got = sum(terms.values())
    expected = _hand_loss(logits, y, *weights)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got, logits)
    expected_grads = torch.autograd.grad(expected, logits)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_teacher_is_the_merged_exit_and_gets_no_distillation_gradient():
    from timm_exits.train.techniques import DynPerceiver as Loss
    logits = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    kd = Loss().losses(logits, torch.tensor([0, 1, 2]))["kd"]
    grads = torch.autograd.grad(kd, logits, allow_unused=True)
    assert grads[3] is None and all(g.abs().sum() > 0 for g in grads[:3])


def test_a_training_step_through_the_plain_loop_and_the_refusal_of_other_models():
    from timm_exits.train import PlainTrainer, build_technique
    technique = build_technique(dict(type="DynPerceiver"))
    with pytest.raises(ValueError, match="four exits of a Dynamic Perceiver model"):
        technique.prepare(timm.create_model("msdnet_cifar_5exit", num_classes=10, num_channels=4, growth_rate=2))
    model = technique.prepare(_tiny().train())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.head_latent.weight.detach().clone()
    images, target = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    terms = PlainTrainer(model, technique, optimizer).step(images, target)
    assert set(terms) == {"early", "att", "cnn", "merge", "kd"}
    assert not torch.equal(model.head_latent.weight, before)


@pytest.mark.parametrize("name", sorted(load_catalogue("dyn_perceiver")["variants"]))
def test_every_variant_costs_what_the_catalogue_says_and_wraps_its_backbone(name):
    variant = load_catalogue("dyn_perceiver")["variants"][name]
    with torch.device("meta"):
        model = timm.create_model(name)
        plain = timm.create_model(variant["backbone"], num_classes=model.num_classes)
    costs = profile_exits(model)
    assert [c.params for c in costs] == variant["expected"]["params"]
    assert [c.macs for c in costs] == variant["expected"]["macs"]
    shapes = {k: v.shape for k, v in model.cnn.state_dict().items()}
    if name.startswith("dyn_perceiver_resnet50_0"):  # narrowed: the reference ResNet's own shapes, renamed
        multiplier = float("0." + name.split("_0")[-1])
        expected = ReferenceResNet(multiplier, model.num_classes).shapes()
        assert shapes == {_map_resnet_key(k): torch.Size(v) for k, v in expected.items()}
    elif name == "dyn_perceiver_mobilenetv3_large_075":  # torchvision's rounding: the reference's shapes, renamed
        expected = ReferenceMobileNetV3(0.75, model.num_classes).shapes()
        blocks = _mobilenetv3_blocks(model.cnn)
        renamed = dict(_map_mobilenetv3_key(k, blocks, torch.empty(v, device="meta")) for k, v in expected.items())
        assert shapes == {k: v.shape for k, v in renamed.items()}
    else:
        assert shapes == {k: v.shape for k, v in plain.state_dict().items()}


def test_the_technique_runs_under_mmengine_and_timm_s_task():
    from mmengine.optim import OptimWrapper
    from timm_exits.integrations.mmengine import MultiExitClassifier
    from timm_exits.task import MultiExitTask
    from timm_exits.train.techniques import DynPerceiver as Loss
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch.manual_seed(0)
    classifier = MultiExitClassifier("dyn_perceiver_regnety_008", model_kwargs=TINY, technique=dict(type="DynPerceiver"))
    reference = Loss().losses(copy.deepcopy(classifier.model).forward_exits(x), y)
    logged = classifier.train_step(dict(inputs=x, data_samples=y), OptimWrapper(torch.optim.SGD(classifier.parameters(), lr=0.1)))
    torch.testing.assert_close(logged["loss"], sum(reference.values()).detach(), rtol=1e-5, atol=1e-5)
    task = MultiExitTask(_tiny().train(), "DynPerceiver", kd_weight=0.25, verbose=False)
    result = task(x, y)
    assert set(result) == {"loss", "output"} | {f"loss_{k}" for k in ("early", "att", "cnn", "merge", "kd")}
    result["loss"].backward()
