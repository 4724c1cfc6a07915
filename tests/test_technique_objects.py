"""The technique objects every trainer shares: built from the engine's config schema with their own
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
from timm_exits.train import (ADN, HDKD, CrossEntropy, OneForAll, PCGrad, adn_step, create_technique,
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


def _config(**changes):
    return {**copy.deepcopy(DEFAULTS["technique"]), **changes}


@pytest.mark.parametrize("changes, kind, temperature", [
    (dict(), CrossEntropy, None),
    (dict(deconfliction="pcgrad"), PCGrad, None),
    (dict(loss="ofa"), OneForAll, 3.0),
    (dict(loss="hdkd"), HDKD, 4.0),
    (dict(loss="adn"), ADN, 1.0),
    (dict(loss="adn", temperature=2.5), ADN, 2.5),
])
def test_the_config_section_builds_the_technique_with_its_own_defaults(changes, kind, temperature):
    technique = create_technique(**_config(**changes))
    assert type(technique) is kind and technique.loss == _config(**changes)["loss"]
    assert getattr(technique, "temperature", None) == temperature  # temperature=None: the technique's default


def test_options_of_the_config_reach_the_technique():
    pcgrad = create_technique(**_config(deconfliction="pcgrad", pcgrad=dict(scope="tensor", order="deep_first",
                                                                           protect_deeper=True)), seed=7)
    assert (pcgrad.scope, pcgrad.order, pcgrad.protect_deeper) == ("tensor", "deep_first", True)
    assert torch.equal(pcgrad.generator.get_state(), torch.Generator().manual_seed(7).get_state())
    hdkd = create_technique(**_config(loss="hdkd", alpha=0.3, hdkd=dict(lr=0.1, xi=0.01, init="dbt", ratio_reg=False,
                                                                        interval=3)))
    assert (hdkd.alpha, hdkd.lr, hdkd.xi, hdkd.init, hdkd.ratio_reg, hdkd.interval) == (0.3, 0.1, 0.01, "dbt", False, 3)
    assert [hdkd.due(step) for step in range(4)] == [True, False, False, True]


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
    heads, teacher = TrainingForward(phase_two)(x)
    torch.testing.assert_close(OneForAll(temperature=2.0, gamma=0.5).losses((heads, teacher), y)["ofa"],
                               one_for_all_distillation(heads, teacher, y, 2.0, 0.5))


def test_steps_equal_the_plain_functions_and_pcgrad_keeps_its_order_in_its_state():
    model, reference = _msdnet(), _msdnet()
    x, y = _batch()
    technique = PCGrad(seed=3)
    technique.step(technique.prepare(model), TrainingForward(model), x, y)
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
    terms = ADN(alpha=0.3, topk=3).step(ADN().prepare(adn), TrainingForward(adn), x, y)
    expected = adn_step(adn_reference, x, y, alpha=0.3, topk=3)
    assert terms.keys() == expected.keys() and all(torch.equal(terms[k], expected[k]) for k in terms)


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
    with pytest.raises(ValueError, match="loss must be one of"):
        create_technique("focal")
    with pytest.raises(ValueError, match="it needs loss='ce'"):
        create_technique(**_config(loss="hdkd", deconfliction="pcgrad"))
    with pytest.raises(ValueError, match=r"unknown pcgrad option\(s\) \['mode'\]; expected some of"):
        create_technique(**_config(deconfliction="pcgrad", pcgrad=dict(mode="tensor")))
    with pytest.raises(ValueError, match="pcgrad scope must be 'global', 'segment' or 'tensor'"):
        create_technique(**_config(deconfliction="pcgrad", pcgrad=dict(scope="layer")))
    with pytest.raises(ValueError, match=r"unknown hdkd option\(s\) \['learning_rate'\]"):
        create_technique(**_config(loss="hdkd", hdkd=dict(learning_rate=0.1)))
    with pytest.raises(ValueError, match="hdkd interval must be >= 1, got 0"):
        create_technique(**_config(loss="hdkd", hdkd=dict(interval=0)))
    with pytest.raises(ValueError, match="reduction must be 'batchmean' or 'mean'"):
        create_technique(**_config(loss="ofa", reduction="sum"))
    with pytest.raises(RuntimeError, match="built by prepare"):
        HDKD().losses(*_batch())
    with pytest.raises(ValueError, match="needs a multi-exit model"):
        HDKD().prepare(timm.create_model("resnet18", num_classes=3))
