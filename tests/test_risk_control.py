"""Risk-controlled early exit (RC-EENN): the global-lambda exit rule, the per-sample losses, the
bounds against re-stated formulas and the selection rules on loss matrices worked out by hand."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from timm_exits.inference.risk_control import (LAMBDAS, LOSSES, exits_at, hb_p_value, hb_upper_bound, lambda_losses,
                                               risk_controlled_thresholds, select_lambda, wsr_upper_bound)


def test_lambda_grid_and_strict_exit_rule():
    assert len(LAMBDAS) == 101 and LAMBDAS[0] == 1.0 and LAMBDAS[-1] == 0.0 and LAMBDAS[37].item() == 0.63
    confidence = torch.tensor([[0.5, 0.7, 0.2],
                               [0.6, 0.9, 0.4]])
    # a score equal to lambda does not exit (strict); nobody above lambda: the last exit
    assert exits_at(confidence, 0.5).tolist() == [1, 0, 1]
    assert exits_at(confidence, 0.0).tolist() == [0, 0, 0]
    assert exits_at(confidence, 1.0).tolist() == [1, 1, 1]


# 3 exits x 3 samples x 3 classes. Max-softmax of [4, 0, 0] is 0.965, of [1, 0, 0] 0.576, of [0.1, 0, 0] 0.356.
LOGITS = torch.tensor([[[1.0, 0, 0], [0.1, 0, 0], [0, 4.0, 0]],
                       [[0, 4.0, 0], [4.0, 0, 0], [0, 0, 1.0]],
                       [[0, 0, 4.0], [0, 1.0, 0], [0, 4.0, 0]]])
LABELS = torch.tensor([2, 0, 1])
GRID = [1.0, 0.9, 0.5, 0.0]


def test_losses_by_hand():
    gap = lambda_losses(LOGITS, LABELS, "prediction-gap", GRID)
    # exits per lambda: at 1 nobody exits early; at 0.9 only 0.965 passes; at 0.5 also 0.576; at 0 all do
    assert gap.exits.T.tolist() == [[2, 1, 0, 0], [2, 1, 1, 0], [2, 0, 0, 0]]
    # sample 0: last right, early wrong; sample 1: last wrong, early right; sample 2: always right
    assert gap.losses.T.tolist() == [[0, 1, 1, 1], [0, -1, -1, -1], [0, 0, 0, 0]]
    assert gap.loss_bound == 1.0 and gap.num_exits == 3
    consistency = lambda_losses(LOGITS, None, "consistency", GRID)
    assert consistency.losses.T.tolist() == [[0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    probs = LOGITS.softmax(-1).double()
    for loss, target in [("brier-gap", LABELS), ("brier-gap-final", probs[-1].argmax(-1))]:
        table = lambda_losses(LOGITS, LABELS, loss, GRID)
        assert table.loss_bound == 2.0
        for k in range(4):
            for i in range(3):
                e = int(gap.exits[k, i])
                brier = [sum((float(p[c]) - (c == int(target[i]))) ** 2 for c in range(3))
                         for p in (probs[e, i], probs[-1, i])]
                assert table.losses[k, i].item() == pytest.approx(brier[0] - brier[1], abs=1e-6)
    assert (lambda_losses(LOGITS, LABELS, "brier-gap-final", GRID).losses[1:, 1] > 0).all()


def restated_wsr(x, delta, bound=1.0):
    """The WSR bound by bisection on the betting wealth, written from the equations with plain loops."""
    n = len(x)
    mus, sigmas, total, squares = [], [], 0.0, 0.0
    for t, xt in enumerate(x, start=1):
        total += xt
        mus.append((0.5 + total) / (t + 1))
        squares += (xt - mus[-1]) ** 2
        sigmas.append((0.25 + squares) / (t + 1))
    nus = [min(1 / bound, math.sqrt(2 * math.log(1 / delta) / (n * s2))) for s2 in [0.25] + sigmas[:-1]]

    def rejected(m):
        log_wealth, best = 0.0, -math.inf
        for xt, nu in zip(x, nus):
            log_wealth += math.log(1 - nu * (xt - m))
            best = max(best, log_wealth)
        return best > math.log(1 / delta)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if rejected(mid) else (mid, hi)
    return hi


def restated_hb(risk, n, eps, binary=False):
    k = math.ceil(round(n * risk, 9))
    tail = sum(math.comb(n, i) * eps ** i * (1 - eps) ** (n - i) for i in range(k + 1))
    if binary:
        return tail
    a = min(risk, eps)
    kl = (a * math.log(a / eps) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - eps))
    return min(math.exp(-n * kl), math.e * tail)


def test_bounds_equal_the_restated_formulas():
    rng = np.random.default_rng(0)
    for n, delta in [(30, 0.1), (100, 0.05), (100, 0.2)]:
        for x in (rng.uniform(0, 1, n) ** 3, rng.choice([-1.0, 0.0, 1.0], n, p=[0.1, 0.7, 0.2])):
            assert wsr_upper_bound(x, delta) == pytest.approx(restated_wsr(list(x), delta), abs=1e-8)
            assert wsr_upper_bound(x, delta) > x.mean()
    x = rng.uniform(0, 2, 50) * 0.2
    assert wsr_upper_bound(x, 0.1, loss_bound=2.0) == pytest.approx(restated_wsr(list(x), 0.1, 2.0), abs=1e-8)
    for risk, n, eps in [(0.0, 20, 0.2), (0.05, 20, 0.2), (0.1, 20, 0.2), (0.07, 100, 0.1), (0.3, 100, 0.1),
                         (0.123, 57, 0.2)]:
        for binary in (False, True):
            assert hb_p_value(risk, n, eps, binary) == pytest.approx(restated_hb(risk, n, eps, binary), rel=1e-9)
    # at risk 0 the Hoeffding term is (1 - eps)^n (0 log 0 = 0); the reference's NaN there leaves e (1 - eps)^n
    assert hb_p_value(0.0, 128, 0.02) == pytest.approx(0.98 ** 128) and 0.98 ** 128 < 0.1 < math.e * 0.98 ** 128
    # 7/100 counts 7 failures, not ceil(100 * 0.07) = ceil(7.000000000000001) = 8
    assert 100 * 0.07 > 7
    seven = sum(math.comb(100, i) * 0.1 ** i * 0.9 ** (100 - i) for i in range(8))
    assert hb_p_value(0.07, 100, 0.1, True) == pytest.approx(seven, rel=1e-9)
    # the UCB is where the p-value crosses delta
    for risk, binary in [(0.05, False), (0.05, True), (0.0, False), (0.4, False)]:
        ucb = hb_upper_bound(risk, 100, 0.1, binary)
        assert risk < ucb < 1
        assert restated_hb(risk, 100, ucb, binary) == pytest.approx(0.1, abs=1e-6)
        assert restated_hb(risk, 100, ucb + 1e-3, binary) < 0.1 < restated_hb(risk, 100, ucb - 1e-3, binary)


def rows(errors, n):
    """A 0/1 loss matrix: row k has errors[k] ones among n samples."""
    return torch.tensor([[1.0] * e + [0.0] * (n - e) for e in errors])


def test_selection_rules_by_hand_on_a_non_contiguous_safe_set():
    # 20 samples, rows with 0, 1, 2, 0, 1 errors: risk 0, .05, .10, 0, .05 (row 2 interrupts the safe run)
    losses = rows([0, 1, 2, 0, 1], 20)
    # naive (< 0.2) and CRC (<= 21 * 0.2 / 20 - 1 / 20 = 0.16) take the last qualifying row anywhere
    assert select_lambda(losses, 0.2, "naive") == 4 and select_lambda(losses, 0.2, "crc") == 4
    # binomial p-values at eps = 0.2: 0.8^20 = 0.0115, + 20 * 0.2 * 0.8^19 = 0.069, + 190 * 0.04 * 0.8^18 = 0.206
    assert [restated_hb(r, 20, 0.2, True) for r in (0, 0.05, 0.1)] == pytest.approx([0.0115, 0.0692, 0.2061], abs=1e-4)
    # with delta = 0.1 rows 0, 1, 3, 4 are rejected (safe), row 2 is not: fixed-sequence testing stops at 2
    assert select_lambda(losses, 0.2, "ltt", binary_loss=True) == 1
    assert select_lambda(losses, 0.2, "ltt-first-failing", binary_loss=True) == 2  # the reference: one step further
    assert select_lambda(losses, 0.2, "ucb-hb", binary_loss=True) == 1  # UCB < eps <=> p-value(eps) < delta
    # Hoeffding-Bentkus for bounded losses: row 1's p-value is exp(-20 KL(0.05 || 0.2)) = 0.153 > 0.1
    assert select_lambda(losses, 0.2, "ltt") == 0 and select_lambda(losses, 0.2, "ltt-first-failing") == 1
    # CRC pays (B - eps) / n: at eps = 0.09 it allows 21 * 0.09 / 20 - 0.05 = 0.0445, so only the zero rows
    assert select_lambda(losses, 0.09, "naive") == 4 and select_lambda(losses, 0.09, "crc") == 3
    assert select_lambda(rows([0, 2, 4], 20), 0.1, "naive") == 0  # strict: a risk of exactly 0.1 is not < 0.1


def test_naive_and_crc_take_the_mean_in_the_losses_own_dtype_as_the_reference():
    # the reference's 0/1 losses are float32 and numpy takes their mean in float32: 3/100 is 0.029999999,
    # below a float64 epsilon of 0.03, so it selects that lambda where the exact mean (0.03) would not
    assert np.float32(3) / np.float32(100) < np.float64(0.03) and 3 / 100 == 0.03
    losses = rows([0, 3, 5], 100)
    assert losses.dtype == torch.float32
    assert select_lambda(losses, 0.03, "naive") == 1
    assert select_lambda(losses.double(), 0.03, "naive") == 0  # float64 losses: the exact mean
    assert select_lambda(losses.numpy(), 0.03, "naive") == 1
    # CRC at epsilon = 8/101 allows 101 epsilon / 100 - 1 / 100 = 0.07 exactly; 7/100 in float32 is 0.0700000003
    assert 101 * (8 / 101) / 100 - 1 / 100 == 0.07 and float(np.float32(7) / np.float32(100)) > 0.07
    assert select_lambda(rows([0, 7, 9], 100), 8 / 101, "crc") == 0
    assert select_lambda(rows([0, 7, 9], 100).double(), 8 / 101, "crc") == 1
    table = lambda_losses(LOGITS, LABELS, "prediction-gap", GRID)
    assert table.losses.dtype == torch.float32  # as the reference computes the 0/1 losses
    assert lambda_losses(LOGITS, LABELS, "brier-gap", GRID).losses.dtype == torch.float64


def test_ucb_rule_stops_at_the_first_unsafe_lambda():
    # 200 samples, risks 0, .05, .5, .05, .6 at eps = 0.2
    # (Hoeffding alone gives UCB(.05) <= .05 + sqrt(log 10 / 400) = .126)
    losses = rows([0, 10, 100, 10, 120], 200)
    bounds = [wsr_upper_bound(row, 0.1) for row in losses]
    assert bounds[1] < 0.2 and bounds[3] < 0.2 and bounds[2] > 0.2 and bounds[4] > 0.2
    assert select_lambda(losses, 0.2, "ucb-wsr") == 1 and select_lambda(losses, 0.2, "ucb-hb") == 1
    assert select_lambda(losses, 0.2, "naive") == 3 and select_lambda(losses, 0.2, "crc") == 3
    assert select_lambda(losses, 0.2, "ltt") == 1 and select_lambda(losses, 0.2, "ltt-first-failing") == 2
    assert select_lambda(rows([0, 0, 0], 200), 0.2, "ltt") == 2  # nothing fails: the most aggressive lambda
    assert select_lambda(rows([0, 0, 0], 200), 0.2, "ltt-first-failing") == 2


def test_wsr_needs_a_random_order():
    # WSR bets sequentially: 170 zeros then 30 ones (risk 0.15) look safe in that order, not shuffled
    ordered = torch.tensor([[0.0] * 200, [0.0] * 170 + [1.0] * 30])
    assert wsr_upper_bound(ordered[1], 0.1) < 0.02 < 0.15 < wsr_upper_bound(ordered[1].flip(0), 0.1)
    assert select_lambda(ordered, 0.1, "ucb-wsr", seed=None) == 1
    assert select_lambda(ordered, 0.1, "ucb-wsr") == 0 and select_lambda(ordered, 0.1, "ucb-wsr", seed=5) == 0


def test_hb_rules_clip_negative_losses_and_scale_by_the_bound():
    # a gap loss of -1 does not make a row safer for the HB rules: max(loss, 0)
    negative = torch.tensor([[0.0] * 20, [1.0, 1.0] + [-1.0] * 18])
    assert select_lambda(negative, 0.2, "ltt", binary_loss=True) == 0
    assert select_lambda(negative, 0.2, "naive") == 1  # mean -0.8
    # Brier-like losses in [0, 2]: risk 0.1 of B = 2 is 0.05 of 1
    assert select_lambda(2 * rows([0, 1, 2], 20), 0.4, "ltt", loss_bound=2.0, binary_loss=True) == 1


def test_risk_controlled_thresholds_end_to_end():
    torch.manual_seed(0)
    logits = torch.randn(4, 300, 10) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1)
    labels = logits[-1].argmax(-1)
    labels[:60] = torch.randint(0, 10, (60,))
    table = lambda_losses(logits, labels, "prediction-gap")
    for rule in ("naive", "crc", "ucb-wsr", "ltt"):
        rc = risk_controlled_thresholds(SimpleNamespace(logits=logits, labels=labels), 0.1, rule=rule)
        assert rc.thresholds.tolist() == [rc.lam] * 4 and rc.lam == LAMBDAS[rc.lambda_index].item()
        assert rc.lambda_index == select_lambda(table.losses, 0.1, rule)
        assert rc.calibration_risk == pytest.approx(table.losses[rc.lambda_index].mean().item())
        assert rc.calibration_risk < 0.1 and rc.mean_exit < 3
    half = table.subset(torch.arange(150))
    assert half.losses.shape == (101, 150) and torch.equal(half.exits, table.exits[:, :150])


@pytest.mark.parametrize("call, match", [
    (lambda: select_lambda(rows([0, 1], 20), 0.0), r"epsilon must be in \(0, 1\)"),
    (lambda: select_lambda(rows([0, 1], 20), 1.0), r"epsilon must be in \(0, 1\)"),
    (lambda: select_lambda(rows([0, 1], 20), 0.1, delta=1.5), r"delta must be in \(0, 1\)"),
    (lambda: select_lambda(torch.zeros(3, 0), 0.1), "calibration set is empty"),
    (lambda: select_lambda(torch.zeros(3), 0.1), r"shape \(lambdas, samples\)"),
    (lambda: select_lambda(rows([0, 1], 20), 0.1, rule="ltt-bonferroni"), "rule must be one of"),
    (lambda: select_lambda(2 * rows([0, 1], 20), 0.1), "at most loss_bound=1.0"),
    (lambda: wsr_upper_bound([], 0.1), "calibration set is empty"),
    (lambda: wsr_upper_bound([0.1], 0.0), r"delta must be in \(0, 1\)"),
    (lambda: hb_p_value(-0.1, 10, 0.1), r"a risk and an epsilon in \[0, 1\]"),
    (lambda: hb_p_value(0.1, 10, 1.5), r"a risk and an epsilon in \[0, 1\]"),
    (lambda: lambda_losses(LOGITS, LABELS, "hinge"), "loss must be one of"),
    (lambda: lambda_losses(LOGITS, None, "prediction-gap"), "needs labels of shape"),
    (lambda: lambda_losses(LOGITS[0], LABELS), r"shape \(exits, samples, classes\)"),
    (lambda: lambda_losses(LOGITS[:, :0], LABELS[:0]), "at least one exit and one sample"),
    (lambda: lambda_losses(LOGITS, LABELS, lambdas=[0.0, 0.5]), "conservative"),
    (lambda: risk_controlled_thresholds(SimpleNamespace(logits=None, labels=LABELS), 0.1),
     r"probabilities \(.probs of outputs without raw logits\)"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_every_loss_is_zero_at_lambda_one():
    for loss in LOSSES:
        assert (lambda_losses(LOGITS, LABELS, loss).losses[0] == 0).all()
