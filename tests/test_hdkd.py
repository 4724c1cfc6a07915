"""HDKD: dense distillation terms, harmonized weights, and the bilevel weight update against a
finite-difference hypergradient on a toy problem."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timm_exits.train.hdkd import BalancedValidationLoss, HarmonizedWeights, harmonized_loss, hdkd_weight_step, loss_terms


class ToyExits(nn.Module):
    """Three exits on a small MLP (the multi-exit contract's forward_exits is all HDKD needs)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6)])
        self.heads = nn.ModuleList([nn.Linear(6, 4) for _ in range(3)])

    def forward_exits(self, x):
        out = []
        for layer, head in zip(self.layers, self.heads):
            x = torch.tanh(layer(x))
            out.append(head(x))
        return out


def test_weights_start_as_deep_supervision_and_uniform_dense_kd():
    ce, kd = HarmonizedWeights(4)()
    assert ce.tolist() == pytest.approx([1.0] * 4)
    assert kd[0].tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3]) and kd[2].tolist() == pytest.approx([0, 0, 0, 1])
    assert kd[3].tolist() == [0.0] * 4 and kd.tril().sum() == 0
    _, dbt = HarmonizedWeights(4, init="dbt")()
    assert dbt[0, 3] > 0.98


def test_dense_terms_match_the_formula():
    torch.manual_seed(0)
    logits = [torch.randn(8, 4, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 4, (8,))
    ce, kd = loss_terms(logits, y, temperature=2.0)
    assert ce[1].item() == pytest.approx(F.cross_entropy(logits[1], y).item())
    manual = 4.0 * (F.softmax(logits[2] / 2, -1) * (F.log_softmax(logits[2] / 2, -1) - F.log_softmax(logits[0] / 2, -1))).sum(-1).mean()
    assert kd[0, 2].item() == pytest.approx(manual.item(), rel=1e-5)
    assert kd[2, 0].item() == 0 and kd[1, 1].item() == 0
    kd[0, 2].backward()
    assert logits[2].grad is None and logits[0].grad.abs().sum() > 0  # the teacher is detached


def test_weight_update_matches_a_finite_difference_hypergradient():
    model = ToyExits().double()
    weights = HarmonizedWeights(3).double()
    with torch.no_grad():
        weights.ce_logits.copy_(torch.tensor([0.3, -0.2, 0.1]))
        weights.kd_logits.copy_(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(2)
    train = (torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,), generator=g))
    val = (torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,), generator=g))
    xi, alpha, temp = 0.5, 0.5, 2.0

    def unrolled_val_loss(ce_logits, kd_logits):
        """L_val(theta - xi grad L_train(theta; weights(a))), computed directly."""
        with torch.no_grad():
            weights.ce_logits.copy_(ce_logits)
            weights.kd_logits.copy_(kd_logits)
        params = list(model.parameters())
        ce, kd = loss_terms(model.forward_exits(train[0]), train[1], temp)
        grads = torch.autograd.grad(harmonized_loss(ce, kd, tuple(w.detach() for w in weights()), alpha), params)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, gr in zip(params, grads):
                p -= xi * gr
            loss = sum(F.cross_entropy(z, val[1]) for z in model.forward_exits(val[0])).item()
            for p, s in zip(params, saved):
                p.copy_(s)
        return loss

    a_ce, a_kd = weights.ce_logits.detach().clone(), weights.kd_logits.detach().clone()
    delta = 1e-5
    numeric_ce = torch.zeros(3, dtype=torch.float64)
    for m in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[m] = delta
        numeric_ce[m] = (unrolled_val_loss(a_ce + e, a_kd) - unrolled_val_loss(a_ce - e, a_kd)) / (2 * delta)
    numeric_kd = torch.zeros(3, 3, dtype=torch.float64)
    for i, j in ((0, 1), (0, 2)):  # the logits that matter: student 0's two teachers (student 1 has one)
        e = torch.zeros(3, 3, dtype=torch.float64)
        e[i, j] = delta
        numeric_kd[i, j] = (unrolled_val_loss(a_ce, a_kd + e) - unrolled_val_loss(a_ce, a_kd - e)) / (2 * delta)

    with torch.no_grad():
        weights.ce_logits.copy_(a_ce)
        weights.kd_logits.copy_(a_kd)
    optimizer = torch.optim.SGD(weights.parameters(), lr=0.0)  # keep the weights, read the gradient
    hdkd_weight_step(model, weights, optimizer, train, val, BalancedValidationLoss(3, ratio_reg=False), xi, alpha, temp)
    assert numeric_ce.abs().max() > 1e-4  # the hypergradient is not trivially zero
    assert torch.allclose(weights.ce_logits.grad, numeric_ce, rtol=1e-3, atol=1e-7)
    for i, j in ((0, 1), (0, 2)):
        assert weights.kd_logits.grad[i, j].item() == pytest.approx(numeric_kd[i, j].item(), rel=1e-3, abs=1e-7)


def test_weight_step_moves_only_the_weights():
    model = ToyExits()
    weights = HarmonizedWeights(3)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(weights.parameters(), lr=0.1)
    batch = (torch.randn(8, 5), torch.randint(0, 4, (8,)))
    info = hdkd_weight_step(model, weights, optimizer, batch, batch, BalancedValidationLoss(3), xi=0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert weights.ce_logits.abs().sum() > 0 and info["v_norm"] > 0


def test_balanced_validation_objective():
    loss = BalancedValidationLoss(2, momentum=0.5)
    logits = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    first = loss(logits, torch.tensor([0]))
    l = torch.stack([F.cross_entropy(z, torch.tensor([0])) for z in logits])
    assert first.item() == pytest.approx((l.sum() + 2 * F.softplus(torch.tensor(0.0))).item())
    assert torch.allclose(loss.expected, l)
