"""Training techniques as plain PyTorch: Gradient Equilibrium, multi-exit CE, One-for-all KD and the
IMTA phase-II model (ISC). Gradients are compared with autograd on reference computations."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_exits  # noqa: F401
from timm_exits import MSDNet, add_exits
from timm_exits.inference import EarlyExitExecutor, assign_exits, exit_scores, fit_thresholds, geometric_fractions
from timm_exits.profile import profile_exits
from timm_exits.models.imta import IMTAModel
from timm_exits.train import multi_exit_cross_entropy, one_for_all_distillation

from helpers import randomise_norms


def _single_scale_msdnet():
    torch.manual_seed(0)
    return MSDNet(num_blocks=3, base=1, step=1, num_channels=4, growth_rate=2, gr_factor=[1], bn_factor=[1],
                  stem_type="cifar", head_channels=8, num_classes=3, img_size=8).double().eval()


def _resnet_with_exits():
    torch.manual_seed(0)
    return add_exits(timm.create_model("resnet18", num_classes=3)).double().eval()


def _stage_params(model, i):
    if isinstance(model, MSDNet):
        return list(model.stages[i].parameters()) + (list(model.stem.parameters()) if i == 0 else [])
    units = [model._units[u] for u in model._stage_units[i]]
    return [p for u in units for p in u.parameters()]


@pytest.mark.parametrize("training_tuple", [False, True], ids=["forward_exits", "training_mode_model_call"])
@pytest.mark.parametrize("make", [_single_scale_msdnet, _resnet_with_exits])
def test_gradient_equilibrium_averages_the_gradients_of_dependent_exits(make, training_tuple):
    """Over every exit (``forward_exits``), and over exits 1..k of a training-mode ``model(x)`` (timm's
    training loop) with exit k active: there the k exits computed are the ones averaged."""
    model = make()
    x, y = torch.randn(4, 3, 8 if isinstance(model, MSDNet) else 32, 8 if isinstance(model, MSDNet) else 32,
                       dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    if training_tuple:
        model.train().set_exit(model.num_exits - 2)
    n = model.num_exits - 1 if training_tuple else model.num_exits
    params = list(model.parameters())
    per_exit = []  # reference: gradient of each exit's loss alone, plain model
    for j in range(n):
        loss = F.cross_entropy(model.forward_exits(x)[j], y)
        per_exit.append(torch.autograd.grad(loss, params, allow_unused=True))
    model.gradient_equilibrium = True
    outs = model(x) if training_tuple else model.forward_exits(x)
    assert len(outs) == n
    with torch.no_grad():
        model.gradient_equilibrium = False
        assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(outs, model.forward_exits(x)))  # forward unchanged
    ge = torch.autograd.grad(sum(F.cross_entropy(o, y) for o in outs), params, allow_unused=True)
    index = {id(p): k for k, p in enumerate(params)}
    for stage in range(n):
        for p in _stage_params(model, stage):
            k = index[id(p)]
            expected = sum(per_exit[j][k] for j in range(stage, n) if per_exit[j][k] is not None) / (n - stage)
            assert torch.allclose(ge[k], expected, atol=1e-12), (stage, p.shape)
    for j, head in enumerate(list(model.exits)[:n]):  # the heads of the exits computed
        for p in head.parameters():
            assert torch.allclose(ge[index[id(p)]], per_exit[j][index[id(p)]], atol=1e-12)


def test_msdnet_gradient_equilibrium_touches_only_the_coarsest_scale():
    model = MSDNet(num_blocks=2, base=1, step=1, num_channels=4, growth_rate=2, gr_factor="1-2", bn_factor="1-2",
                   stem_type="cifar", head_channels=8, num_classes=3, img_size=16)
    state = [torch.ones(1, 2, requires_grad=True), torch.ones(1, 2, requires_grad=True)]
    scaled = model.scale_state_grad(state, 0.25)
    (scaled[0].sum() + scaled[1].sum()).backward()
    assert state[0].grad.tolist() == [[1.0, 1.0]] and state[1].grad.tolist() == [[0.25, 0.25]]


def test_multi_exit_cross_entropy_with_weights_and_soft_targets():
    torch.manual_seed(0)
    logits = [torch.randn(5, 4) for _ in range(3)]
    hard = torch.tensor([0, 1, 2, 3, 0])
    soft = torch.softmax(torch.randn(5, 4), -1)
    manual = sum(w * -(soft * torch.log_softmax(z, -1)).sum(-1).mean() for w, z in zip([0.5, 1, 2], logits))
    assert torch.allclose(multi_exit_cross_entropy(logits, soft, [0.5, 1, 2]), manual)
    smoothed = sum(F.cross_entropy(z, hard, label_smoothing=0.1) for z in logits)
    assert torch.allclose(multi_exit_cross_entropy(logits, hard, label_smoothing=0.1), smoothed)
    with pytest.raises(ValueError, match="2 exit weights for 3 exits"):
        multi_exit_cross_entropy(logits, hard, [1, 1])


def test_one_for_all_distillation_matches_the_reference_formula():
    torch.manual_seed(0)
    z = [torch.randn(6, 10, requires_grad=True) for _ in range(4)]
    t, y, temp, gamma = torch.randn(6, 10), torch.randint(0, 10, (6,)), 3.0, 0.9
    reference = F.cross_entropy(z[-1], y)
    for zi in z[:-1]:  # nn.KLDivLoss() default reduction='mean' divides by batch x classes
        kl = torch.nn.KLDivLoss()(F.log_softmax(zi / temp, 1), F.softmax(t / temp, 1))
        reference = reference + (1 - gamma) * F.cross_entropy(zi, y) + gamma * temp ** 2 * kl
    ours = one_for_all_distillation(z, t, y, temp, gamma, reduction="mean")
    assert torch.allclose(ours, reference)
    assert torch.allclose(torch.stack(torch.autograd.grad(ours, z)), torch.stack(torch.autograd.grad(reference, z)))
    # 'batchmean' is the per-sample KL: exactly K = 10 times the reference's KL terms
    ce = F.cross_entropy(z[-1], y) + sum((1 - gamma) * F.cross_entropy(zi, y) for zi in z[:-1])
    batchmean = one_for_all_distillation(z, t, y, temp, gamma)
    assert torch.allclose(batchmean - ce, 10 * (ours - ce), rtol=1e-5)
    with pytest.raises(ValueError, match="'batchmean' or 'mean'"):
        one_for_all_distillation(z, t, y, reduction="sum")


def _phase_two(isc="reference", freeze_bn_stats=False):
    torch.manual_seed(0)
    backbone = MSDNet(num_blocks=3, base=1, step=1, step_mode="lin_grow", num_channels=8, growth_rate=4,
                      gr_factor="1-2-4", bn_factor="1-2-4", stem_type="cifar", head_channels=16, num_classes=5,
                      img_size=32)
    return IMTAModel(backbone, isc=isc, freeze_bn_stats=freeze_bn_stats)


def test_isc_heads_widths_and_gradient_flow():
    model = _phase_two().train()
    assert [h.in_features for h in model.heads] == [16, 32, 32]
    assert all(not p.requires_grad for p in model.backbone.parameters())
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, teacher = model.forward_train(x)
    F.cross_entropy(logits[2], y).backward()
    assert model.heads[0].weight.grad.abs().sum() > 0  # no detach: exit 3's loss trains head 1
    assert all(p.grad is None for p in model.backbone.parameters())
    detached = _phase_two(isc="detach").train()
    logits, _ = detached.forward_train(x)
    F.cross_entropy(logits[2], y).backward()
    assert detached.heads[0].weight.grad is None and detached.heads[2].weight.grad.abs().sum() > 0
    assert teacher.shape == (4, 5) and not teacher.requires_grad


@pytest.mark.parametrize("freeze", [False, True])
def test_frozen_backbone_batch_norm_statistics(freeze):
    model = _phase_two(freeze_bn_stats=freeze).train()
    bn = model.backbone.stem.convs[0].bn
    before = bn.running_mean.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    logits, teacher = model.forward_train(torch.randn(8, 3, 32, 32))
    one_for_all_distillation(logits, teacher, torch.randint(0, 5, (8,))).backward()
    optimizer.step()
    moved = not torch.equal(before, bn.running_mean)
    assert moved is not freeze  # the reference keeps train-mode BN: its statistics move


def test_phase_two_step_runs_every_frozen_batch_norm_once():
    model = _phase_two().train()
    frozen = copy.deepcopy(model.backbone)  # the phase-I network, run once as the reference does
    x = torch.randn(8, 3, 32, 32)
    _, teacher = model.forward_train(x)
    with torch.no_grad():
        expected = frozen.train().forward_exits(x)[-1]
    assert torch.allclose(teacher, expected, atol=1e-5)  # the final exit's logits, batch statistics
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 1 for m in norms)  # one statistics update per step
    for m, r in zip(norms, [m for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d)]):
        assert torch.allclose(m.running_mean, r.running_mean, atol=1e-6) and torch.allclose(m.running_var, r.running_var, atol=1e-6)


def test_phase_two_is_a_multi_exit_model_for_the_executor_and_profiler():
    model = _phase_two().eval()
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        logits = torch.stack(model.forward_exits(x))
        train_logits, _ = model.forward_train(x)
    assert torch.allclose(logits, torch.stack(train_logits))
    scores = exit_scores(logits.softmax(-1))
    thresholds = fit_thresholds(scores, geometric_fractions(0.8, 3))
    result = EarlyExitExecutor(model, thresholds.tolist())(x)
    simulated = assign_exits(scores, thresholds)
    assert len(simulated.unique()) > 1 and torch.equal(result.exits, simulated)
    assert torch.allclose(result.logits, logits[simulated, torch.arange(32)], atol=1e-5)
    costs = profile_exits(model, input_size=(3, 32, 32))
    assert all(a.macs < b.macs for a, b in zip(costs, costs[1:]))


def test_phase_two_costs_match_the_reference_for_cifar100():
    with torch.device("meta"):
        backbone = timm.create_model("msdnet_cifar_7exit")
        model = IMTAModel(backbone)
    new = profile_exits(model, convention="msdnet")
    old = profile_exits(backbone, convention="msdnet")
    old_fc = 128 * 100 + 100  # the frozen exits' linear layers are not run in phase II
    added = [(n.macs - o.macs + old_fc * n.exit) / 1e6 for n, o in zip(new, old)]
    # M ops the new heads and ISC layers add per exit (MSDNet op counter, 100 classes)
    assert [round(a, 3) for a in added] == [0.013, 0.052, 0.090, 0.129, 0.168, 0.207, 0.245]
    heads = sum(p.numel() for p in model.heads.parameters())
    isc = sum(p.numel() for p in model.isc.parameters())
    assert (round(heads / 1e6, 4), round(isc / 1e6, 4)) == (0.1671, 0.0791)


def test_adn_step_equals_one_backward_on_the_summed_loss():
    from timm_exits.train import adn_distillation, adn_step


    def fresh():  # non-trivial norms: a fresh ResNet's zero-initialised last BNs make base = super
        torch.manual_seed(0)
        return randomise_norms(timm.create_model("resnet18_adn", num_classes=6)).train()

    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    model = fresh()
    losses = adn_step(model, x, y, alpha=0.5, temperature=2.0, topk=4)
    assert model.depth_config == "FFFF" and set(losses) == {"super", "base"}
    reference = fresh()
    reference.set_multi_exit_training(False)  # one pass at the selected depth, each in training mode
    with reference.depth("FFFF"):
        teacher = reference(x)
    with reference.depth("TTTT"):
        student = reference(x)
    (0.5 * F.cross_entropy(teacher, y) + 0.5 * adn_distillation(student, teacher, 2.0, topk=4)).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    # skippable blocks learn from the super-net only, the twin norms from the base-net only
    assert model.layer1[1].block.bn2.weight.grad.abs().sum() > 0  # (zero-initialised last BN of the block)
    assert model.layer1[0].bn1.skip.weight.grad.abs().sum() > 0 and model.layer1[0].bn1.main.weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="no skippable sub-paths"):
        adn_step(timm.create_model("resnet18"), x, y)


def test_adn_distillation_top_k_and_exits():
    from timm_exits.train import adn_distillation, adn_step
    torch.manual_seed(0)
    s, t = torch.randn(3, 10), torch.randn(3, 10)
    idx = t.topk(4, -1).indices
    manual = F.kl_div(F.log_softmax(s.gather(1, idx), -1), F.softmax(t.gather(1, idx), -1), reduction="batchmean")
    assert torch.allclose(adn_distillation(s, t, 1.0, topk=4), manual)
    model = add_exits(randomise_norms(timm.create_model("resnet18_adn", num_classes=6))).train()
    losses = adn_step(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(losses["base"]) and losses["base"] > 0
    assert model.exits[0].fc.weight.grad.abs().sum() > 0


def test_switches_are_refused_where_no_branch_point_trains():
    from timm_exits.integrations.mmengine import GradientDeconflictionHook
    from timm_exits.train import PCGrad
    from timm_exits.train.techniques import Options
    from timm_exits.train.techniques.base import apply_switches

    model = _single_scale_msdnet()
    apply_switches(model, Options(gradient_equilibrium=True, deconfliction="protect_deeper"))
    assert model.gradient_equilibrium and model.gradient_deconfliction == "protect_deeper"
    pcgrad = PCGrad(gradient_equilibrium=True).prepare(_single_scale_msdnet())
    assert pcgrad.gradient_equilibrium and pcgrad.gradient_deconfliction is None  # PCGrad acts on gradients only
    with pytest.raises(ValueError, match="has none that train"):  # IMTA phase II trains its new heads only
        apply_switches(_phase_two(), Options(gradient_equilibrium=True))
    with pytest.raises(ValueError, match="has none that train"):
        apply_switches(timm.create_model("resnet18_adn"), Options(deconfliction="symmetric"))
    with pytest.raises(ValueError, match="deconfliction must be None, 'symmetric' or 'protect_deeper', got 'sym'"):
        Options(deconfliction="sym")
    with pytest.raises(ValueError, match=r"deconfliction='pcgrad' is a technique of its own"):
        Options(deconfliction="pcgrad")
    with pytest.raises(ValueError, match=r"parameter-level PCGrad is technique=dict\(type='PCGrad'\)"):
        GradientDeconflictionHook("pcgrad")
