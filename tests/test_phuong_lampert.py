"""Phuong & Lampert's distillation (ICCV 2019): the loss on hand-computed tiny cases and its gradient in
closed form (float64); the temperature's trajectory over a fixed logit sequence equals a re-statement of
the reference rule (after each batch: if mean_b max softmax(z_N / T) > 0.5, T *= 1.05); with gradient
accumulation the rule runs once per optimizer update on the update's samples, in every trainer; T is
saved and resumed by every trainer's checkpoint; two gloo processes that see different batches keep
the same T."""
import copy
import io
import math

import pytest
import timm
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from accelerate import Accelerator
from mmengine.optim import OptimWrapper

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.config import load_config
from timm_exits.engine import TrainingPhase
from timm_exits.integrations.mmengine import MultiExitClassifier
from timm_exits.task import MultiExitTask
from timm_exits.train import PhuongLampert, PlainTrainer, build_technique
from timm_exits.train.phuong_lampert import AdaptiveTemperature, distillation_based_loss

from helpers import TINY_MSDNET, tiny_data, write_config

TINY = dict(num_classes=3, num_channels=4, growth_rate=2)
ALWAYS = 0.3  # with 3 classes every max-probability is >= 1/3: T grows after every update


def _msdnet(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return timm.create_model("msdnet_cifar_5exit", **TINY).to(dtype).train()


def _batches(n: int, seed: int = 0, size: int = 4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def _confident(p: float, classes: int = 10) -> torch.Tensor:
    """Logits of one sample whose softmax at T = 1 is p for class 0 and (1 - p) / 9 for the 9 others."""
    return torch.tensor([[math.log(p)] + [math.log((1 - p) / (classes - 1))] * (classes - 1)], dtype=torch.float64)


# --- the loss ------------------------------------------------------------------------------------

def test_loss_on_a_hand_computed_case():
    # exit 1: softmax (1/4, 3/4); exit 2 (the teacher): (1/2, 1/2) at every T; the label is class 1
    z1 = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    z2 = torch.zeros(1, 2, dtype=torch.float64)
    y = torch.tensor([1])
    ce, kd = distillation_based_loss([z1, z2], y, temperature=1.0)  # C = 0.5, g = 10 / 2
    assert ce.item() == pytest.approx(5 * 0.5 * (math.log(4 / 3) + math.log(2)), rel=1e-12)
    assert kd.item() == pytest.approx(5 * 0.5 * 0.5 * (math.log(4) + math.log(4 / 3)), rel=1e-12)
    # T = 2: exit 1 at T is (1, sqrt 3) / (1 + sqrt 3); the distillation term is scaled by T^2
    p = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]
    ce, kd = distillation_based_loss([z1, z2], y, temperature=2.0, distillation_weight=0.2, gain=1.5)
    assert ce.item() == pytest.approx(1.5 * 0.8 * (math.log(4 / 3) + math.log(2)), rel=1e-12)
    assert kd.item() == pytest.approx(1.5 * 0.2 * 4 * -0.5 * (math.log(p[0]) + math.log(p[1])), rel=1e-12)


def test_the_gain_is_ten_over_the_number_of_exits():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(11)]
    y = torch.randint(0, 5, (4,), generator=g)
    default = sum(distillation_based_loss(z, y, 1.3))
    assert default.item() == pytest.approx(sum(distillation_based_loss(z, y, 1.3, gain=10 / 11)).item(), rel=1e-14)
    assert default.item() == pytest.approx(10 / 11 * sum(distillation_based_loss(z, y, 1.3, gain=1.0)).item(), rel=1e-14)


@pytest.mark.parametrize("temperature, weight", [(1.0, 0.5), (2.5, 0.3), (4.0, 1.0)])
def test_gradients_are_the_closed_form_with_the_teacher_detached(temperature, weight):
    """d/dz_i = g/B [(1 - C)(softmax(z_i) - y) + C T (softmax(z_i / T) - softmax(z_N / T))] for i < N;
    d/dz_N = g/B (1 - C)(softmax(z_N) - y): the teacher learns from the labels only."""
    g = torch.Generator().manual_seed(1)
    n, b, k = 4, 6, 5
    z = [torch.randn(b, k, generator=g, dtype=torch.float64).mul(3).requires_grad_() for _ in range(n)]
    y = torch.randint(0, k, (b,), generator=g)
    loss = sum(distillation_based_loss(z, y, temperature, weight))
    grads = torch.autograd.grad(loss, z)
    gain, onehot = 10 / n, F.one_hot(y, k).double()
    teacher = (z[-1] / temperature).softmax(-1).detach()
    for i, (zi, grad) in enumerate(zip(z, grads)):
        expected = (1 - weight) * (zi.softmax(-1) - onehot)
        if i < n - 1:
            expected = expected + weight * temperature * ((zi / temperature).softmax(-1) - teacher)
        torch.testing.assert_close(grad, gain / b * expected.detach(), rtol=1e-12, atol=1e-14)


def test_soft_targets_and_too_few_exits():
    g = torch.Generator().manual_seed(2)
    z = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    y = torch.randint(0, 4, (3,), generator=g)
    hard = distillation_based_loss(z, y, 2.0)
    soft = distillation_based_loss(z, F.one_hot(y, 4).double(), 2.0)  # mixup's form of the same targets
    assert all(torch.allclose(a, b, rtol=1e-14) for a, b in zip(hard, soft))
    with pytest.raises(ValueError, match="needs at least 2 exits, got 1"):
        distillation_based_loss(z[:1], y, 1.0)


# --- the temperature -----------------------------------------------------------------------------

def _restated(batches, temperature=1.0, target=0.5, growth=1.05):
    """The reference rule: after each batch, T *= growth if the batch's mean max softmax(z / T) > target."""
    trajectory = []
    for z in batches:
        p = torch.exp(z / temperature)
        p = p / p.sum(1, keepdim=True)
        if p.max(1).values.mean().item() > target:
            temperature *= growth
        trajectory.append(temperature)
    return trajectory


def _logit_sequence(n=60, seed=3):
    g = torch.Generator().manual_seed(seed)  # more and more confident, with noise: T grows on some batches only
    return [torch.randn(16, 10, generator=g, dtype=torch.float64) * (0.5 + s / 8 + torch.rand((), generator=g).item())
            for s in range(n)]


def test_the_temperature_trajectory_is_the_reference_rule():
    batches = _logit_sequence()
    rule = AdaptiveTemperature()
    trajectory = []
    for z in batches:
        rule.observe(z)
        rule.step()
        trajectory.append(rule.value)
    expected = _restated(batches)
    assert trajectory == pytest.approx(expected, rel=1e-12)
    grew = [b > a for a, b in zip([1.0] + expected, expected)]
    assert 5 < sum(grew) < len(grew) - 5  # the sequence tests both branches
    assert all(b >= a for a, b in zip([1.0] + trajectory, trajectory))  # T only grows


def test_the_technique_uses_the_temperature_of_its_update_and_never_shrinks_it():
    technique = PhuongLampert(max_prob=0.4)
    model = technique.prepare(_msdnet(dtype=torch.float64))
    loop = PlainTrainer(model, technique, torch.optim.SGD(model.parameters(), lr=0.05))
    temperatures = [1.0]
    for x, y in _batches(4, dtype=torch.float64):
        with torch.no_grad():
            exits = model.forward_exits(x)  # the same forward (no dropout): what the step will see
        expected = sum(distillation_based_loss(exits, y, temperatures[-1]))
        terms = loop.step(x, y)
        assert sum(terms.values()) == pytest.approx(expected.item(), rel=1e-10)
        mean_max = (exits[-1] / temperatures[-1]).softmax(-1).amax(-1).mean().item()
        temperatures.append(temperatures[-1] * (1.05 if mean_max > 0.4 else 1.0))
        assert technique.temperature.value == pytest.approx(temperatures[-1], rel=1e-12)
    assert len(set(temperatures)) > 1


def test_constant_temperature_never_moves():
    technique = PhuongLampert(adaptive=False, temperature=4.0, max_prob=ALWAYS)
    model = technique.prepare(_msdnet())
    loop = PlainTrainer(model, technique, torch.optim.SGD(model.parameters(), lr=0.05))
    for x, y in _batches(2):
        loop.step(x, y)
    assert technique.temperature.value == 4.0


def test_an_update_s_mean_runs_over_all_its_samples():
    # one update of two batches: 1 sample at max-probability 0.9, then 3 at 0.3. Over the update's
    # samples the mean is 0.45 (no growth); per batch the first would grow T, and so would the mean
    # of the two batch means (0.6)
    rule = AdaptiveTemperature()
    rule.observe(_confident(0.9))
    rule.observe(torch.cat([_confident(0.3)] * 3))
    assert not rule.step() and rule.value == 1.0
    rule.observe(_confident(0.9))
    rule.observe(torch.cat([_confident(0.3)] * 2))  # mean 0.5: not above the target
    assert not rule.step()
    rule.observe(torch.cat([_confident(0.3), _confident(0.75)]))  # mean 0.525
    assert rule.step() and rule.value == 1.05
    assert not rule.step() and rule.value == 1.05  # an update without batches changes nothing


@pytest.mark.parametrize("bad, message", [
    (dict(growth=1.0), "growth must be a number > 1.0, got 1.0"),
    (dict(max_prob=1.0), "max_prob must be a number > 0.0 and < 1.0, got 1.0"),
    (dict(temperature=0), "temperature must be a number > 0.0, got 0"),
    (dict(distillation_weight=1.5), r"distillation_weight must be a number >= 0.0 and <= 1.0, got 1.5"),
    (dict(gain=-1.0), "gain must be a number > 0.0 or None, got -1.0"),
    (dict(adaptive="yes"), "adaptive must be False or True, got 'yes'"),
])
def test_option_errors(bad, message):
    with pytest.raises(ValueError, match=f"^PhuongLampert option {message}"):
        build_technique(dict(type="PhuongLampert", **bad))


# --- gradient accumulation, checkpoints: every trainer ---------------------------------------------

BATCHES = 8  # with 2 batches per update: 4 updates, T = 1.05 ** 4


def _engine_phase(tmp_path, resume=False, accumulation=2):
    data = tmp_path / "data" if resume else tiny_data(tmp_path / "data")  # 32 training images: 4 batches of 8 per epoch
    extra = (f"tracker = None\ntrain = dict(epochs=2, grad_accum_steps={accumulation})\n"
             f"technique = dict(type='PhuongLampert', max_prob={ALWAYS})")
    config = load_config(str(write_config(tmp_path / "c.py", data, TINY_MSDNET, extra)), output_dir=str(tmp_path / "o"))
    return TrainingPhase(Accelerator(cpu=True, gradient_accumulation_steps=accumulation), config, str(tmp_path / "o"),
                         resume=resume)


def test_engine_grows_t_once_per_update_and_resumes_it(tmp_path):
    phase = _engine_phase(tmp_path)
    phase.start()
    phase.train_epoch(0)  # 4 batches, 2 updates; the epoch's checkpoint keeps T
    assert phase.technique.temperature.value == pytest.approx(1.05 ** 2)
    resumed = _engine_phase(tmp_path, resume=True)
    assert resumed.technique.temperature.value == 1.0
    resumed.start(resume=True)
    assert resumed.technique.temperature.value == pytest.approx(1.05 ** 2)
    for epoch in resumed.remaining_epochs():
        resumed.train_epoch(epoch)
    assert resumed.technique.temperature.value == pytest.approx(1.05 ** 4)


def test_mmengine_grows_t_once_per_update_and_its_extra_state_keeps_t():
    model = MultiExitClassifier("msdnet_cifar_5exit", TINY, technique=dict(type="PhuongLampert", max_prob=ALWAYS))
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01), accumulative_counts=2)
    for x, y in _batches(BATCHES):
        model.train_step({"inputs": x, "data_samples": y}, wrapper)
    assert model.technique.temperature.value == pytest.approx(1.05 ** 4)
    model.eval()
    model.val_step({"inputs": x, "data_samples": y})  # validation does not observe
    other = MultiExitClassifier("msdnet_cifar_5exit", TINY, technique=dict(type="PhuongLampert", max_prob=ALWAYS))
    other.load_state_dict(model.state_dict())  # the extra state of an mmengine checkpoint
    assert other.technique.temperature.value == pytest.approx(1.05 ** 4)


def _task(model, accumulation=2):
    task = MultiExitTask(model, "PhuongLampert", max_prob=ALWAYS, grad_accum_steps=accumulation, verbose=False)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.01)
    return task.attach_optimizer(optimizer), optimizer


def test_timm_task_grows_t_once_per_update_validation_aside_and_resumes_it():
    task, optimizer = _task(_msdnet())
    for call, (x, y) in enumerate(_batches(BATCHES)):
        if call == 3:  # mid-update: the resumed task keeps T and the update's first batch
            state = torch.load(io.BytesIO(_saved(task.get_task_state())), weights_only=True)
            model = _msdnet(seed=1)
            model.load_state_dict(task.model.state_dict())
            task, optimizer = _task(model)
            task.load_task_state(state)
            assert task.technique.temperature.value == pytest.approx(1.05)
        (task(x, y)["loss"] / 2).backward()  # timm's train.py
        if (call + 1) % 2 == 0:
            optimizer.step()
            optimizer.zero_grad()
        pending = task.technique.temperature.state_dict()
        task.model.eval()
        with torch.no_grad():  # validation calls neither observe nor count
            task(x, y)
        task.model.train()
        assert task.technique.temperature.state_dict() == pending
    assert task.technique.temperature.value == pytest.approx(1.05 ** 4)


def _saved(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_plain_loop_grows_t_every_batch_and_a_resumed_technique_continues_identically():
    technique = PhuongLampert(max_prob=0.4)
    model = technique.prepare(_msdnet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loop = PlainTrainer(model, technique, optimizer)
    batches = _batches(4, seed=4)
    for x, y in batches[:2]:
        loop.step(x, y)
    resumed = PhuongLampert(max_prob=0.4)
    resumed.load_state_dict(torch.load(io.BytesIO(_saved(technique.state_dict())), weights_only=True))
    assert resumed.temperature.value == technique.temperature.value
    twin_model = resumed.prepare(copy.deepcopy(model))
    twin_optimizer = torch.optim.SGD(twin_model.parameters(), lr=0.05)
    twin_optimizer.load_state_dict(optimizer.state_dict())
    twin = PlainTrainer(twin_model, resumed, twin_optimizer)
    for x, y in batches[2:]:
        assert twin.step(x, y) == loop.step(x, y)
        assert resumed.temperature.value == technique.temperature.value
    always = PhuongLampert(max_prob=ALWAYS)
    model = always.prepare(_msdnet())
    loop = PlainTrainer(model, always, torch.optim.SGD(model.parameters(), lr=0.05))
    for x, y in batches[:2]:
        loop.step(x, y)
    assert always.temperature.value == pytest.approx(1.05 ** 2)  # no accumulation: an update per batch


# --- distributed -----------------------------------------------------------------------------------

def _rank(rank: int, store: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        rule = AdaptiveTemperature()
        for z in _logit_sequence(seed=10 + rank)[:30]:  # each rank its own batches
            rule.observe(z)
            rule.step()
        results[rank] = rule.value
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # spawning the processes takes a minute on a busy machine
def test_two_processes_with_different_batches_keep_the_same_temperature(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    alone = [_restated(_logit_sequence(seed=10 + rank)[:30]) for rank in range(2)]
    assert alone[0][-1] != alone[1][-1]  # each rank alone would end with another T
    both = _restated([torch.cat(pair) for pair in zip(*[_logit_sequence(seed=10 + r)[:30] for r in range(2)])])
    assert results[0] == results[1] == pytest.approx(both[-1], rel=1e-12)
