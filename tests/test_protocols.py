"""Evaluation protocols: the global threshold sweep (ZTW, SDN), the patience sweep (ZTW's PBEE),
accuracy at cost fractions, BoostNet's flat envelope and the executor's latency; hand-computed cases
and the reference rules re-stated as loops."""
import math

import pytest
import timm
import torch

import timm_exits  # noqa: F401
from timm_exits.inference import (SDN_GRID, SDN_POLICY, ZTW_GRID, ZTW_POLICY, EarlyExitExecutor, ExitOutputs,
                                  ExitPolicy, SweepPoint, accuracy_at_cost, budgeted_curve, flat_envelope,
                                  measure_latency, patience_sweep, threshold_sweep)

# 3 exits x 4 samples, two classes, label 0: the max-softmax of each exit and whether it is right
CONF = [[0.90, 0.60, 0.55, 0.70],
        [0.95, 0.80, 0.60, 0.65],
        [0.99, 0.90, 0.85, 0.60]]
RIGHT = [[1, 0, 1, 0],
         [1, 1, 0, 0],
         [1, 1, 1, 1]]
COSTS = [1.0, 2.0, 4.0]


def hand_example() -> ExitOutputs:
    conf, right = torch.tensor(CONF), torch.tensor(RIGHT).bool()
    p0 = torch.where(right, conf, 1 - conf)
    return ExitOutputs.from_probs(torch.stack([p0, 1 - p0], -1), torch.zeros(4, dtype=torch.long))


def test_threshold_sweep_by_hand():
    # t=0.5: everyone leaves at exit 0 (2 right). t=0.75: exits 0, 1, 2, 2 (all right), cost (1+2+4+4)/4.
    # t=0.92: exits 1, 2, 2, 2 (all right), cost 14/4.
    points = threshold_sweep(hand_example(), COSTS, [0.5, 0.75, 0.92])
    assert [p.accuracy for p in points] == pytest.approx([50.0, 100.0, 100.0])
    assert [p.cost for p in points] == pytest.approx([1.0, 2.75, 3.5])
    assert points[1].exit_fractions == pytest.approx([0.25, 0.25, 0.5])
    # SDN's fallback at t=0.92: sample 3 (0.70, 0.65, 0.60) goes back to exit 0, where it is wrong
    sdn = threshold_sweep(hand_example(), COSTS, [0.92], SDN_POLICY)[0]
    assert sdn.accuracy == pytest.approx(75.0) and sdn.cost == pytest.approx(11 / 4)
    assert sdn.exit_fractions == pytest.approx([0.25, 0.25, 0.5])
    with pytest.raises(ValueError, match="needs a probability score"):
        threshold_sweep(hand_example(), COSTS, policy="patience")
    with pytest.raises(ValueError, match="2 costs for 3 exits"):
        threshold_sweep(hand_example(), COSTS[:2])


def _random_outputs(n=300, exits=5, classes=4, seed=0) -> ExitOutputs:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(exits, n, classes, generator=g) * torch.linspace(0.5, 3, exits).view(-1, 1, 1)
    logits[:, torch.arange(n), labels] += torch.linspace(0.2, 2.0, exits).view(-1, 1)
    return ExitOutputs(logits, labels)


def _ztw_threshold_loop(logits, labels, costs, q):
    """ZTW's protocol re-stated per sample: the first exit whose max-softmax is > q, else the last."""
    probs = logits.softmax(-1)
    right, cost = 0, 0.0
    for i in range(labels.shape[0]):
        taken = next((k for k in range(len(costs)) if probs[k, i].max() > q), len(costs) - 1)
        right += int(probs[taken, i].argmax() == labels[i])
        cost += costs[taken]
    return 100 * right / labels.shape[0], cost / labels.shape[0]


def _sdn_loop(logits, labels, costs, q):
    """SDN's rule re-stated per sample: the first exit whose max-softmax is >= q, else the most confident
    of all exits (the first one on ties)."""
    probs = logits.softmax(-1)
    right, cost = 0, 0.0
    for i in range(labels.shape[0]):
        conf = [probs[k, i].max().item() for k in range(len(costs))]
        taken = next((k for k in range(len(costs) - 1) if conf[k] >= q), None)
        if taken is None:
            taken = conf.index(max(conf))
        right += int(probs[taken, i].argmax() == labels[i])
        cost += costs[taken]
    return 100 * right / labels.shape[0], cost / labels.shape[0]


def test_sweeps_equal_the_restated_reference_rules():
    out, costs = _random_outputs(), [1.0, 2.0, 3.5, 5.0, 8.0]
    ztw = threshold_sweep(out, costs)  # the defaults are ZTW's
    assert len(ztw) == 100 and [p.threshold for p in ztw] == torch.linspace(0, 1, 100).tolist() == ZTW_GRID
    assert ZTW_POLICY == ExitPolicy("maxprob", "last", strict=True)
    for p in ztw[::7]:
        acc, cost = _ztw_threshold_loop(out.logits, out.labels, costs, torch.tensor(p.threshold))
        assert p.accuracy == pytest.approx(acc) and p.cost == pytest.approx(cost)
    assert len({round(p.cost, 6) for p in ztw}) > 10  # the curve really moves
    for p in threshold_sweep(out, costs, SDN_GRID, SDN_POLICY):
        acc, cost = _sdn_loop(out.logits, out.labels, costs, p.threshold)
        assert p.accuracy == pytest.approx(acc) and p.cost == pytest.approx(cost)


def _ztw_patience_loop(logits, labels, costs, t):
    """ZTW's PBEE evaluation re-stated per sample: a counter that starts at 1 on the first exit, goes
    up when an exit repeats the previous prediction and restarts at 1 otherwise; leave when it is > t."""
    right, cost = 0, 0.0
    for i in range(labels.shape[0]):
        taken, count, previous = len(costs) - 1, 0, None
        for k in range(len(costs)):
            pred = logits[k, i].argmax().item()
            count = count + 1 if pred == previous else 1
            previous = pred
            if count > t:
                taken = k
                break
        right += int(logits[taken, i].argmax() == labels[i])
        cost += costs[taken]
    return 100 * right / labels.shape[0], cost / labels.shape[0]


def test_patience_sweep_equals_the_restated_ztw_loop():
    out, costs = _random_outputs(classes=3, seed=1), [1.0, 2.0, 3.0, 4.0, 5.0]
    points = patience_sweep(out, costs)
    assert [p.threshold for p in points] == [0, 1, 2, 3, 4]
    assert points[0].exit_fractions[0] == 1.0 and points[0].cost == 1.0  # t = 0 exits at the first head
    for t, p in enumerate(points):
        acc, cost = _ztw_patience_loop(out.logits, out.labels, costs, t)
        assert p.accuracy == pytest.approx(acc) and p.cost == pytest.approx(cost), t
    assert len({p.cost for p in points}) == 5


def test_accuracy_at_cost_by_hand():
    curve = [SweepPoint(0.1, 50.0, 1.0, []), SweepPoint(0.2, 80.0, 1.5, []), SweepPoint(0.3, 60.0, 2.0, []),
             SweepPoint(0.4, 70.0, 3.0, []), SweepPoint(0.5, 65.0, 4.0, [])]
    best = accuracy_at_cost(curve, 4.0, (0.2, 0.25, 0.5, 0.75, 1.0))
    assert best["accuracy"] == [None, 50.0, 80.0, 80.0, 80.0]
    assert best["max_accuracy"] == 80.0 and best["last_accuracy"] == 65.0
    # ZTW's reading: the point before the first one over the budget (0.5 x 4 = 2.0: the third point)
    ztw = accuracy_at_cost(curve, 4.0, (0.2, 0.25, 0.5, 0.75, 1.0), rule="ztw")
    assert ztw["accuracy"] == [None, 50.0, 60.0, 70.0, 65.0]
    with pytest.raises(ValueError, match="rule must be 'best' or 'ztw'"):
        accuracy_at_cost(curve, 4.0, rule="max")
    with pytest.raises(ValueError, match="must be positive numbers"):
        accuracy_at_cost(curve, 4.0, (0.5, -1.0))
    with pytest.raises(ValueError, match="no points"):
        accuracy_at_cost([], 4.0)


def test_flat_envelope_equals_boostnets_loop():
    val, test = _random_outputs(seed=2), _random_outputs(seed=3)
    costs = [1.0, 2.0, 3.0, 4.0, 5.0]
    raw = budgeted_curve(val, test, costs)
    flat = budgeted_curve(val, test, costs, envelope=True)
    assert flat == flat_envelope(raw)
    best_val, best_test = -1.0, -1.0  # BoostNet's --flat_curve, re-stated
    for r, f in zip(raw, flat):
        if r.val_accuracy > best_val:
            best_val, best_test = r.val_accuracy, r.accuracy
        assert (f.val_accuracy, f.accuracy) == (best_val, best_test)
        assert (f.q, f.cost, f.thresholds) == (r.q, r.cost, r.thresholds)  # plotted at its own cost
    assert any(f.accuracy != r.accuracy for r, f in zip(raw, flat))  # the envelope changed something
    assert all(b.val_accuracy >= a.val_accuracy for a, b in zip(flat, flat[1:]))


def test_latency_of_the_executor():
    torch.manual_seed(0)
    model = timm.create_model("msdnet_cifar_5exit", num_classes=3, num_channels=4, growth_rate=2).eval()
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        confidence = torch.stack(model.forward_exits(images)).softmax(-1).amax(-1)
    thresholds = [confidence[0].median().item()] * 5
    executor = EarlyExitExecutor(model, thresholds, "maxprob", [1.0, 2.0, 3.0, 4.0, 5.0])
    lat = measure_latency(executor, images, batch_size=4, warmup=1, repeats=2)
    assert lat["images"] == 6 and lat["batch_size"] == 4 and lat["device"] == "cpu"
    assert 0 < lat["batch1_p50_ms"] <= lat["batch1_p95_ms"] and lat["throughput"] > 0
    exits = executor(images).exits
    assert lat["exit_fractions"] == pytest.approx((torch.bincount(exits, minlength=5) / 6).tolist())
    assert lat["mean_cost"] == pytest.approx((exits + 1).double().mean().item())
    assert math.isfinite(lat["throughput"])
    with pytest.raises(ValueError, match=r"images must be a non-empty batch \(N, C, H, W\)"):
        measure_latency(executor, images[0])
    with pytest.raises(ValueError, match="batch_size and repeats must be >= 1"):
        measure_latency(executor, images, batch_size=0)
