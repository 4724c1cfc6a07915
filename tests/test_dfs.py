"""Deep Feature Surgery's optional distillation: the loss against a re-statement of the reference's
KD rule (float64, value and gradient, the teacher detached) and a hand-computed case; the technique
with feature surgery through the plain loop and timm's task; the recipe through the engine."""
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.config import load_config
from timm_exits.engine import run
from timm_exits.task import MultiExitTask
from timm_exits.train import PlainTrainer, build_technique
from timm_exits.train.dfs import dfs_distillation_loss

from helpers import tiny_data, write_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(num_classes=10, num_channels=4, growth_rate=2)


def _restated(logits, target, temperature, gamma):
    """The reference's rule, element by element: the last exit's cross-entropy, then for each earlier
    exit (1 - gamma) CE + gamma * mean over samples of -sum_c q_c log p_c, q the last exit's softmax at T
    (detached), p the exit's at T."""
    def ce(z):
        return sum(-torch.log_softmax(z[b], -1)[target[b]] for b in range(len(target))) / len(target)

    q = torch.softmax(logits[-1].detach() / temperature, -1)
    loss = ce(logits[-1])
    for z in logits[:-1]:
        log_p = torch.log_softmax(z / temperature, -1)
        soft = sum(-sum(q[b, c] * log_p[b, c] for c in range(z.shape[1])) for b in range(len(target))) / len(target)
        loss = loss + (1 - gamma) * ce(z) + gamma * soft
    return loss


def test_a_hand_computed_case():
    # two exits, two classes, one sample of class 0; T = 1, gamma = 0.5
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])  # teacher: (3/4, 1/4)
    ce_teacher = -math.log(0.75)
    ce_student = math.log(2.0)  # uniform
    soft = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5))
    ce, kd = dfs_distillation_loss([student, teacher], torch.tensor([0]), temperature=1.0, gamma=0.5)
    assert ce.item() == pytest.approx(ce_teacher + 0.5 * ce_student, abs=1e-6)
    assert kd.item() == pytest.approx(0.5 * soft, abs=1e-6)


@pytest.mark.parametrize("temperature, gamma", [(3.0, 0.9), (1.0, 0.3), (4.0, 0.0)])
def test_value_and_gradient_equal_the_restated_reference_rule(temperature, gamma):
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3)]
    target = torch.tensor([0, 3, 1, 2, 3])
    ours = sum(dfs_distillation_loss(logits, target, temperature, gamma))
    reference = _restated(logits, target, temperature, gamma)
    torch.testing.assert_close(ours, reference)
    ours_grad = torch.autograd.grad(ours, logits)
    for a, b in zip(ours_grad, torch.autograd.grad(reference, logits)):
        torch.testing.assert_close(a, b)
    # the teacher learns from the labels alone: its gradient is its cross-entropy's
    (teacher_grad,) = torch.autograd.grad(F.cross_entropy(logits[-1], target), [logits[-1]])
    torch.testing.assert_close(ours_grad[-1], teacher_grad)


def test_no_t_squared_unlike_phuong_lampert():
    from timm_exits.train.phuong_lampert import distillation_based_loss

    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(4, 5, dtype=torch.float64, generator=g) for _ in range(3)]
    target = torch.tensor([0, 1, 2, 3])
    _, ours = dfs_distillation_loss(logits, target, temperature=3.0, gamma=0.9)
    _, phuong = distillation_based_loss(logits, target, 3.0, distillation_weight=0.9, gain=1.0)
    torch.testing.assert_close(phuong, 9.0 * ours)  # the same soft term, times T^2 there


def test_the_technique_trains_with_feature_surgery_in_the_plain_loop_and_timm_s_task():
    torch.manual_seed(0)
    technique = build_technique(dict(type="DFSDistillation", feature_surgery=0.5))
    model = technique.prepare(timm.create_model("msdnet_cifar_5exit", **TINY).train())
    assert model.feature_surgery == 0.5
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with torch.no_grad():
        logits = model.forward_exits(x)
    terms = technique.losses(logits, y)
    torch.testing.assert_close(sum(terms.values()), _restated([z.double() for z in logits], y, 3.0, 0.9).float())
    loop = PlainTrainer(model, technique, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert set(loop.step(x, y)) == {"ce", "distillation"}
    task = MultiExitTask(timm.create_model("msdnet_cifar_5exit", **TINY).train(), "DFSDistillation",
                         feature_surgery=0.5, verbose=False)
    out = task(x, y)
    assert torch.isfinite(out["loss"]) and {"loss_ce", "loss_distillation"} <= set(out)
    with pytest.raises(ValueError, match="at least 2 exits"):
        dfs_distillation_loss([torch.zeros(2, 3)], torch.tensor([0, 1]))


@pytest.mark.slow  # an engine run on tiny data
def test_engine_runs_the_dfs_kd_recipe(tmp_path):
    data = tiny_data(tmp_path / "data")
    recipe = (ROOT / "recipes" / "_base_" / "techniques" / "dfs_kd.py").read_text()
    config = load_config(str(write_config(tmp_path / "c.py", data, extra="tracker = None\ntrain = dict(epochs=1)\n"
                                          + recipe)), output_dir=str(tmp_path / "out"))
    assert config["technique"] == build_technique(dict(type="DFSDistillation", feature_surgery=0.5)).config()
    run(config)
    assert (tmp_path / "out" / "model.safetensors").exists()
