"""RANet against the reference (RANet-pytorch, restated in ``ranet_reference.py``): exact per-exit outputs
with weights copied from a reference-layout state dict, per-exit parameters and op counts of the reference
op counter, the catalogue; the multi-exit contract; bad input."""
import pytest
import timm
import torch

import timm_exits  # noqa: F401
from timm_exits.catalogue import load_catalogue
from timm_exits.inference.executor import EarlyExitExecutor
from timm_exits.models import slice_state
from timm_exits.models.ranet import RANet, checkpoint_filter_fn, ranet_plan
from timm_exits.profile import profile_exits

from ranet_reference import ReferenceRANet

CATALOGUE = load_catalogue("ranet")["variants"]
CIFAR = [name for name in CATALOGUE if "cifar" in name]
# a narrow network with the ImageNet stem and heads and four resolution levels, cheap enough to run in float64
TINY_IMAGENET = ("--data ImageNet --nChannels 4 --growthRate 4 --step 2 --scale-list 1-2-3-4 --grFactor 4-2-1-1 "
                 "--bnFactor 4-2-1-1")
# a narrow network of the CIFAR script's shape (4 flows, the last two at the same resolution)
TINY_CIFAR = ("--data cifar10 --nChannels 8 --growthRate 4 --step 2 --scale-list 1-2-3-3 --grFactor 4-2-1-1 "
              "--bnFactor 4-2-1-1")
TINY_CIFAR_ARGS = dict(num_channels=8, growth_rate=4, step=2, scale_list="1-2-3-3", gr_factor="4-2-1-1",
                       bn_factor="4-2-1-1")
TINY_IMAGENET_ARGS = dict(num_channels=4, growth_rate=4, step=2, scale_list="1-2-3-4", gr_factor="4-2-1-1",
                          bn_factor="4-2-1-1", stem_type="imagenet", head_channels=None, num_classes=1000, img_size=224)


def _exact(model, command, size, seed=0):
    ref = ReferenceRANet(command)
    sd = ref.random_state_dict(seed)
    model = model.double().eval()
    model.load_state_dict(checkpoint_filter_fn(sd, model))
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected, _ = ref.run(sd, x)
    with torch.no_grad():
        got = model.forward_exits(x)
    assert len(got) == len(expected) == model.num_exits
    for e, g in zip(expected, got):
        assert e.abs().max() > 0.01  # the comparison sees real logits
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    return model, x, got


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_variants_give_the_reference_outputs_exactly(name):
    _exact(timm.create_model(name), CATALOGUE[name]["reference_command"], 32)


def test_imagenet_stem_and_heads_give_the_reference_outputs_exactly():
    _exact(RANet(**TINY_IMAGENET_ARGS), TINY_IMAGENET, 224)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "imagenet" in n else n for n in CATALOGUE])
def test_every_variant_matches_the_reference_counter_and_catalogue(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    ref = ReferenceRANet(CATALOGUE[name]["reference_command"])
    size = model.pretrained_cfg["input_size"]
    _, reference = ref.run(ref.meta_state_dict(), torch.empty(1, *size, device="meta"))
    ops = profile_exits(model, convention="msdnet")
    macs = profile_exits(model, convention="macs")
    expected = CATALOGUE[name]["expected"]
    assert [c.macs for c in ops] == [r["ops"] for r in reference] == expected["msdnet_ops"]
    assert [c.params for c in ops] == [r["params"] for r in reference] == expected["params"]
    assert [c.macs for c in macs] == expected["macs"]
    assert expected["params"][-1] == sum(p.numel() for p in model.parameters())  # every parameter is used
    assert model.num_exits == len(reference)


def test_flow_schedule_of_the_cifar_script():
    """train_cifar.sh: 4 flows of 2, 4, 6, 8 blocks; a flow's first blocks fuse the previous flow; the strided
    fusion blocks and transitions sit where the reference's rules put them (checked by hand)."""
    plan = ranet_plan(2, 2, 4, "even", 16, 6, (4, 2, 1, 1), (1, 2, 3, 3), 0.25, 0.5)
    assert [len(flow) for flow in plan] == [2, 4, 6, 8]
    assert [[p.index for p in flow if p.low_chs] for flow in plan] == [[], [0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert [[p.index + 1 for p in flow if p.down] for flow in plan] == [[], [2], [2, 4], [4, 6]]
    assert [[p.index + 1 for p in flow if p.transition] for flow in plan] == [[], [2], [2, 4], [2, 5]]
    # flow 0: 64 channels + 4 x 24 = 160; flow 1 block 1: 32 + 4 x 12 = 80, + floor(80 / 4) fused = 100
    assert plan[0][0].out_chs == 160 and plan[1][0].out_chs == 100
    assert plan[1][0].low_chs == (64, 88, 112, 136, 160)
    # flow 1 block 2 ends with a transition: floor(0.5 * (100 + 48 + floor(148 / 4)))
    assert plan[1][1].out_chs == (100 + 48 + 37) // 2


def test_lg_blocks_grow_by_step():
    plan = ranet_plan(2, 2, 2, "lg", 16, 6, (4, 2, 1), (1, 2, 3), 0.25, 0.5)
    assert [[p.layers for p in flow] for flow in plan] == [[2, 4], [2, 4, 6, 8], [2, 4, 6, 8, 10, 12]]


def test_stage_by_stage_on_sliced_states_and_the_executor():
    model, x, exits = _exact(RANet(**TINY_CIFAR_ARGS), TINY_CIFAR, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), exits[-1], rtol=0, atol=0)
        model.set_exit(3)
        torch.testing.assert_close(model(x), exits[3], rtol=0, atol=0)
        model.set_exit()
        keep = torch.tensor([True, False, True])
        state = model.forward_stem(x)
        for k in range(model.num_exits):
            state = model.forward_stage(state, k)
            if k == 2:
                state = slice_state(state, keep)
            logits = model.forward_exit(state, k)
            expected = exits[k][keep] if k >= 2 else exits[k]
            torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-10)
        # the last flow keeps no features for a next flow: the state is its tensor alone
        assert len(state) == 1
        conf = torch.stack([e.softmax(-1).max(-1).values for e in exits])
        thresholds = conf.median(1).values.tolist()  # some samples leave at each exit
        result = EarlyExitExecutor(model.float(), thresholds)(x.float())
    assert result.exits.unique().numel() > 1
    for i, k in enumerate(result.exits.tolist()):
        torch.testing.assert_close(result.logits[i].double(), exits[k][i], rtol=1e-4, atol=1e-4)


def test_reference_checkpoint_loads_the_timm_way(tmp_path):
    name = "ranet_cifar_6exit"
    ref = ReferenceRANet(CATALOGUE[name]["reference_command"])
    sd = ref.random_state_dict(3, dtype=torch.float32)
    path = tmp_path / "model_best.pth.tar"  # the reference saves a DataParallel model's state dict
    torch.save({"epoch": 299, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = model.forward_exits(x)
    expected, _ = ref.run(sd, x)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_reference_init_leaves_the_stem_at_torch_defaults():
    torch.manual_seed(0)
    model = timm.create_model("ranet_cifar_6exit")
    assert all(torch.all(h.fc.bias == 0) for h in model.exits)
    conv = model.stages[0].blocks[0].layers[0].normal.conv.conv  # 3x3, 24 outputs: He fan-out std sqrt(2 / 216)
    assert conv.weight.std().item() == pytest.approx((2 / 216) ** 0.5, rel=0.1)
    stem = model.stem.convs[0].conv  # 3 -> 16, 3x3: PyTorch's uniform init, std 1 / sqrt(3 * 27)
    assert stem.weight.std().item() == pytest.approx(1 / 81 ** 0.5, rel=0.2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(gr_factor="4-2-1", bn_factor="4-2"), "one entry per flow"),
    (dict(scale_list="1-2"), "scale_list needs one entry per flow"),
    (dict(scale_list="2-1-1"), "must not decrease"),
    (dict(step_mode="lin_grow"), "step_mode must be 'even' or 'lg'"),
    (dict(step=1), "at least 2 layers"),
    (dict(img_size=64), r"reduce their input to 1x1; img_size=\(64, 64\)"),
    (dict(gr_factor="4-x-1"), "gr_factor must look like"),
    (dict(growth_rate=2), "compress_factor must be >= 1"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RANet(**kwargs)


def test_bad_input_and_foreign_checkpoints_are_refused():
    model = timm.create_model("ranet_cifar_6exit").eval()
    with pytest.raises(ValueError, match=r"RANet expects images of shape \(batch, 3, 32, 32\)"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="not a key of a reference RANet checkpoint"):
        checkpoint_filter_fn({"FirstLayer.layers.0.net.0.weight": torch.zeros(1), "blocks.0.0.x": torch.zeros(1)}, model)
    other = ReferenceRANet(CATALOGUE["ranet_cifar_8exit"]["reference_command"]).random_state_dict()
    with pytest.raises(ValueError, match="same RANet configuration"):
        checkpoint_filter_fn(other, model)


def test_trains_through_the_timm_task_and_mmengine_as_the_reference_loss():
    """The reference trains with the plain sum of the exits' cross-entropies (main.py): CrossEntropy through
    timm's task and mmengine's model gives that loss, and one SGD step (lr 1) moves every parameter by
    minus its gradient (every parameter reached)."""
    import copy

    import torch.nn.functional as F
    from mmengine.optim import OptimWrapper

    from timm_exits.integrations.mmengine import MultiExitClassifier
    from timm_exits.task import MultiExitTask

    torch.manual_seed(0)
    model = RANet(**TINY_CIFAR_ARGS).double()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
    expected = sum(F.cross_entropy(z, y) for z in reference.forward_exits(x))
    expected.backward()
    result = MultiExitTask(model, "CrossEntropy", verbose=False)(x, y)
    torch.testing.assert_close(result["loss"], expected.detach())

    classifier = MultiExitClassifier(model="ranet_cifar_8exit", model_kwargs=TINY_CIFAR_ARGS,
                                     technique=dict(type="CrossEntropy"))
    classifier.model.load_state_dict(reference.state_dict())
    classifier = classifier.double()
    log = classifier.train_step(dict(inputs=x, data_samples=y), OptimWrapper(torch.optim.SGD(classifier.parameters(), lr=1.0)))
    torch.testing.assert_close(log["loss"], expected.detach())
    for (name, p), r in zip(classifier.model.named_parameters(), reference.parameters()):
        assert r.grad is not None, name
        torch.testing.assert_close(r.detach() - p.detach(), r.grad, rtol=1e-9, atol=1e-12)
