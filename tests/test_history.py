"""The exit-history state (timm_exits.models.history): a wrapper whose exits answer from what earlier
exits produced keeps that history in a state that slices by sample, so forward_exits, stage-by-stage
runs and the compacting early-exit executor agree; checked on a history of each kind (a running sum,
previous logits, stacked log-probabilities) over MSDNet and a timm backbone with exits."""
import pytest
import torch

import timm
import timm_exits  # noqa: F401  (registers the models)
from timm_exits.inference import EarlyExitExecutor
from timm_exits.models.history import ExitHistoryModel
from timm_exits.models.multi_exit import slice_state
from timm_exits.models.boostnet import BoostedExits
from timm_exits.models.ztw import ZTWModel


class Counting(ExitHistoryModel):
    """Exit i answers with the mean of the logits of exits 0..i (a running sum and a count)."""

    def combine(self, logits, history, index):
        total = logits if not history else logits + history[0]
        return total / (index + 1), [total]


def _msdnet():
    torch.manual_seed(0)
    return timm.create_model("msdnet_cifar_5exit", num_channels=4, growth_rate=2, num_classes=3).eval()


def _resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18_exits", num_classes=3, exits="sdn", head="sdn", input_size=(3, 32, 32)).eval()


def test_the_history_is_carried_in_the_state_and_slices_by_sample():
    model = Counting(_msdnet()).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        raw = model.model.forward_exits(x)
        outputs = model.forward_exits(x)
        for i, out in enumerate(outputs):  # the mean of the raw exits' logits so far
            assert torch.allclose(out, torch.stack(raw[:i + 1]).mean(0), atol=1e-6)
        state = model.forward_stem(x)
        assert state[2] == []  # no history before exit 0
        for i in range(model.num_exits):
            state = model.forward_stage(state, i)
            assert torch.allclose(model.forward_exit(state, i), outputs[i], atol=1e-6)
            part = slice_state(state, torch.tensor([False, True, False, True]))
            assert part[2][0].shape[0] == 2 and torch.equal(part[2][0], state[2][0][[1, 3]])
        feature = model.forward_exit(state, 4, pre_logits=True)
        assert torch.equal(feature, model.model.forward_exit(state[0], 4, pre_logits=True))
    model.set_exit(2)
    assert torch.allclose(model(x), outputs[2], atol=1e-6)  # forward stops at exit 3 (0-based 2)


def test_the_wrapped_models_training_switches_are_the_wrappers():
    inner = _msdnet()
    model = Counting(inner)
    model.gradient_equilibrium = True
    model.gradient_deconfliction = "symmetric"
    assert inner.gradient_equilibrium and inner.gradient_deconfliction == "symmetric"
    assert model.num_exits == inner.num_exits and model.num_classes == 3


def test_a_plain_model_is_refused():
    with pytest.raises(ValueError, match="wraps a multi-exit model .*got ResNet"):
        Counting(timm.create_model("resnet18", num_classes=3))


def _simulated(outputs, thresholds):
    """The executor's rule on every exit's outputs: the first exit whose max softmax reaches its
    threshold, else the last."""
    n, last = outputs[0].shape[0], len(outputs) - 1
    exits, logits = torch.full((n,), last), outputs[-1].clone()
    for s in range(n):
        for k in range(last):
            if outputs[k][s].softmax(-1).max() >= thresholds[k]:
                exits[s], logits[s] = k, outputs[k][s]
                break
    return exits, logits


@pytest.mark.parametrize("wrap", [lambda m: BoostedExits(m, 0.5), lambda m: ZTWModel(m), Counting],
                         ids=["boostnet", "ztw", "running_mean"])
@pytest.mark.parametrize("network", [_msdnet, _resnet], ids=["msdnet", "resnet18_exits"])
def test_the_executor_with_compaction_gives_the_combined_outputs(wrap, network):
    model = wrap(network().double()).eval()
    if isinstance(model, ZTWModel):  # ensembles away from the identity, so that they matter
        with torch.no_grad():
            for e in model.ensembles:
                e.weight.normal_(0, 0.5)
                e.bias.normal_(0, 0.5)
    x = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        outputs = model.forward_exits(x)
    scores = torch.stack([o.softmax(-1).max(-1).values for o in outputs[:-1]])
    ordered = scores.sort(1).values  # about half the samples leave at each exit, none at a tie
    thresholds = ((ordered[:, 7] + ordered[:, 8]) / 2).tolist() + [0.0]
    exits, logits = _simulated(outputs, thresholds)
    assert len(set(exits.tolist())) >= 3  # samples leave at several exits: the state was compacted
    result = EarlyExitExecutor(model, thresholds)(x)
    assert torch.equal(result.exits, exits)
    assert torch.allclose(result.logits, logits, atol=1e-10)
