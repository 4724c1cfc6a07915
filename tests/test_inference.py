"""Adaptive inference: the reference budgeted evaluation, policies, threshold search and files,
the early-exit executor against the simulated evaluation (export: test_export.py)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_exits  # noqa: F401
from timm_exits import MSDNet, add_exits
from timm_exits.inference import (IMTA_Q, REFERENCE_Q, EarlyExitExecutor, ExitOutputs, Thresholds,
                                  anytime_accuracy, assign_exits, budgeted_curve, exit_scores,
                                  fit_thresholds, geometric_fractions, thresholds_for_accuracy, thresholds_for_cost)
from msdnet_reference import reference_dynamic_eval, reference_fractions, reference_thresholds

# a worked example of the reference budgeted evaluation (quota rule), checked by hand: max confidence and
# correctness per sample, exits 0..2, costs 10/20/30
CONF = [[.95, .90, .90, .85, .80, .70, .65, .60, .55, .52],
        [.60, .99, .70, .97, .93, .55, .91, .88, .86, .75],
        [.80, .85, .90, .95, .99, .70, .75, .65, .60, .97]]
CORRECT = [[1, 1, 0, 1, 0, 1, 0, 1, 0, 0],
           [1, 1, 1, 1, 0, 0, 1, 1, 0, 1],
           [1, 1, 1, 1, 1, 0, 1, 1, 0, 1]]


def worked_example() -> ExitOutputs:
    """Two classes, label 0: a correct exit puts its confidence on class 0, a wrong one on class 1."""
    conf = torch.tensor(CONF)
    correct = torch.tensor(CORRECT).bool()
    p0 = torch.where(correct, conf, 1 - conf)
    return ExitOutputs.from_probs(torch.stack([p0, 1 - p0], -1), torch.zeros(10, dtype=torch.long))


def test_reference_worked_example():
    out = worked_example()
    (point,) = budgeted_curve(out, out, [10, 20, 30], q_grid=[1.0])
    assert [math.floor(10 * f) for f in geometric_fractions(1.0, 3)[:2]] == [3, 3]
    assert point.thresholds == pytest.approx([0.90, 0.91, -1e8])
    assert point.accuracy == pytest.approx(60.0) and point.cost == pytest.approx(21.0)
    assert point.exit_fractions == pytest.approx([0.3, 0.3, 0.4])


def test_ties_zero_quotas_and_the_grids():
    scores = exit_scores(worked_example().probs)
    # quota 2 at exit 0: the 2nd most confident is a 0.90, and both 0.90 samples exit (>=)
    thresholds = fit_thresholds(scores, [0.2, 0.0, 0.8])
    assert thresholds[0].item() == pytest.approx(0.90)
    assert (assign_exits(scores, thresholds) == 0).sum() == 3
    assert thresholds[1].item() == 1e8 and thresholds[2].item() == -1e8  # quota 0: nobody exits at 1
    assert len(REFERENCE_Q) == 39 and REFERENCE_Q[0] == 0.05 and REFERENCE_Q[-1] == 1.95
    assert len(IMTA_Q) == 40 and IMTA_Q[-1] == 2.0
    assert sum(geometric_fractions(0.5, 5)) == pytest.approx(1.0)


def test_anytime_accuracy_and_ensemble():
    out = worked_example()
    top = anytime_accuracy(out, topk=(1, 2))
    assert top["top1"] == pytest.approx([50.0, 70.0, 80.0]) and top["top2"] == [100.0] * 3
    ens = anytime_accuracy(out, topk=(1,), ensemble=True)["top1"]
    averaged = out.probs.cumsum(0)[1].argmax(-1)
    assert ens[1] == pytest.approx(100 * (averaged == 0).float().mean().item())


def test_policies():
    probs = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.2, 0.8], [0.9, 0.1]], [[0.3, 0.7], [0.1, 0.9]]])
    entropy = exit_scores(probs, "entropy")
    assert entropy[0].tolist() == pytest.approx([0.0, 1.0])
    patience = exit_scores(probs, "patience")
    # sample 0 predicts 0 (tie -> first), 1, 1; sample 1 predicts 0, 0, 1
    assert patience.tolist() == [[1, 1], [1, 2], [2, 1]]
    with pytest.raises(ValueError, match="policy must be one of"):
        exit_scores(probs, "confidence")


def _random_outputs(n=400, exits=4, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(exits, n, classes, generator=g)
    logits[:, torch.arange(n), labels] += torch.linspace(0.5, 3.0, exits).view(-1, 1)  # later exits better
    return ExitOutputs(logits, labels)


def test_threshold_search_for_a_cost_and_an_accuracy():
    val = _random_outputs()
    costs = [10.0, 20.0, 30.0, 40.0]
    point = thresholds_for_cost(val, costs, 25.0)
    assert point.val_cost <= 25.0
    # no geometric-grid point with cost <= 25 is more accurate
    grid = budgeted_curve(val, val, costs, [0.01 * k for k in range(1, 400)])
    assert all(p.val_accuracy <= point.val_accuracy + 1e-9 for p in grid if p.val_cost <= 25.0)
    acc = thresholds_for_accuracy(val, costs, point.val_accuracy)
    assert acc.val_accuracy >= point.val_accuracy and acc.val_cost <= point.val_cost + 1e-9
    with pytest.raises(ValueError, match="no thresholds reach an average cost of 5"):
        thresholds_for_cost(val, costs, 5.0)
    with pytest.raises(ValueError, match="no thresholds reach 99.5% on the validation split"):
        thresholds_for_accuracy(val, costs, 99.5)


def test_thresholds_file_round_trip_and_mismatches(tmp_path):
    path = tmp_path / "thresholds.json"
    Thresholds("msdnet_cifar_7exit", 3, "maxprob", [0.9, 0.8, -1e8], [1.0, 2.0, 3.0]).save(str(path))
    assert not list(tmp_path.glob("*.tmp"))
    loaded = Thresholds.load(str(path), model="msdnet_cifar_7exit", num_exits=3)
    assert loaded.thresholds == [0.9, 0.8, -1e8] and loaded.policy == "maxprob"
    with pytest.raises(ValueError, match="holds thresholds for 'msdnet_cifar_7exit', not for 'resnet18_exits'"):
        Thresholds.load(str(path), model="resnet18_exits")
    with pytest.raises(ValueError, match="holds 3 thresholds, the model has 5 exits"):
        Thresholds.load(str(path), num_exits=5)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not a valid thresholds file"):
        Thresholds.load(str(path))
    with pytest.raises(ValueError, match="2 thresholds for 3 exits"):
        Thresholds("m", 3, "maxprob", [0.5, -1e8])


def _tiny_msdnet():
    torch.manual_seed(0)
    return MSDNet(num_blocks=3, base=1, step=1, step_mode="lin_grow", num_channels=8, growth_rate=4, gr_factor="1-2-4",
                  bn_factor="1-2-4", stem_type="cifar", head_channels=16, num_classes=5, img_size=32).eval()


def _tiny_resnet():
    torch.manual_seed(0)
    return add_exits(timm.create_model("resnet18", num_classes=5)).eval()


@pytest.mark.parametrize("make", [_tiny_msdnet, _tiny_resnet])
@pytest.mark.parametrize("policy", ["maxprob", "entropy", "patience"])
def test_executor_equals_the_simulated_evaluation(make, policy):
    model = make()
    x = torch.randn(48, 3, 32, 32)
    with torch.no_grad():
        logits = torch.stack(model.forward_exits(x))
    out = ExitOutputs(logits, torch.zeros(48, dtype=torch.long))
    scores = exit_scores(out.probs, policy)
    if policy == "patience":  # integer scores: exit once two consecutive exits agree
        thresholds = torch.tensor([2.0] * (model.num_exits - 1) + [-1e8], dtype=torch.float64)
    else:
        thresholds = fit_thresholds(scores, geometric_fractions(0.7, model.num_exits))
    simulated = assign_exits(scores, thresholds)
    if policy != "patience":
        assert len(simulated.unique()) > 1  # samples really leave at different exits
    batch_sizes = []
    stage = model.forward_stage
    model.forward_stage = lambda s, i: (batch_sizes.append((s if torch.is_tensor(s) else s[0]).shape[0]), stage(s, i))[1]
    costs = [1.0, 2.0, 3.0, 4.0][:model.num_exits]
    result = EarlyExitExecutor(model, thresholds.tolist(), policy, costs)(x)
    assert torch.equal(result.exits, simulated)
    assert torch.allclose(result.logits, logits[simulated, torch.arange(48)], atol=1e-5)
    assert torch.equal(result.preds, out.probs.argmax(-1)[simulated, torch.arange(48)])
    assert result.costs.tolist() == [costs[k] for k in simulated.tolist()]
    # batch compaction: each stage sees only the samples that have not exited
    expected = [48] + [int((simulated >= k).sum()) for k in range(1, model.num_exits)]
    assert batch_sizes == expected[:len(batch_sizes)]
    if policy != "patience":
        assert batch_sizes[-1] < 48


def test_executor_rejects_mismatched_thresholds():
    with pytest.raises(ValueError, match="2 thresholds for 3 exits"):
        EarlyExitExecutor(_tiny_msdnet(), [0.5, -1e8])
    with pytest.raises(ValueError, match="policy must be one of"):
        EarlyExitExecutor(_tiny_msdnet(), [0.5, 0.5, -1e8], policy="confidence")
    with pytest.raises(ValueError, match="thresholds must be finite"):
        EarlyExitExecutor(_tiny_msdnet(), [float("nan"), 0.5, -1e8])


def test_executor_refuses_a_model_in_training_mode():
    model = _tiny_msdnet()
    executor = EarlyExitExecutor(model, [0.5, 0.5, -1e8])
    x = torch.randn(4, 3, 32, 32)
    assert executor(x).preds.shape == (4,)
    model.train()
    before = model.stem.convs[0].bn.running_mean.clone()
    with pytest.raises(ValueError, match=r"evaluation mode \(call model.eval\(\)\)"):
        executor(x)
    assert torch.equal(before, model.stem.convs[0].bn.running_mean)  # nothing ran: statistics untouched


@pytest.mark.parametrize("fields, message", [
    (dict(thresholds=[0.5, float("inf"), -1e8]), "thresholds must be finite"),
    (dict(costs=[1.0, 2.0]), "2 costs for 3 exits"),
    (dict(costs=[1.0, float("nan"), 3.0]), "costs must be finite"),
    (dict(costs=[1.0, 3.0, 2.0]), "cumulative"),
    (dict(policy="confidence"), "policy must be one of"),
])
def test_thresholds_files_refuse_what_cannot_be_right(tmp_path, fields, message):
    valid = dict(model="m", num_exits=3, policy="maxprob", thresholds=[0.5, 0.4, -1e8], costs=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=message):
        Thresholds(**{**valid, **fields})
    path = tmp_path / "thresholds.json"  # a hand-edited file: the same check on load, naming the file
    path.write_text(json.dumps({**valid, **fields}))
    with pytest.raises(ValueError, match=f"{path} is not a valid thresholds file.*{message}"):
        Thresholds.load(str(path))


def _reference_quotas(n: int, q: float, num_exits: int):
    """MSDNet-PyTorch's quotas: floor(n * P_k) with a float32 product."""
    probs = reference_fractions(q, num_exits)
    return [math.floor(n * probs[k]) for k in range(num_exits)]


def test_exit_quotas_use_the_references_float32_arithmetic():
    from timm_exits.quotas import exit_quotas

    for num_exits in (3, 5, 7):
        for q in REFERENCE_Q:
            fractions = geometric_fractions(q, num_exits)
            for n in range(1, 301):
                assert exit_quotas(n, fractions) == _reference_quotas(n, q, num_exits), (num_exits, q, n)
    # a case where float64 arithmetic gives another quota (53), hence another threshold
    assert _reference_quotas(211, 1.5, 5)[3] == 54
    scores = torch.zeros(5, 211, dtype=torch.float64)
    scores[3] = torch.linspace(1.0, 0.0, 211, dtype=torch.float64)  # exit 4: sample i is the (i+1)-th most confident
    fractions = geometric_fractions(1.5, 5)
    thresholds = fit_thresholds(scores, [0.0, 0.0, 0.0, fractions[3], fractions[4]])  # exits 1-3: quota 0
    assert thresholds[3] == scores[3, 53]  # the 54th most confident sample sets exit 4's threshold


def _cached_softmax_cases():
    """(name, val probs, val labels, test probs, test labels, costs): cached float32 softmax outputs as the
    reference stores them, plain, with many ties, rounded (rows no longer sum to one) and n = 211 with 5
    exits (where the float32 quotas matter)."""
    g = torch.Generator().manual_seed(0)

    def split(exits, n, classes, make):
        return make(exits, n, classes), torch.randint(0, classes, (n,), generator=g)

    def soft(exits, n, classes):
        return (3 * torch.randn(exits, n, classes, generator=g)).softmax(-1)

    def ties(exits, n, classes):
        return torch.randint(0, 3, (exits, n, classes), generator=g).float().softmax(-1)

    def rounded(decimals):
        return lambda *shape: (soft(*shape) * 10 ** decimals).round() / 10 ** decimals

    for name, shape, make, costs in [("softmax", (3, 100, 10), soft, [10.0, 20.0, 30.0]),
                                     ("ties", (4, 120, 4), ties, [1.0, 2.0, 3.0, 4.0]),
                                     ("rounded to 0.01", (4, 150, 10), rounded(2), [5.0, 6.0, 9.0, 12.0]),
                                     ("rounded to 0.1", (3, 90, 5), rounded(1), [1.0, 2.0, 4.0]),
                                     ("n = 211, 5 exits", (5, 211, 10), soft, [1.0, 2.0, 3.0, 4.0, 5.0]),
                                     ("n = 211, 5 exits, rounded", (5, 211, 10), rounded(2), [1.0, 2.0, 3.0, 4.0, 5.0])]:
        yield (name, *split(*shape, make), *split(*shape, make), costs)


def test_budgeted_search_on_cached_softmaxes_equals_the_reference():
    """MSDNet-PyTorch's threshold search and evaluation (restated in msdnet_reference.py) on its cached
    softmax outputs: the same thresholds bit for bit, accuracies and costs at all 39 q of 6 cases."""
    for name, val_p, val_y, test_p, test_y, costs in _cached_softmax_cases():
        curve = budgeted_curve(ExitOutputs.from_probs(val_p, val_y), ExitOutputs.from_probs(test_p, test_y), costs)
        for point in curve:
            thresholds = reference_thresholds(val_p, reference_fractions(point.q, len(costs)))
            assert point.thresholds == thresholds, (name, point.q)
            val_acc, _ = reference_dynamic_eval(val_p, val_y, thresholds, costs)
            acc, cost = reference_dynamic_eval(test_p, test_y, thresholds, costs)
            assert point.val_accuracy == pytest.approx(val_acc, abs=1e-9), (name, point.q)
            assert (point.accuracy, point.cost) == pytest.approx((acc, cost), abs=1e-9), (name, point.q)


def test_outputs_given_as_probabilities_are_read_as_given():
    """Rounded probabilities (rows summing to 0.97 .. 1.03) reach every consumer unchanged."""
    from timm_exits.inference import exit_calibration, lambda_losses

    probs = torch.tensor([[[0.50, 0.49], [0.30, 0.70], [0.99, 0.03], [0.34, 0.66]],
                          [[0.49, 0.50], [0.70, 0.30], [0.97, 0.03], [0.66, 0.33]]])
    labels = torch.tensor([0, 1, 0, 1])
    out = ExitOutputs.from_probs(probs, labels)
    assert out.probs is probs and out.logits is None and not out.raw_logits
    assert out.preds.tolist() == [[0, 1, 0, 1], [1, 0, 0, 0]]
    assert out.subset(torch.tensor([2, 0])).probs.tolist() == probs[:, [2, 0]].tolist()
    assert anytime_accuracy(out, topk=(1,))["top1"] == [100.0, 25.0]
    # exit 0 of sample 0 is 0.50 (not the renormalised 0.5051): with a threshold of 0.5 it leaves there
    assert exit_scores(out.probs)[0, 0].item() == 0.5
    (point,) = budgeted_curve(out, out, [1.0, 2.0], q_grid=[1.0])
    assert point.thresholds == [probs[0, 1, 1].item(), -1e8]  # the 2nd most confident of 4, as given
    per_exit = exit_calibration(out)
    truth = probs[0, torch.arange(4), labels].double()
    assert per_exit[0]["nll"] == pytest.approx(-truth.log().mean().item(), rel=1e-12)
    brier = (probs[0].double() - torch.eye(2, dtype=torch.float64)[labels]).pow(2).sum(-1).mean().item()
    assert per_exit[0]["brier"] == pytest.approx(brier, rel=1e-6)
    table = lambda_losses(out, loss="brier-gap", lambdas=[1.0, 0.6, 0.0])
    assert table.exits.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]]  # 0.66 > 0.6 leaves, 0.50 does not
    with pytest.raises(ValueError, match=r"expected probabilities in \[0, 1\] \(for logits use ExitOutputs"):
        ExitOutputs.from_probs(probs - 0.5, labels)


def test_writing_a_report_leaves_the_process_matplotlib_backend_alone(tmp_path):
    """A user's process (a notebook, an interactive backend) keeps its backend and pyplot figures."""
    tests = Path(__file__).resolve().parent
    code = (
        f"import sys; sys.path.insert(0, {str(tests)!r})\n"
        "import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot as plt\n"
        "from timm_exits.inference.report import evaluation_report, write_report\n"
        "from test_inference import worked_example\n"
        "mine = plt.figure()\n"
        "report = evaluation_report(worked_example(), worked_example(), [10, 20, 30], model='tiny')\n"
        f"paths = write_report(report, {str(tmp_path)!r})\n"
        "print(matplotlib.get_backend(), plt.get_fignums() == [mine.number], open(paths['png'], 'rb').read(8))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tests.parent)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[:2] == ["svg", "True"] and "PNG" in run.stdout
