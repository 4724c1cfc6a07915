"""Gradient deconfliction: the PCGrad operator, parameter-level and branch-level, and DDP."""
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm_exits  # noqa: F401
from timm_exits import MSDNet
from timm_exits.models.branch_gradients import deconflict_branch, project_conflicts
from timm_exits.train import pcgrad_backward

from launch import launch_two_processes


def _pc(g, others):
    """PCGrad of one gradient against the original others, written out for the tests."""
    g = g.clone()
    for o in others:
        if torch.dot(g, o) < 0:
            g = g - torch.dot(g, o) / torch.dot(o, o) * o
    return g


def test_projection_by_hand():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # g1 . g2 = -1: g1 -> (0.5, 0.5), g2 -> (0, 1)
    assert project_conflicts([g1, g2], [[1], [0]]).tolist() == pytest.approx([0.5, 1.5])
    assert project_conflicts([g1, g2], [[1], [0]], protected=[[], [0]]).tolist() == pytest.approx([-0.5, 1.5])
    g3 = torch.tensor([1.0, 1.0])
    assert project_conflicts([g1, g3], [[1], [0]]).tolist() == [2.0, 1.0]  # no conflict: the plain sum


class TwoExits(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(6, 5)
        self.deep = nn.Linear(5, 5)
        self.heads = nn.ModuleList([nn.Linear(5, 3), nn.Linear(5, 3)])

    def losses(self, x, y, z):
        h = torch.tanh(self.shared(x))
        deeper = torch.tanh(self.deep(h))
        return [F.cross_entropy(self.heads[0](h), y), F.cross_entropy(self.heads[1](deeper), z)]


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("protect", [False, True])
def test_pcgrad_backward_against_autograd(protect):
    model = TwoExits()
    shared = [model.shared.weight, model.shared.bias]
    for seed in range(100):  # a batch on which the two exits' gradients conflict
        gen = torch.Generator().manual_seed(seed)
        x, y, z = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen), torch.randint(0, 3, (16,), generator=gen)
        losses = model.losses(x, y, z)
        g = [_flat(torch.autograd.grad(l, shared, retain_graph=True)) for l in losses]
        if torch.dot(g[0], g[1]) < 0:
            break
    assert torch.dot(g[0], g[1]) < 0
    expected = (_pc(g[0], [g[1]]) + (g[1] if protect else _pc(g[1], [g[0]])))
    head_grads = [torch.autograd.grad(l, list(h.parameters()), retain_graph=True) for l, h in zip(losses, model.heads)]
    stats = pcgrad_backward(losses, list(model.parameters()), protect_deeper=protect)
    assert stats["projections"] == (1 if protect else 2)
    assert torch.allclose(_flat([p.grad for p in shared]), expected, atol=1e-6)
    for head, grads in zip(model.heads, head_grads):  # heads: their own plain gradient
        assert all(torch.allclose(p.grad, q) for p, q in zip(head.parameters(), grads))


def test_without_conflict_it_is_the_plain_sum_and_scopes_differ_as_they_should():
    model = TwoExits()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    plain = torch.autograd.grad(sum(model.losses(x, y, y)), list(model.parameters()))
    losses = model.losses(x, y, y)
    g = [torch.autograd.grad(l, [model.shared.weight], retain_graph=True)[0].reshape(-1) for l in losses]
    if torch.dot(g[0], g[1]) >= 0:  # same targets: typically aligned
        pcgrad_backward(losses, list(model.parameters()))
        assert all(torch.allclose(p.grad, q, atol=1e-6) for p, q in zip(model.parameters(), plain))
    # per-tensor scope equals per-segment scope with one tensor per group
    z = (y + 1) % 3
    grads = {}
    for scope, groups in (("tensor", None), ("segment", [[p] for p in TwoExits().parameters()])):
        m = TwoExits()
        if groups is not None:
            groups = [[p] for p in m.parameters()]
        pcgrad_backward(m.losses(x, y, z), list(m.parameters()), scope=scope, groups=groups, order="deep_first")
        grads[scope] = [p.grad.clone() for p in m.parameters()]
    assert all(torch.allclose(a, b) for a, b in zip(grads["tensor"], grads["segment"]))
    with pytest.raises(ValueError, match="needs the parameter groups"):
        pcgrad_backward(model.losses(x, y, z), list(model.parameters()), scope="segment")
    with pytest.raises(ValueError, match="scope must be"):
        pcgrad_backward(model.losses(x, y, z), list(model.parameters()), scope="layer")


def test_branch_deconfliction_combines_the_two_gradients():
    x = torch.randn(4, 3, requires_grad=True)
    head, trunk = deconflict_branch(x)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    b = b - 2 * (torch.dot(a.reshape(-1), b.reshape(-1)).abs() / a.pow(2).sum()) * a  # make them conflict
    ((head * a).sum() + (trunk * b).sum()).backward()
    ga, gb = a.reshape(-1), b.reshape(-1)
    assert torch.dot(ga, gb) < 0
    assert torch.allclose(x.grad.reshape(-1), _pc(ga, [gb]) + _pc(gb, [ga]), atol=1e-6)


def test_branch_deconfliction_in_a_model_changes_only_the_backward():
    torch.manual_seed(0)
    model = MSDNet(num_blocks=3, base=1, step=1, num_channels=4, growth_rate=2, gr_factor=[1], bn_factor=[1],
                   stem_type="cifar", head_channels=8, num_classes=3, img_size=8).double()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    plain_out = model.forward_exits(x)
    plain = torch.autograd.grad(sum(F.cross_entropy(o, y) for o in plain_out), list(model.parameters()))
    model.gradient_deconfliction = "symmetric"
    model.gradient_equilibrium = True
    outs = model.forward_exits(x)
    assert all(torch.allclose(a, b) for a, b in zip(outs, plain_out))
    combined = torch.autograd.grad(sum(F.cross_entropy(o, y) for o in outs), list(model.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(plain, combined))
    heads = {id(p) for p in model.exits.parameters()}
    for p, a, b in zip(model.parameters(), plain, combined):
        if id(p) in heads:
            assert torch.allclose(a, b)  # heads keep their own gradient
    model.gradient_deconfliction = "both"
    with pytest.raises(ValueError, match="must be None, 'symmetric' or 'protect_deeper'"):
        model.forward_exits(x)


DDP_SCRIPT = textwrap.dedent('''
    import sys, torch, torch.nn.functional as F
    from accelerate import Accelerator
    from timm_exits import MSDNet
    from timm_exits.train import pcgrad_backward

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)  # same initial weights on every process
    model = MSDNet(num_blocks=3, base=1, step=1, num_channels=4, growth_rate=2, gr_factor=[1], bn_factor=[1],
                   stem_type="cifar", head_channels=8, num_classes=3, img_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(accelerator.process_index + 10)  # different data per process
    for step in range(3):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        optimizer.zero_grad()
        losses = [F.cross_entropy(o, y) for o in model.forward_exits(x)]
        pcgrad_backward(losses, list(model.parameters()), generator=torch.Generator().manual_seed(step))
        optimizer.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = accelerator.gather(flat.unsqueeze(0))
    if accelerator.is_main_process:
        same = torch.equal(gathered[0], gathered[1])
        print(f"RESULT processes={accelerator.num_processes} identical={same}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group: exiting with it alive can abort gloo
''')


@pytest.mark.slow
def test_pcgrad_keeps_processes_identical_under_two_process_ddp(tmp_path):
    script = tmp_path / "ddp_pcgrad.py"
    script.write_text(DDP_SCRIPT)
    run = launch_two_processes(str(script))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RESULT processes=2 identical=True" in run.stdout
