"""Exit policies: scores, strict vs non-strict on ties, the fallback rules, threshold files, and the
early-exit executor equal to the cached simulation for every policy on a real model."""
import json
import math

import pytest
import timm
import torch

import timm_exits  # noqa: F401
from timm_exits.inference import (EarlyExitExecutor, ExitOutputs, ExitPolicy, Thresholds, assign_exits,
                                  collect_outputs, exit_scores, fit_thresholds, geometric_fractions)

from helpers import randomise_norms


def test_scores_by_hand():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]])  # one exit, two samples
    assert exit_scores(probs, "maxprob")[0].tolist() == pytest.approx([0.7, 0.4])
    assert exit_scores(probs, "margin")[0].tolist() == pytest.approx([0.5, 0.0])  # top-1 minus top-2
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert exit_scores(probs, ExitPolicy("entropy"))[0, 0].item() == pytest.approx(1 - entropy / math.log(3))


# scores (exits x samples): sample 0 ties the threshold at exit 0; sample 3 no exit accepts, and its
# highest score is tied between exits 0 and 1
SCORES = torch.tensor([[0.5, 0.6, 0.4, 0.45],
                       [0.9, 0.5, 0.8, 0.45],
                       [0.1, 0.2, 0.3, 0.2]])
THRESHOLDS = torch.tensor([0.5, 0.5, 0.99], dtype=torch.float64)  # the last one is never used


@pytest.mark.parametrize("policy, expected", [
    (ExitPolicy(), [0, 0, 1, 2]),  # >=: the tie exits
    (ExitPolicy(strict=True), [1, 0, 1, 2]),  # >: the tie goes on
    (ExitPolicy(fallback="most_confident"), [0, 0, 1, 0]),  # sample 3: exits 0 and 1 tie at 0.45, the earlier wins
    (ExitPolicy(strict=True, fallback="most_confident"), [1, 0, 1, 0]),
])
def test_strictness_and_fallback_by_hand(policy, expected):
    assert assign_exits(SCORES, THRESHOLDS, policy).tolist() == expected
    assert assign_exits(SCORES, torch.tensor([0.5, 0.5, -1e8]), policy).tolist() == expected
    # the same through the string shorthand: the MSDNet rule
    if policy == ExitPolicy():
        assert assign_exits(SCORES, THRESHOLDS, "maxprob").tolist() == expected


def test_a_tie_through_real_softmax_values():
    # logits (0, 0) give exactly 0.5: a threshold of 0.5 lets it leave with >=, not with >
    out = ExitOutputs(torch.tensor([[[0.0, 0.0]], [[3.0, 0.0]]]), torch.zeros(1, dtype=torch.long))
    scores = exit_scores(out.probs)
    assert scores[0, 0].item() == 0.5
    assert assign_exits(scores, [0.5, 0.5]).tolist() == [0]
    assert assign_exits(scores, [0.5, 0.5], ExitPolicy(strict=True)).tolist() == [1]


def test_policy_errors():
    with pytest.raises(ValueError, match=r"fallback must be one of \('last', 'most_confident'\), got 'first'"):
        ExitPolicy(fallback="first")
    with pytest.raises(ValueError, match="policy must be one of"):
        ExitPolicy("confidence")
    with pytest.raises(ValueError, match="strict must be True or False"):
        ExitPolicy(strict="yes")
    with pytest.raises(ValueError, match="2 thresholds for 3 exits"):
        assign_exits(SCORES, [0.5, 0.5])
    with pytest.raises(ValueError, match="margin score needs at least 2 classes"):
        exit_scores(torch.ones(1, 3, 1), "margin")


def test_outputs_keep_logits_and_collect_them():
    torch.manual_seed(0)
    model = timm.create_model("msdnet_cifar_5exit", num_classes=3, num_channels=4, growth_rate=2).eval()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    out = collect_outputs(model, [(x[:4], y[:4]), (x[4:], y[4:])], progress=False)
    with torch.no_grad():
        expected = torch.stack(model.forward_exits(x))
    assert out.logits.dtype == torch.float32 and out.logits.shape == (5, 6, 3)
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert torch.allclose(out.probs, expected.softmax(-1), atol=1e-6)
    assert torch.equal(out.preds, out.probs.argmax(-1))
    probs = torch.tensor([[[0.25, 0.75]]])
    assert torch.allclose(ExitOutputs.from_probs(probs, torch.zeros(1, dtype=torch.long)).probs, probs)
    with pytest.raises(ValueError, match=r"expected logits of shape \(exits, samples, classes\)"):
        ExitOutputs(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))


def test_threshold_files_record_the_policy_and_old_files_keep_the_old_rule(tmp_path):
    path = tmp_path / "thresholds.json"
    policy = ExitPolicy("margin", "most_confident", strict=True)
    Thresholds("m", 3, policy, [0.5, 0.4, -1e8]).save(str(path))
    saved = json.loads(path.read_text())
    assert (saved["policy"], saved["fallback"], saved["strict"]) == ("margin", "most_confident", True)
    assert Thresholds.load(str(path)).exit_policy == policy
    del saved["fallback"], saved["strict"]  # a file written before these were recorded
    path.write_text(json.dumps(saved))
    assert Thresholds.load(str(path)).exit_policy == ExitPolicy("margin", "last", strict=False)
    path.write_text(json.dumps({**saved, "fallback": "first"}))
    with pytest.raises(ValueError, match="is not a valid thresholds file.*fallback must be one of"):
        Thresholds.load(str(path))


def _tiny_model():
    """Random norms spread the exits' confidences (fresh timm norms give near-uniform softmaxes)."""
    torch.manual_seed(0)
    return randomise_norms(timm.create_model("msdnet_cifar_5exit", num_classes=3, num_channels=4, growth_rate=2)).eval()


def _diverse_images(n: int) -> torch.Tensor:
    """Images of growing contrast and random colour offsets, so that a random model's exits disagree."""
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 3, 32, 32, generator=g) * torch.linspace(0.2, 20, n).view(-1, 1, 1, 1)
            + 3 * torch.randn(n, 3, 1, 1, generator=g))


POLICIES = [ExitPolicy(score, fallback, strict) for score in ("maxprob", "entropy", "margin", "patience")
            for fallback in ("last", "most_confident") for strict in (False, True)]


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_executor_equals_the_cached_simulation(policy, context):
    model = _tiny_model()
    n, last = 64, model.num_exits - 1
    x = _diverse_images(n)
    with torch.no_grad():
        logits = torch.stack(model.forward_exits(x))
    out = ExitOutputs(logits, torch.zeros(n, dtype=torch.long))
    scores = exit_scores(out.probs, policy)
    if policy.score == "patience":  # exit once 3 consecutive exits agree: >= 3, or > 2
        thresholds = torch.tensor([2.0 if policy.strict else 3.0] * last + [-1e8], dtype=torch.float64)
    else:
        thresholds = fit_thresholds(scores, geometric_fractions(0.8, model.num_exits), policy)
    simulated = assign_exits(scores, thresholds, policy)
    unaccepted = ~torch.stack([policy.accepts(scores[k], thresholds[k]) for k in range(last)]).any(0)
    assert unaccepted.any() and (simulated < last).any()  # some samples leave early, some go to the fallback
    if policy.fallback == "most_confident":
        assert (simulated[unaccepted] < last).any()  # the fallback sends some of them back to an earlier exit
        assert torch.equal(simulated[unaccepted], scores[:, unaccepted].double().argmax(0))
    else:
        assert (simulated[unaccepted] == last).all()

    batch_sizes = []
    stage = model.forward_stage
    model.forward_stage = lambda s, i: (batch_sizes.append(s[0].shape[0]), stage(s, i))[1]
    with context():
        result = EarlyExitExecutor(model, thresholds.tolist(), policy, [1.0, 2.0, 3.0, 4.0, 5.0])(x)
    assert torch.equal(result.exits, simulated)
    rows = logits[simulated, torch.arange(n)]
    assert torch.allclose(result.logits, rows, atol=1e-5)
    assert torch.equal(result.preds, out.preds[simulated, torch.arange(n)])
    assert result.costs.tolist() == [float(k + 1) for k in simulated.tolist()]
    # batch compaction: stage k only sees the samples no earlier exit accepted
    reaching = [n] + [int((~torch.stack([policy.accepts(scores[j], thresholds[j]) for j in range(k)]).any(0)).sum())
                      for k in range(1, model.num_exits)]
    assert batch_sizes == reaching[:len(batch_sizes)] and batch_sizes[-1] < n


def test_executor_takes_the_policy_of_a_thresholds_file(tmp_path):
    model = _tiny_model()
    x = _diverse_images(16)
    policy = ExitPolicy("maxprob", "most_confident", strict=True)
    with torch.no_grad():
        probs = torch.stack(model.forward_exits(x)).softmax(-1)
    thresholds = [probs[0].max(-1).values.median().item()] * model.num_exits
    Thresholds("msdnet_cifar_5exit", 5, policy, thresholds).save(str(tmp_path / "t.json"))
    from_file = EarlyExitExecutor(model, Thresholds.load(str(tmp_path / "t.json")))(x)
    assert from_file.exits.tolist() == assign_exits(exit_scores(probs), thresholds, policy).tolist()
    assert EarlyExitExecutor(model, thresholds, policy)(x).exits.tolist() == from_file.exits.tolist()
