"""Deep Feature Surgery (Gong et al., ECCV 2024): at each branch point the next stage reads
``[x_a | sg(x_b)]`` and the exit reads ``x``. Checked against an independent re-statement of the
reference's feature rerouting (split, detach, concatenate) on MSDNet, a CNN and a ViT with exits, in
float64, alone and with Gradient Equilibrium and branch deconfliction."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_exits  # noqa: F401  (registers the models)
from timm_exits import MSDNet, add_exits
from timm_exits.models.branch_gradients import detach_channels
from timm_exits.models.imta import IMTAModel
from timm_exits.train import BoostNet, CrossEntropy, L2W, OneForAll, PlainTrainer
from timm_exits.train.techniques import Options
from timm_exits.train.techniques.base import apply_switches

from helpers import randomise_norms


def reroute(x, ratio, dim):
    """The reference rule, re-stated: the first round(C * ratio) channels keep the next stage's gradient,
    the others are detached from it; the exit reads ``x`` itself. Returns (next stage's input, exit's input)."""
    c = x.shape[dim]
    first = round(c * ratio)
    kept, rest = torch.split(x, [first, c - first], dim)
    return torch.cat([kept, rest.detach()], dim), x


def ge(x, factor):
    """Gradient Equilibrium's scaling, re-stated: the value of x, the gradient times ``factor``."""
    return x * factor + x.detach() * (1 - factor)


SIZE = 16


def _msdnet():  # two scales, four exits
    torch.manual_seed(0)
    return randomise_norms(MSDNet(num_blocks=4, base=1, step=1, num_channels=4, growth_rate=2, gr_factor=[1, 2],
                                  bn_factor=[1, 2], stem_type="cifar", head_channels=8, num_classes=3,
                                  img_size=SIZE)).double()


def _resnet():
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", channels=(8, 16, 32, 64), stem_width=8, num_classes=3)
    return add_exits(randomise_norms(resnet)).double()


def _vit():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=4, embed_dim=24, depth=3, num_heads=2,
                            num_classes=3)
    return add_exits(randomise_norms(vit), exits=[0, 1]).double()


# (the model, the channel dimension the reference splits)
FAMILIES = {"msdnet": (_msdnet, 1), "resnet": (_resnet, 1), "vit": (_vit, -1)}


def _batch(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _split(state, ratio, dim):
    """(next stage's input, exit's input) of a state: an MSDNet list is rerouted at its coarsest scale."""
    if isinstance(state, list):
        plus, sub = reroute(state[-1], ratio, dim)
        return state[:-1] + [plus], state[:-1] + [sub]
    return reroute(state, ratio, dim)


def _scaled(state, factor):
    if isinstance(state, list):
        return state[:-1] + [ge(state[-1], factor)]
    return ge(state, factor)


def reference_exits(model, x, ratio, dim, equilibrium=False):
    """Every exit's logits, the branch points rerouted as the reference does (after GE's scaling, if on)."""
    n, outputs = model.num_exits, []
    state = model.forward_stem(x)
    for i in range(n):
        state = model.forward_stage(state, i)
        if i == n - 1:
            outputs.append(model.forward_exit(state, i))
            break
        head = state
        if equilibrium:
            head, state = _scaled(state, 1 / (n - i)), _scaled(state, (n - i - 1) / (n - i))
        state, _ = _split(state, ratio, dim)
        outputs.append(model.forward_exit(head, i))
    return outputs


def _grads(model, outputs, y):
    loss = sum(F.cross_entropy(o, y) for o in outputs)
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def test_detach_channels_by_hand():
    x = torch.arange(2 * 5 * 3, dtype=torch.float64).reshape(2, 5, 3).requires_grad_()
    w = torch.randn(2, 5, 3, dtype=torch.float64)
    y = detach_channels(x, 0.5, 1)  # round(2.5) = 2 (half to even, as the reference's round): 2 of 5 pass
    assert torch.equal(y, x)
    (y * w).sum().backward()
    expected = w.clone()
    expected[:, 2:] = 0
    assert torch.equal(x.grad, expected)
    x.grad = None
    (detach_channels(x, 0.5, -1) * w).sum().backward()  # last dim: round(1.5) = 2 of 3 pass
    assert torch.equal(x.grad[..., :2], w[..., :2]) and torch.equal(x.grad[..., 2], torch.zeros(2, 5, dtype=torch.float64))
    z = torch.ones(1, 7, requires_grad=True)
    (detach_channels(z, 0.5, 1) * 2).sum().backward()  # round(3.5) = 4 of 7
    assert z.grad.tolist() == [[2, 2, 2, 2, 0, 0, 0]]
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"feature_surgery .* must be in \(0, 1\)"):
            detach_channels(x, bad)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_parameter_gradients_equal_the_reference_rerouting(family, ratio):
    build, dim = FAMILIES[family]
    model, (x, y) = build(), _batch()
    plain_out = model.forward_exits(x)
    plain = _grads(model, plain_out, y)
    model.feature_surgery = ratio
    outputs = model.forward_exits(x)
    assert all(torch.equal(a, b) for a, b in zip(outputs, plain_out))  # values unchanged
    ours = _grads(model, outputs, y)
    reference = _grads(model, reference_exits(model, x, ratio, dim), y)
    for a, b in zip(ours, reference):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert any(a is not None and not torch.allclose(a, b) for a, b in zip(ours, plain))  # the switch acts
    heads = {id(p) for n, p in model.named_parameters() if n.startswith("exits.")}
    assert heads
    for p, a, b in zip(model.parameters(), ours, plain):
        if id(p) in heads:  # an exit head's gradient comes from its own loss: unchanged
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def _branch_point_grads(model, x, y, index, exits):
    """The gradient at the (coarsest-scale) state after stage ``index`` of the summed losses of ``exits``
    (a slice of the exits)."""
    captured = {}
    forward_stage = model.forward_stage

    def recording_stage(state, i):
        out = forward_stage(state, i)
        if i == index:
            leaf = out[-1] if isinstance(out, list) else out
            leaf.retain_grad()
            captured["state"] = leaf
        return out

    model.forward_stage = recording_stage
    try:
        outputs = model.forward_exits(x)
    finally:
        del model.forward_stage
    sum(F.cross_entropy(o, y) for o in outputs[exits]).backward()
    return captured["state"].grad


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_only_the_last_channels_lose_the_deeper_gradient(family):
    build, dim = FAMILIES[family]
    x, y = _batch()
    model = build()
    index = model.num_exits - 2  # the last branch point: no later one changes the deeper gradient
    later, own = slice(index + 1, None), slice(index, index + 1)
    plain_deeper = _branch_point_grads(model, x, y, index, later)
    plain_exit = _branch_point_grads(model, x, y, index, own)
    model.feature_surgery = 0.25
    deeper = _branch_point_grads(model, x, y, index, later)
    exit_only = _branch_point_grads(model, x, y, index, own)
    c = deeper.shape[dim]
    kept = round(c * 0.25)
    assert 0 < kept < c
    assert torch.equal(deeper.narrow(dim, kept, c - kept), torch.zeros_like(deeper.narrow(dim, kept, c - kept)))
    assert torch.allclose(deeper.narrow(dim, 0, kept), plain_deeper.narrow(dim, 0, kept), rtol=1e-10, atol=1e-14)
    assert plain_deeper.narrow(dim, kept, c - kept).abs().sum() > 0  # there was a gradient to stop
    assert torch.allclose(exit_only, plain_exit, rtol=1e-10, atol=1e-14)  # the exit reads every channel


def test_msdnet_splits_the_coarsest_scale_only():
    model = _msdnet()
    state = [torch.ones(2, 4, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    split = model.split_state_grad(state, 0.5)
    assert split[0] is state[0]
    sum(s.sum() for s in split).backward()
    assert torch.equal(state[0].grad, torch.ones(2, 4, 4, 4, dtype=torch.float64))
    assert state[1].grad[:, :2].eq(1).all() and state[1].grad[:, 2:].eq(0).all()


def test_swin_splits_the_last_dimension():
    sw = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=2, embed_dim=12, depths=(1, 1, 1, 1),
                           num_heads=(1, 1, 1, 1), num_classes=3)
    model = add_exits(sw)
    state = model.forward_stage(model.forward_stem(torch.randn(1, 3, 32, 32)), 0).detach().requires_grad_()
    assert state.shape[-1] == 12 and state.shape[1] != 12
    model.split_state_grad(state, 0.5).sum().backward()
    assert state.grad[..., :6].eq(1).all() and state.grad[..., 6:].eq(0).all()


@pytest.mark.parametrize("family", ["msdnet", "vit"])
def test_composes_with_gradient_equilibrium(family):
    build, dim = FAMILIES[family]
    model, (x, y) = build(), _batch()
    model.gradient_equilibrium = True
    ge_only = _grads(model, model.forward_exits(x), y)
    model.feature_surgery = 0.5
    ours = _grads(model, model.forward_exits(x), y)
    reference = _grads(model, reference_exits(model, x, 0.5, dim, equilibrium=True), y)
    for a, b in zip(ours, reference):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert any(a is not None and not torch.allclose(a, b) for a, b in zip(ours, ge_only))


def test_deconfliction_sees_the_cut_deeper_gradient():
    model, (x, y) = _resnet(), _batch(seed=4)  # a batch where the two gradients conflict
    index = model.num_exits - 2
    head = _branch_point_grads(model, x, y, index, slice(index, index + 1))
    uncut = _branch_point_grads(model, x, y, index, slice(index + 1, None))
    model.feature_surgery = 0.5
    deeper = _branch_point_grads(model, x, y, index, slice(index + 1, None))  # already cut to the kept channels
    model.gradient_deconfliction = "symmetric"
    combined = _branch_point_grads(model, x, y, index, slice(index, None))

    def pc(g, other):  # PCGrad's projection on a conflict, re-stated
        dot = torch.dot(g, other)
        return g - dot / other.pow(2).sum() * other if dot < 0 else g

    h, t, u = head.reshape(-1), deeper.reshape(-1), uncut.reshape(-1)
    assert torch.dot(h, t) < 0  # they conflict: the projection is exercised
    assert torch.allclose(combined.reshape(-1), pc(h, t) + pc(t, h), rtol=1e-10, atol=1e-14)
    kept = torch.zeros_like(uncut)
    kept[:, :round(uncut.shape[1] * 0.5)] = 1
    other_order = pc(h, u) + kept.reshape(-1) * pc(u, h)  # deconflicting the uncut gradient, then cutting
    assert not torch.allclose(combined.reshape(-1), other_order)


def test_the_option_every_technique_takes():
    for technique in (CrossEntropy, BoostNet):
        assert technique(feature_surgery=0.5).options.feature_surgery == 0.5
        assert technique().options.feature_surgery is None
    for bad in (0, 1, 1.0, -0.5, "0.5", True):
        with pytest.raises(ValueError, match=r"feature_surgery must be a number > 0.0 and < 1.0 or None"):
            CrossEntropy(feature_surgery=bad)
    with pytest.raises(ValueError, match="feature_surgery act where exits branch off a training backbone"):
        CrossEntropy(regime="heads_only", feature_surgery=0.5)
    with pytest.raises(ValueError, match="does not combine with .*feature_surgery"):
        L2W(feature_surgery=0.5)
    with pytest.raises(ValueError, match="feature_surgery act at a training network's branch points"):
        OneForAll(feature_surgery=0.5)
    model = CrossEntropy(feature_surgery=0.3).prepare(_msdnet())
    assert model.feature_surgery == 0.3 and not model.gradient_equilibrium
    with pytest.raises(ValueError, match="Deep Feature Surgery act at the branch points .* IMTAModel has none"):
        apply_switches(IMTAModel(_msdnet()), Options(feature_surgery=0.5))
    with pytest.raises(ValueError, match="has none that train"):
        apply_switches(timm.create_model("resnet18_adn"), Options(feature_surgery=0.5))


def test_an_exit_history_wrapper_passes_the_switch_to_the_wrapped_model():
    x, y = _batch()
    inner = _msdnet()
    technique = BoostNet(feature_surgery=0.5)
    model = technique.prepare(copy.deepcopy(inner))
    assert model.feature_surgery == 0.5 and model.model.feature_surgery == 0.5
    trainer = PlainTrainer(model, technique, torch.optim.SGD(model.parameters(), lr=0.1))
    technique.train_step(trainer, x, y).loss.backward()
    inner.feature_surgery = 0.5
    plain_technique = BoostNet()
    wrapped = plain_technique.prepare(inner)
    plain_technique.train_step(PlainTrainer(wrapped, plain_technique, torch.optim.SGD(wrapped.parameters(), lr=0.1)),
                               x, y).loss.backward()
    for a, b in zip(model.parameters(), wrapped.parameters()):
        assert (a.grad is None and b.grad is None) or torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-13)


def test_the_fused_msdnet_computes_the_same_outputs_with_the_switch_on():
    from timm.utils import reparameterize_model
    model = _msdnet().float().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model.forward_exits(x)
        fused = reparameterize_model(model)
        fused.feature_surgery = 0.5
        outputs = fused.forward_exits(x)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(outputs, expected))


def test_every_trainer_trains_with_the_switch():
    """mmengine's classifier, the plain loop and the timm task: one SGD step (lr 1) moves every parameter by
    minus the gradient of the reference rerouting's summed cross-entropies."""
    from mmengine.optim import OptimWrapper
    from timm_exits.integrations.mmengine import MultiExitClassifier
    from timm_exits.task import MultiExitTask

    torch.manual_seed(0)
    classifier = MultiExitClassifier(model="msdnet_cifar_5exit", model_kwargs=dict(num_classes=3, num_channels=4,
                                     growth_rate=2), technique=dict(type="CrossEntropy", feature_surgery=0.5)).double()
    assert classifier.model.feature_surgery == 0.5
    model = copy.deepcopy(classifier.model)
    model.feature_surgery = None
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g)

    reference = copy.deepcopy(model)
    sum(F.cross_entropy(z, y) for z in reference_exits(reference, x, 0.5, 1)).backward()
    expected = [r.grad if r.grad is not None else torch.zeros_like(r) for r in reference.parameters()]

    def moved_by_the_reference_gradient(trained, before):
        for p0, p1, e in zip(before, trained.parameters(), expected):
            torch.testing.assert_close(p0 - p1.detach(), e, rtol=1e-9, atol=1e-12)

    before = [p.detach().clone() for p in classifier.model.parameters()]
    classifier.train_step(dict(inputs=x, data_samples=y), OptimWrapper(torch.optim.SGD(classifier.parameters(), lr=1.0)))
    moved_by_the_reference_gradient(classifier.model, before)

    technique = CrossEntropy(feature_surgery=0.5)
    plain = technique.prepare(copy.deepcopy(model))
    before = [p.detach().clone() for p in plain.parameters()]
    PlainTrainer(plain, technique, torch.optim.SGD(plain.parameters(), lr=1.0)).step(x, y)
    moved_by_the_reference_gradient(plain, before)

    task = MultiExitTask(copy.deepcopy(model), "CrossEntropy", feature_surgery=0.5, verbose=False)
    assert task.model.feature_surgery == 0.5
    task(x, y)["loss"].backward()
    for p, e in zip(task.model.parameters(), expected):
        torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p), e, rtol=1e-9, atol=1e-12)


def test_the_recipe_and_the_study_config():
    from pathlib import Path
    from mmengine.config import Config
    from timm_exits.config import load_config, phase_configs

    root = Path(__file__).resolve().parents[1]
    base = Config.fromfile(str(root / "recipes" / "_base_" / "techniques" / "dfs.py")).to_dict()
    assert base == {"technique": {"type": "CrossEntropy", "feature_surgery": 0.5}}
    runs = phase_configs(load_config(str(root / "benchmarks" / "cifar10_study" / "dfs.py"), data_dir="/data/cifar10"))
    technique = runs[-1][1]["technique"]
    assert (len(runs), technique["type"], technique["feature_surgery"], technique["gradient_equilibrium"]) == \
        (1, "CrossEntropy", 0.5, False)


@pytest.mark.slow
def test_the_accelerate_engine_trains_the_recipe(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    from helpers import tiny_data, write_config

    root = Path(__file__).resolve().parents[1]
    base = root / "recipes" / "_base_" / "techniques" / "dfs.py"
    config = write_config(tmp_path / "dfs.py", tiny_data(tmp_path / "data"),
                          extra=f"tracker = None\ntrain = dict(epochs=1)\n_base_ = [{str(base)!r}]")
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
                             "--mixed_precision", "no", "--dynamo_backend", "no", str(root / "recipes" / "train.py"),
                             str(config), "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=root, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    technique = json.loads((tmp_path / "out" / "results.json").read_text())["phases"][0]["technique"]
    assert (technique["type"], technique["feature_surgery"]) == ("CrossEntropy", 0.5)
