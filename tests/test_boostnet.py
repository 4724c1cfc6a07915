"""BoostNet (Yu et al., AAAI 2023): the loss and every parameter's gradient equal a re-statement of the
reference's training loop (E_{-1} = 0, E_i = r (f_i + E_{i-1}), loss sum_i CE(f_i + sg(E_{i-1}), y)) on a
tiny float64 MSDNet; the exits answer with the boosted ensemble (the recursion by hand); the accelerate
engine and a real mmengine Runner train it."""
import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

import timm
import timm_exits  # noqa: F401  (registers the models)
from timm_exits.config import load_config
from timm_exits.engine import TrainingPhase
from timm_exits.models.boostnet import BoostedExits
from timm_exits.train import BoostNet, PlainTrainer

from helpers import mm_runner, tiny_data, write_config, MM_TINY_MSDNET


def _msdnet():
    torch.manual_seed(0)
    return timm.create_model("msdnet_cifar_5exit", num_channels=4, growth_rate=2, num_classes=3).double()


def _batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("gradient_equilibrium", [False, True])
def test_loss_and_every_gradient_equal_the_reference_loop(gradient_equilibrium):
    x, y = _batch()
    reference = _msdnet()
    reference.gradient_equilibrium = gradient_equilibrium  # the reference trains msdnet_ge
    technique = BoostNet(gradient_equilibrium=gradient_equilibrium)
    model = technique.prepare(copy.deepcopy(reference))
    assert isinstance(model, BoostedExits) and model.model.gradient_equilibrium == gradient_equilibrium
    result = technique.train_step(PlainTrainer(model, technique, torch.optim.SGD(model.parameters(), lr=0.1)), x, y)
    result.loss.backward()  # what every trainer does with the step's loss
    # the reference: preds[0] = 0, preds[i+1] = (outs[i] + preds[i]) * r; CE(outs[i] + preds[i].detach())
    outs, prior, loss = reference.forward_exits(x), 0.0, 0.0
    for f in outs:
        loss = loss + F.cross_entropy(f + (prior.detach() if torch.is_tensor(prior) else prior), y)
        prior = (f + prior) * 0.5
    loss.backward()
    assert float(result.loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-12)
    assert float(sum(result.terms.values()).detach()) == pytest.approx(float(loss.detach()), rel=1e-12)
    ours = dict(model.model.named_parameters())
    for name, p in reference.named_parameters():
        assert ours[name].grad is not None and torch.allclose(ours[name].grad, p.grad, rtol=1e-9, atol=1e-12), name


def test_the_exits_answer_with_the_boosted_ensemble():
    model = BoostedExits(_msdnet(), 0.5).eval()
    x, _ = _batch()
    with torch.no_grad():
        f = model.model.forward_exits(x)
        outputs = model.forward_exits(x)
    p = torch.zeros_like(f[0])
    for i in range(5):  # the reference's inference form P_i = f_i + r P_{i-1}
        p = f[i] + 0.5 * p
        assert torch.allclose(outputs[i], p, atol=1e-12)


def test_a_reweight_per_exit_follows_the_training_form():
    """Exit i's prior is r_{i-1} times exit i-1's output (the reference's training loop), which differs
    from its inference loop's P_i = f_i + r_i P_{i-1} when r varies."""
    r = [0.5, 0.25, 2.0, 1.0, 3.0]
    model = BoostedExits(_msdnet(), r).eval()
    x, _ = _batch()
    with torch.no_grad():
        f = model.model.forward_exits(x)
        outputs = model.forward_exits(x)
    train_form, inference_form = [f[0]], [f[0]]
    for i in range(1, 5):
        train_form.append(f[i] + r[i - 1] * train_form[-1])
        inference_form.append(f[i] + r[i] * inference_form[-1])
    assert all(torch.allclose(o, t, atol=1e-12) for o, t in zip(outputs, train_form))
    assert not torch.allclose(outputs[1], inference_form[1])


def test_errors():
    with pytest.raises(ValueError, match=r"reweight must be a number or 5 numbers \(one per exit\), got \[0.5, 0.5\]"):
        BoostedExits(_msdnet(), [0.5, 0.5])
    with pytest.raises(ValueError, match=r"BoostNet has no option 'r'.*; its options: .*reweight"):
        BoostNet(r=0.5)
    with pytest.raises(ValueError, match=r"BoostNet option reweight must be a number >= 0.0, or a list of them, got -1"):
        BoostNet(reweight=-1)
    with pytest.raises(ValueError, match="BoostNet option .*exit_weights and regime keep their defaults"):
        BoostNet(exit_weights=[1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="BoostNet needs a multi-exit model"):
        BoostNet().prepare(timm.create_model("resnet18", num_classes=3))


def test_engine_trains_the_boosted_exits(tmp_path):
    data = tiny_data(tmp_path / "data")
    config = load_config(str(write_config(tmp_path / "c.py", data, extra="tracker = None\ntrain = dict(epochs=1)\n"
                                          "technique = dict(type='BoostNet', gradient_equilibrium=True)")),
                         output_dir=str(tmp_path / "out"))
    phase = TrainingPhase(Accelerator(cpu=True), config, str(tmp_path / "out"))
    assert isinstance(phase.technique, BoostNet) and isinstance(phase.model, BoostedExits)
    assert phase.model.model.gradient_equilibrium
    before = {k: v.clone() for k, v in phase.model.state_dict().items()}
    phase.start()
    phase.train_epoch(0)
    assert all(not torch.equal(before[k], v) for k, v in phase.model.state_dict().items() if k.endswith("fc.weight"))
    report = phase.finish()
    assert [e["exit"] for e in report["exits"]] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_mmengine_runner_trains_boostnet(tmp_path):
    runner = mm_runner(tmp_path, dict(MM_TINY_MSDNET, technique=dict(type="BoostNet", reweight=0.5)), iters=2)
    assert isinstance(runner.model.model, BoostedExits)
    before = {k: v.clone() for k, v in runner.model.model.state_dict().items() if k.endswith("fc.weight")}
    runner.train()
    after = runner.model.model.state_dict()
    assert len(before) == 5 and all(not torch.equal(before[k], after[k]) for k in before)
