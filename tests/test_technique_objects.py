"""The technique objects every trainer shares: built from a config section with their own
defaults, their losses equal the plain functions', their state survives a round trip, and a config
mistake is refused with a message that names what was expected."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.config import DEFAULTS
from timm_exits.models.imta import IMTAModel
from timm_exits.train import (ADN, HDKD, CrossEntropy, OneForAll, PCGrad, PlainTrainer, adn_step, build_technique,
                              one_for_all_distillation, pcgrad_backward)
from timm_exits.train.hdkd import harmonized_loss, loss_terms
from timm_exits.train.techniques import TrainingForward

from helpers import randomise_norms

TINY = dict(num_classes=10, num_channels=4, growth_rate=2)


def _msdnet(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("msdnet_cifar_5exit", **TINY).train()


def _batch(n=4, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("section, kind, temperature", [
    (DEFAULTS["technique"], CrossEntropy, None),
    (dict(type="PCGrad"), PCGrad, None),
    (dict(type="OneForAll"), OneForAll, 3.0),
    (dict(type="HDKD"), HDKD, 4.0),
    (dict(type="ADN"), ADN, 1.0),
    (dict(type="ADN", temperature=2.5), ADN, 2.5),
])
def test_the_config_section_builds_the_technique_with_its_own_defaults(section, kind, temperature):
    technique = build_technique(copy.deepcopy(section))
    assert type(technique) is kind and technique.config()["type"] == section["type"]
    assert getattr(technique.options, "temperature", None) == temperature  # unset: the type's own default


def test_options_of_the_config_reach_the_technique():
    pcgrad = build_technique(dict(type="PCGrad", scope="tensor", order="deep_first", protect_deeper=True, seed=7))
    o = pcgrad.options
    assert (o.scope, o.order, o.protect_deeper) == ("tensor", "deep_first", True)
    assert torch.equal(pcgrad.generator.get_state(), torch.Generator().manual_seed(7).get_state())
    hdkd = build_technique(dict(type="HDKD", alpha=0.3, lr=0.1, xi=0.01, init="dbt", ratio_reg=False, interval=3))
    o = hdkd.options
    assert (o.alpha, o.lr, o.xi, o.init, o.ratio_reg, o.interval) == (0.3, 0.1, 0.01, "dbt", False, 3)
    model = hdkd.prepare(_msdnet())
    assert hdkd.optimizer.param_groups[0]["lr"] == 0.1 and (hdkd.weights()[1][:-1, -1] > 0.9).all()  # dbt: from the last
    loop = PlainTrainer(model, hdkd, torch.optim.SGD(model.parameters(), lr=0.1), held_out=[_batch(seed=9)])
    moved = []
    for step in range(4):  # a plain loop takes one update per batch: interval 3 updates the weights at 0 and 3
        before = [p.detach().clone() for p in hdkd.weights.parameters()]
        loop.step(*_batch(seed=step))
        moved.append(any(not torch.equal(a, p) for a, p in zip(before, hdkd.weights.parameters())))
    assert moved == [True, False, False, True]


def test_losses_equal_the_plain_functions():
    model = _msdnet()
    x, y = _batch()
    logits = model.forward_exits(x)
    ce = CrossEntropy(exit_weights=[1, 2, 3, 4, 5], label_smoothing=0.1).losses(logits, y)
    assert list(ce) == [f"exit{k}" for k in range(1, 6)]
    for k, z in enumerate(logits):
        torch.testing.assert_close(ce[f"exit{k + 1}"], (k + 1) * F.cross_entropy(z, y, label_smoothing=0.1))

    hdkd = HDKD(alpha=0.7, temperature=2.0)
    hdkd.prepare(model)
    expected = harmonized_loss(*loss_terms(logits, y, 2.0), tuple(w.detach() for w in hdkd.weights()), 0.7)
    torch.testing.assert_close(hdkd.losses(logits, y)["hdkd"], expected)

    phase_two = OneForAll(temperature=2.0, gamma=0.5).prepare(model)
    assert isinstance(phase_two, IMTAModel) and OneForAll().prepare(phase_two) is phase_two  # idempotent
    heads, teacher = TrainingForward(phase_two, OneForAll())(x)
    torch.testing.assert_close(OneForAll(temperature=2.0, gamma=0.5).losses((heads, teacher), y)["ofa"],
                               one_for_all_distillation(heads, teacher, y, 2.0, 0.5))


def _trainer(model, technique):
    """A plain loop around ``model`` as the trainer a step runs through (its optimizer is not stepped here)."""
    return PlainTrainer(model, technique, torch.optim.SGD(model.parameters(), lr=0.1))


def test_steps_equal_the_plain_functions_and_pcgrad_keeps_its_order_in_its_state():
    model, reference = _msdnet(), _msdnet()
    x, y = _batch()
    technique = PCGrad(seed=3)
    technique.train_step(_trainer(technique.prepare(model), technique), x, y).loss.backward()
    generator = torch.Generator().manual_seed(3)
    pcgrad_backward([F.cross_entropy(z, y) for z in reference.forward_exits(x)], list(reference.parameters()),
                    generator=generator)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)
    state = technique.state_dict()
    assert torch.equal(state["pcgrad_generator"], generator.get_state())
    other = PCGrad(seed=0)
    other.load_state_dict(state)
    assert torch.equal(other.generator.get_state(), generator.get_state())

    torch.manual_seed(0)
    adn = randomise_norms(timm.create_model("resnet18_adn", num_classes=6)).train()
    adn_reference = copy.deepcopy(adn)
    x, y = _batch(classes=6)
    technique = ADN(alpha=0.3, topk=3)
    result = technique.train_step(_trainer(technique.prepare(adn), technique), x, y)
    result.loss.backward()
    expected = adn_step(adn_reference, x, y, alpha=0.3, topk=3)  # two backward passes
    assert result.terms.keys() == expected.keys()
    assert all(torch.equal(result.terms[k].detach(), expected[k]) for k in expected)
    for (name, p), q in zip(adn.named_parameters(), adn_reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_hdkd_state_round_trip_and_weight_update():
    model = _msdnet()
    technique = HDKD(xi=0.05, lr=0.1)
    technique.prepare(model)
    technique.update_weights(model, _batch(seed=1), _batch(seed=2))
    assert technique.weights.ce_logits.abs().sum() > 0
    state = copy.deepcopy(technique.state_dict())
    other = HDKD(xi=0.05, lr=0.1)
    other.prepare(_msdnet(seed=1))
    assert other.weights.ce_logits.abs().sum() == 0  # uniform before loading
    other.load_state_dict(state)
    assert torch.equal(other.weights.kd_logits, technique.weights.kd_logits)
    assert torch.equal(other.val_loss.expected, technique.val_loss.expected)
    assert other.optimizer.state_dict()["state"][0]["step"] == 1


def test_mistakes_are_refused_with_what_was_expected():
    with pytest.raises(ValueError, match=r"unknown technique type 'focal'; the types: ADN, BoostNet"):
        build_technique(dict(type="focal"))
    with pytest.raises(ValueError, match=r"unknown technique type 'CrossEntropi' \(did you mean 'CrossEntropy'\?\)"):
        build_technique(dict(type="CrossEntropi"))
    with pytest.raises(ValueError, match=r"a technique is dict\(type=<name>, \*\*options\)"):
        build_technique(dict(alpha=0.5))
    with pytest.raises(ValueError, match=r"HDKD option deconfliction='pcgrad' is a technique of its own: "
                                         r"technique=dict\(type='PCGrad', ...\)"):
        build_technique(dict(type="HDKD", deconfliction="pcgrad"))
    with pytest.raises(ValueError, match=r"PCGrad has no option 'mode' \(did you mean 'order'\?\); its options: "
                                         r"gradient_equilibrium, .*, scope, order, protect_deeper, seed"):
        build_technique(dict(type="PCGrad", mode="tensor"))
    with pytest.raises(ValueError, match="PCGrad option scope must be 'global', 'segment' or 'tensor', got 'layer'"):
        build_technique(dict(type="PCGrad", scope="layer"))
    with pytest.raises(ValueError, match="HDKD has no option 'learning_rate'; its options: .*, lr, "):
        build_technique(dict(type="HDKD", learning_rate=0.1))
    with pytest.raises(ValueError, match="HDKD option interval must be an integer >= 1, got 0"):
        build_technique(dict(type="HDKD", interval=0))
    with pytest.raises(ValueError, match="OneForAll option reduction must be 'batchmean' or 'mean', got 'sum'"):
        build_technique(dict(type="OneForAll", reduction="sum"))
    model = _msdnet()
    with pytest.raises(RuntimeError, match="built by prepare"):
        HDKD().losses(model.forward_exits(_batch()[0]), _batch()[1])
    with pytest.raises(ValueError, match="needs a multi-exit model"):
        HDKD().prepare(timm.create_model("resnet18", num_classes=3))
