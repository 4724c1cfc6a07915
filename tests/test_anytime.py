"""Anytime predictions from cached exits (product / caching anytime) and conditional monotonicity,
against hand-computed tiny cases and the rules re-stated from the paper's equations."""
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from timm_exits.inference import ExitOutputs
from timm_exits.inference.anytime import (MONOTONICITY_DELTAS, caching_anytime, conditional_monotonicity,
                                          ground_truth_probability, product_anytime)

# 2 exits x 2 samples x 3 classes. Sample 0 keeps classes 0 and 1 alive; sample 1 has no positive
# logit at exit 0, so its product is zero for every class at both exits (the all-zero case).
LOGITS = torch.tensor([[[1.0, 4.0, -1.0], [-1.0, -2.0, 0.0]],
                       [[2.0, 1.0, 3.0], [0.5, 0.2, 0.1]]])


def test_product_anytime_by_hand_with_the_all_zero_fallback():
    pa = product_anytime(LOGITS)  # weights m/L = 1/2, 1
    assert pa.dtype == torch.float32 and pa.shape == LOGITS.shape
    # exit 0: relu([1, 4, -1]) ** 0.5 = [1, 2, 0]; exit 1: [1, 2, 0] * [2, 1, 3] = [2, 2, 0]
    assert pa[0, 0].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert pa[1, 0].tolist() == pytest.approx([0.5, 0.5, 0.0])
    # sample 1 collapsed: the fallback is the current exit's softmax
    assert torch.allclose(pa[0, 1], LOGITS[0, 1].softmax(-1)) and torch.allclose(pa[1, 1], LOGITS[1, 1].softmax(-1))
    # without the fallback the collapsed rows are 0/0, as in the reference
    raw = product_anytime(LOGITS, fallback=False)
    assert raw[:, 1].isnan().all() and torch.allclose(raw[:, 0], pa[:, 0])


def test_product_anytime_weights_clipping_and_floor():
    uniform = product_anytime(LOGITS, weights=[1.0, 1.0])
    assert uniform[0, 0].tolist() == pytest.approx([0.2, 0.8, 0.0])  # [1, 4, 0] / 5
    assert uniform[1, 0].tolist() == pytest.approx([2 / 6, 4 / 6, 0.0])  # [2, 4, 0] / 6
    # a zero weight makes its exit's factor 1 (0 ** 0 = 1): exit 0 is uniform, nothing collapses
    zero_first = product_anytime(LOGITS, weights=[0.0, 1.0])
    assert zero_first[0].flatten().tolist() == pytest.approx([1 / 3] * 6)
    assert zero_first[1, 0].tolist() == pytest.approx([2 / 6, 1 / 6, 3 / 6])
    clipped = product_anytime(LOGITS, weights=[1.0, 1.0], ceiling=2.0)
    assert clipped[0, 0].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])  # [1, 2, 0] / 3
    floored = product_anytime(LOGITS, weights=[1.0, 1.0], floor=0.5)
    assert floored[0, 1].tolist() == pytest.approx([1 / 3] * 3)  # max(z, 0.5) = 0.5 everywhere


def restated_product(logits, weights, activation):
    """pi_l(c) ∝ prod_{m<=l} g(z_mc) ** w_m, one sample and exit at a time (no fallback)."""
    num_exits, n, c = logits.shape
    out = torch.empty(num_exits, n, c, dtype=torch.float64)
    for i in range(n):
        product = [1.0] * c
        for l in range(num_exits):
            product = [product[k] * activation(float(logits[l, i, k])) ** weights[l] for k in range(c)]
            total = sum(product)
            out[l, i] = torch.tensor([p / total if total > 0 else math.nan for p in product])
    return out


def test_product_anytime_equals_the_restated_rule_on_random_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 30, 5) * 2 + 1.5  # shifted so that few samples collapse
    w = [(m + 1) / 4 for m in range(4)]
    relu = restated_product(logits, w, lambda z: max(z, 0.0))
    pa = product_anytime(logits).double()
    alive = ~relu.isnan().any(-1)
    assert alive.float().mean() > 0.5
    assert torch.allclose(pa[alive], relu[alive], atol=1e-6)
    softplus = restated_product(logits, w, lambda z: math.log1p(math.exp(z)))
    assert torch.allclose(product_anytime(logits, softplus=True).double(), softplus, atol=1e-6)


def test_product_anytime_works_in_log_space():
    # softplus(-800) underflows to 0 even in float64; in log space the two classes keep the ratio e : 1
    logits = torch.tensor([[[-800.0, -801.0]], [[-800.0, -801.0]]])
    pa = product_anytime(logits, weights=[1.0, 1.0], softplus=True)
    assert pa[1, 0, 0].item() == pytest.approx(math.e ** 2 / (1 + math.e ** 2))
    # 300 exits of logit 1e3: the plain product (1e900) overflows float64
    big = torch.full((300, 1, 2), 1e3)
    big[:, 0, 1] = 5e2
    assert product_anytime(big, weights=[1.0] * 300)[-1, 0, 0].item() == pytest.approx(1.0)


def test_caching_anytime_by_hand():
    probs = torch.tensor([[[0.6, 0.4], [0.5, 0.5]],
                          [[0.3, 0.7], [0.2, 0.8]],
                          [[0.9, 0.1], [0.8, 0.2]]])
    ca = caching_anytime(probs)
    # sample 0: max-prob 0.6, 0.7, 0.9 -> exits 0, 1, 2; sample 1: 0.5, 0.8, 0.8 (tie: the later exit)
    assert torch.equal(ca[:, 0], probs[[0, 1, 2], 0])
    assert torch.equal(ca[:, 1], probs[[0, 1, 2], 1])  # the earlier exit on ties would give [0.2, 0.8] at exit 2
    worse = torch.tensor([[[0.9, 0.1]], [[0.4, 0.6]]])
    assert caching_anytime(worse)[1, 0].tolist() == pytest.approx([0.9, 0.1])  # a less confident exit is ignored
    outputs = ExitOutputs.from_probs(probs, torch.tensor([0, 1]))
    torch.testing.assert_close(caching_anytime(outputs), ca)  # probabilities back from their logarithms


def three_samples() -> ExitOutputs:
    """Ground-truth probabilities (label 0 of 2 classes) of 3 samples over 3 exits: a monotone one,
    one that drops by 0.3 between adjacent exits, and one that drops by 0.1 twice (0.2 from exit 0 to 2)."""
    truth = torch.tensor([[0.2, 0.6, 0.7],
                          [0.5, 0.3, 0.6],
                          [0.9, 0.7, 0.5]]).T  # exits x samples
    return ExitOutputs.from_probs(torch.stack([truth, 1 - truth], -1), torch.zeros(3, dtype=torch.long))


def test_conditional_monotonicity_by_hand():
    result = conditional_monotonicity(three_samples(), deltas=[0.0, 0.05, 0.15, 0.25, 0.5])
    # largest drops 0, 0.3, 0.2: the 0.2 of sample 2 is between exits 0 and 2, not adjacent ones
    assert result == pytest.approx({0.0: 200 / 3, 0.05: 200 / 3, 0.15: 200 / 3, 0.25: 100 / 3, 0.5: 0.0})
    assert list(conditional_monotonicity(three_samples())) == list(MONOTONICITY_DELTAS)
    assert ground_truth_probability(three_samples()).tolist() == pytest.approx([1.6 / 3, 1.6 / 3, 1.8 / 3])


def test_conditional_monotonicity_equals_the_pairwise_rule():
    torch.manual_seed(1)
    probs = torch.randn(5, 200, 4).softmax(-1)
    labels = torch.randint(0, 4, (200,))
    deltas = [0.0, 0.01, 0.1, 0.2, 0.5]
    expected = {}
    for d in deltas:
        dropped = sum(any(probs[j, i, labels[i]] - probs[k, i, labels[i]] < -d
                          for k, j in itertools.combinations(range(5), 2)) for i in range(200))
        expected[d] = 100 * dropped / 200
    assert conditional_monotonicity(probs, labels, deltas) == pytest.approx(expected)
    assert 0 < expected[0.1] < expected[0.0]


def test_outputs_with_and_without_raw_logits():
    outputs = SimpleNamespace(logits=LOGITS, labels=torch.tensor([0, 2]))
    assert torch.equal(product_anytime(outputs), product_anytime(LOGITS))
    with pytest.raises(ValueError, match="no raw logits"):
        product_anytime(ExitOutputs.from_probs(LOGITS.softmax(-1), torch.tensor([0, 2])))


@pytest.mark.parametrize("call, match", [
    (lambda: product_anytime(LOGITS[0]), "exits, samples, classes"),
    (lambda: product_anytime(LOGITS[:, :0]), "at least one exit and one sample"),
    (lambda: product_anytime(LOGITS, weights=[1.0]), "2 finite non-negative weights"),
    (lambda: product_anytime(LOGITS, weights=[1.0, -1.0]), "non-negative"),
    (lambda: product_anytime(LOGITS, softplus=True, ceiling=3.0), "do not apply with softplus"),
    (lambda: product_anytime(LOGITS, floor=1.0, ceiling=0.5), "ceiling must be above floor"),
    (lambda: caching_anytime(LOGITS), "expected probabilities"),
    (lambda: conditional_monotonicity(product_anytime(LOGITS, fallback=False), torch.tensor([0, 1])), "NaN"),
    (lambda: conditional_monotonicity(LOGITS.softmax(-1), torch.tensor([0, 1, 2])), "labels of shape"),
    (lambda: conditional_monotonicity(LOGITS.softmax(-1), torch.tensor([0, 3])), r"class indices in \[0, 3\)"),
    (lambda: conditional_monotonicity(LOGITS.softmax(-1), torch.tensor([0, 1]), deltas=[1.0]), r"in \[0, 1\)"),
    (lambda: conditional_monotonicity(LOGITS.softmax(-1), torch.tensor([0, 1]), deltas=[-0.1]), r"in \[0, 1\)"),
    (lambda: ground_truth_probability(LOGITS.softmax(-1)), "labels of shape"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- product anytime online: ProductAnytimeModel, the executor and the thresholds' predictor ---

def _pa_msdnet():
    import timm
    import timm_exits  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    model = timm.create_model("msdnet_cifar_5exit", num_channels=4, growth_rate=2, num_classes=4).double().eval()
    with torch.no_grad():  # logits about N(0.2, 0.3^2): most rows stay alive, about one in eight collapses
        for name, p in model.named_parameters():
            if name.endswith("fc.weight"):
                p.normal_(0, 10)
            elif name.endswith("fc.bias"):
                p.fill_(0.2)
    return model


@pytest.mark.parametrize("options", [dict(), dict(weights=[1.0, 0.0, 2.0, 1.0, 0.5], ceiling=3.0),
                                     dict(softplus=True), dict(fallback=False)],
                         ids=["default", "weights_ceiling", "softplus", "no_fallback"])
def test_the_online_product_equals_product_anytime_on_cached_logits(options):
    from timm_exits.models.product_anytime import ProductAnytimeModel

    inner = _pa_msdnet()
    x = torch.randn(24, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        raw = torch.stack(inner.forward_exits(x))
        online = torch.stack(ProductAnytimeModel(inner, **options).forward_exits(x))
    expected = product_anytime(raw, **options).double()
    assert torch.equal(online.exp().isnan(), expected.isnan())  # the same collapsed rows (NaN without fallback)
    alive = ~expected.isnan()
    assert torch.allclose(online.exp()[alive], expected[alive], atol=1e-6)
    if not options:  # both branches of the rule are exercised: rows alive and rows that fell back
        collapsed = (product_anytime(raw, fallback=False).isnan().any(-1))
        assert 0 < collapsed.float().mean() < 1


def test_collected_product_outputs_are_not_taken_for_raw_logits():
    from timm_exits.inference import collect_outputs
    from timm_exits.models.product_anytime import ProductAnytimeModel

    inner = _pa_msdnet()
    batches = [(torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))]
    plain, answers = (collect_outputs(m, batches, progress=False) for m in (inner, ProductAnytimeModel(inner)))
    assert plain.raw_logits and not answers.raw_logits
    product_anytime(plain)  # the exits' logits: accepted
    with pytest.raises(ValueError, match="these outputs keep no raw logits"):
        product_anytime(answers)  # PA's log-probabilities are not logits to take the product of again


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_the_executor_on_the_product_takes_the_exits_of_the_cached_evaluation(grad_mode):
    from timm_exits.inference import EarlyExitExecutor, Thresholds, assign_exits
    from timm_exits.models.product_anytime import ProductAnytimeModel

    model = ProductAnytimeModel(_pa_msdnet())
    x = torch.randn(32, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        cached = ExitOutputs.from_probs(product_anytime(torch.stack(model.model.forward_exits(x))).double(),
                                        torch.zeros(32, dtype=torch.long))
    scores = cached.probs.max(-1).values
    thresholds = ((scores.sort(1).values[:, 10] + scores.sort(1).values[:, 11]) / 2).tolist()
    exits = assign_exits(scores, torch.tensor(thresholds))
    assert len(set(exits.tolist())) >= 3  # samples leave at several exits: the state is compacted
    with grad_mode():
        result = EarlyExitExecutor(model, Thresholds("tiny", 5, "maxprob", thresholds, predictor="product_anytime"))(x)
    assert torch.equal(result.exits, exits)
    assert torch.equal(result.preds, cached.preds.gather(0, exits.view(1, -1)).squeeze(0))


def test_thresholds_know_which_predictor_they_were_fitted_on(tmp_path):
    from timm_exits.inference import EarlyExitExecutor, Thresholds
    from timm_exits.models.product_anytime import ProductAnytimeModel

    plain = _pa_msdnet()
    pa = Thresholds("tiny", 5, "maxprob", [0.5] * 5, predictor="product_anytime")
    with pytest.raises(ValueError, match="fitted on the answers of 'product_anytime', the model gives 'exits'"):
        EarlyExitExecutor(plain, pa)
    with pytest.raises(ValueError, match="fitted on the answers of 'exits', the model gives 'product_anytime'"):
        EarlyExitExecutor(ProductAnytimeModel(plain), Thresholds("tiny", 5, "maxprob", [0.5] * 5))
    with pytest.raises(ValueError, match="predictor must be one of"):
        Thresholds("tiny", 5, "maxprob", [0.5] * 5, predictor="caching")
    pa.save(str(tmp_path / "t.json"))
    assert Thresholds.load(str(tmp_path / "t.json")).predictor == "product_anytime"
    old = tmp_path / "old.json"  # a file written before the field existed: the model's own exits
    old.write_text('{"model": "tiny", "num_exits": 5, "policy": "maxprob", "thresholds": [0.5, 0.5, 0.5, 0.5, 0.5]}')
    assert Thresholds.load(str(old)).predictor == "exits"


def test_the_product_model_refuses_bad_options():
    from timm_exits.models.product_anytime import ProductAnytimeModel

    with pytest.raises(ValueError, match="5 finite non-negative weights"):
        ProductAnytimeModel(_pa_msdnet(), weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="do not apply with softplus"):
        ProductAnytimeModel(_pa_msdnet(), softplus=True, floor=0.1)
