"""The technique types and the trainer interface: every type's options have the documented defaults
and are checked (a bad value or an unknown option is a ValueError naming the type and the option); a
technique's config section rebuilds the same technique; a trainer that cannot give what a technique
needs refuses it before training, naming who can; HDKD's interval counts the optimizer updates of
timm's task with gradient accumulation."""
import copy
import dataclasses
import json

import pytest
import timm
import torch

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.task import MultiExitTask
from timm_exits.train import TECHNIQUES, PlainTrainer, TrainerError, build_technique, technique_config
from timm_exits.train.techniques import OutputsTechnique

TINY = dict(num_classes=10, num_channels=4, growth_rate=2)
SWITCHES = dict(gradient_equilibrium=False, deconfliction=None, feature_surgery=None)
CROSS_ENTROPY = dict(SWITCHES, exit_weights=None, label_smoothing=0.0, regime="joint", freeze_bn_stats=False)

# The defaults the docs and the references give (docs/training/*.md; the old API's defaults).
DOCUMENTED = {
    "CrossEntropy": CROSS_ENTROPY,
    "PCGrad": dict(CROSS_ENTROPY, scope="global", order="random", protect_deeper=False, seed=0),
    "OneForAll": dict(SWITCHES, temperature=3.0, gamma=0.9, reduction="batchmean", isc="reference",
                      freeze_bn_stats=False),
    "HDKD": dict(SWITCHES, temperature=4.0, alpha=0.5, lr=3e-4, xi=None, init="uniform", ratio_reg=True, interval=1),
    "ADN": dict(SWITCHES, alpha=0.5, temperature=1.0, topk=None),
    "BoostNet": dict(CROSS_ENTROPY, reweight=0.5),
    "ZTW": dict(CROSS_ENTROPY, train="heads", detach=True, layer_norm=True),
    "L2W": dict(SWITCHES, epsilon=0.8, constraint_dimension="col", input_type="loss", hidden_size=500, meta_interval=1,
                lr=1e-4, weight_decay=1e-4, lr_follows_schedule=True, target_p=0.75, label_smoothing=0.0, seed=0),
    "PhuongLampert": dict(SWITCHES, distillation_weight=0.5, gain=None, temperature=1.0, adaptive=True, max_prob=0.5,
                          growth=1.05),
    "DynPerceiver": dict(SWITCHES, cnn_weight=1.0, att_weight=0.5, merge_weight=1.0, kd_weight=0.5, temperature=1.0,
                         label_smoothing=0.0),
    "JEIGates": dict(SWITCHES, tradeoff=0.7, costs=None, pos_weights=None, max_pos_weight=5.0, alternate_every=None),
    "DFSDistillation": dict(SWITCHES, gamma=0.9, temperature=3.0),
}

# Per type: options set away from their defaults (for the round trip), a bad value and its message, a misspelt option.
CASES = {
    "CrossEntropy": (dict(exit_weights=[1, 2, 3], label_smoothing=0.1, regime="heads_only"),
                     dict(label_smoothing=-0.1), "label_smoothing must be a number >= 0.0 and < 1.0, got -0.1",
                     "label_smoothin"),
    "PCGrad": (dict(scope="segment", order="deep_first", protect_deeper=True, seed=4, exit_weights="sdn"),
               dict(order="shallow_first"), "order must be 'random' or 'deep_first', got 'shallow_first'", "scop"),
    "OneForAll": (dict(temperature=1.0, gamma=0.1, reduction="mean", isc=None),
                  dict(isc="both"), "isc must be 'reference', 'detach' or None, got 'both'", "gama"),
    "HDKD": (dict(alpha=0.3, interval=4, xi=0.01, init="dbt", gradient_equilibrium=True),
             dict(interval=0), "interval must be an integer >= 1, got 0", "intervall"),
    "ADN": (dict(alpha=0.2, temperature=2.0, topk=5),
            dict(topk=0), r"topk must be an integer >= 1 or None, got 0", "top_k"),
    "BoostNet": (dict(reweight=[0.5, 0.25, 1.0], label_smoothing=0.1),
                 dict(reweight=-1), r"reweight must be a number >= 0.0, or a list of them, got -1", "reweigh"),
    "ZTW": (dict(train="ensembles", detach=False, layer_norm=False),
            dict(train="all"), "train must be .*, got 'all'", "layernorm"),
    "L2W": (dict(epsilon=0.3, constraint_dimension="mat", meta_interval=100, hidden_size=8),
            dict(constraint_dimension="diag"), "constraint_dimension must be .*, got 'diag'", "epsilom"),
    "PhuongLampert": (dict(distillation_weight=0.7, gain=1.0, temperature=4.0, adaptive=False),
                      dict(growth=0.9), "growth must be a number > 1.0, got 0.9", "max_probability"),
    "JEIGates": (dict(tradeoff=0.3, costs=[1.0, 2.0, 4.0], pos_weights=[1.0, 2.0], alternate_every=200),
                 dict(tradeoff=-0.1), "tradeoff must be a number >= 0.0, got -0.1", "trade_off"),
    "DynPerceiver": (dict(cnn_weight=0.25, att_weight=0.25, merge_weight=0.5, temperature=4.0),
                     dict(temperature=0.0), "temperature must be a number > 0.0, got 0.0", "kd_weigth"),
    "DFSDistillation": (dict(gamma=0.3, temperature=1.0, feature_surgery=0.5),
                        dict(gamma=1.5), r"gamma must be a number >= 0.0 and <= 1.0, got 1.5", "gama"),
}


def test_every_type_is_documented_here():
    assert set(TECHNIQUES) == set(DOCUMENTED) == set(CASES)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_defaults_are_the_documented_ones_and_every_option_declares_its_values(name):
    assert TECHNIQUES[name]().config() == {"type": name, **DOCUMENTED[name]}
    assert technique_config(dict(type=name)) == {"type": name, **DOCUMENTED[name]}
    for field in dataclasses.fields(TECHNIQUES[name].Options):
        if field.name == "exit_weights":  # a schedule: checked by ExitWeights
            continue
        valid = field.metadata.get("valid")
        assert valid is not None and valid.admits(field.default), (name, field.name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_bad_value_or_an_unknown_option_is_a_value_error_naming_the_type(name):
    _, bad, message, misspelt = CASES[name]
    option = next(iter(bad))
    with pytest.raises(ValueError, match=f"^{name} option {message}"):
        TECHNIQUES[name](**bad)
    with pytest.raises(ValueError, match=f"^{name} option {message}"):
        build_technique(dict(type=name, **bad))
    with pytest.raises(ValueError, match=rf"^{name} has no option '{misspelt}' \(did you mean '\w+'\?\); its options: "):
        build_technique(dict(type=name, **{misspelt: 1}))
    with pytest.raises(ValueError, match=f"^{name} option gradient_equilibrium must be False or True, got 1"):
        build_technique(dict(type=name, gradient_equilibrium=1))  # 1 is not True: no silent truthiness
    assert option in DOCUMENTED[name]


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_config_section_rebuilds_the_same_technique(name):
    options = CASES[name][0]
    technique = TECHNIQUES[name](**options)
    section = technique.config()
    assert section == {"type": name, **DOCUMENTED[name], **options}
    recorded = json.loads(json.dumps(section))  # what a run folder records
    rebuilt = build_technique(recorded)
    assert type(rebuilt) is type(technique) and rebuilt.options == technique.options
    assert rebuilt.config() == section and technique_config(recorded) == section
    assert build_technique(technique) is technique


def _msdnet(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("msdnet_cifar_5exit", **TINY).train()


def _batch(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_l2w_is_refused_by_timm_s_task_naming_the_trainers_that_run_it():
    with pytest.raises(TrainerError) as refused:
        MultiExitTask(_msdnet(), "L2W", verbose=False)
    message = str(refused.value)
    assert isinstance(refused.value, ValueError)
    assert message.startswith("L2W needs optimizer updates inside a batch")
    assert "timm's training task (MultiExitTask) does not give" in message
    assert "the accelerate engine (train.grad_accum_steps=1)" in message and "mmengine (accumulative_counts=1)" in message


def test_hdkd_without_held_out_data_is_refused_by_the_task_and_the_plain_loop():
    with pytest.raises(TrainerError, match=r"^HDKD needs batches of a held-out split, which timm's training task "
                                           r"\(MultiExitTask\) does not give here; run it with .*held_out=loader"):
        MultiExitTask(_msdnet(), "HDKD", xi=0.1, verbose=False)
    technique = build_technique(dict(type="HDKD", xi=0.1))
    model = technique.prepare(_msdnet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainerError, match=r"^HDKD needs batches of a held-out split, which a plain loop "
                                           r"\(PlainTrainer\) does not give here"):
        PlainTrainer(model, technique, optimizer)
    PlainTrainer(model, technique, optimizer, held_out=[_batch(seed=1)]).step(*_batch())  # given held-out data: runs


def test_what_a_trainer_cannot_give_is_a_trainer_error_naming_who_can():
    class NeedsNothing(OutputsTechnique):
        """Declares no needs, yet asks for an update inside the batch."""

        def losses(self, outputs, target, trainer=None):
            return {}

    task = MultiExitTask(_msdnet(), NeedsNothing(), verbose=False)
    with pytest.raises(TrainerError, match=r"^timm's training task \(MultiExitTask\) cannot give optimizer updates "
                                           r"inside a batch.*; the accelerate engine .* or mmengine .* can"):
        task.trainer.update(torch.zeros(()))
    with pytest.raises(TrainerError, match="cannot give batches of a held-out split"):
        task.trainer.held_out_batch(torch.zeros(1))


def _weights(task):
    return [p.detach().clone() for p in task.technique.weights.parameters()]


def _task(model, interval, accumulation):
    task = MultiExitTask(model, "HDKD", interval=interval, held_out=[_batch(seed=100)], grad_accum_steps=accumulation,
                         verbose=False)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05)
    return task.attach_optimizer(optimizer), optimizer


# calls 0..7 of timm's train.py with --grad-accum-steps 2: an update ends on every second call (the
# updates numbered from 0); the weights move on the call that ends update 0, interval, 2 * interval, ...
# (worked out by hand; without accumulation, see test_technique_objects.py and test_intervals.py)
@pytest.mark.parametrize("accumulation, interval, moves", [
    (2, 2, [1, 5]),     # updates end on calls 1, 3, 5, 7: updates 0 and 2
    (2, 3, [1, 7]),     # updates 0 and 3
])
def test_hdkd_interval_counts_the_updates_of_timm_s_task(accumulation, interval, moves):
    task, optimizer = _task(_msdnet(), interval, accumulation)
    moved = []
    for call in range(8):
        if call == 4:  # a resume from the task's checkpoint state continues the schedule
            state = copy.deepcopy(task.get_task_state())
            model = _msdnet(seed=1)
            model.load_state_dict(task.model.state_dict())
            task, optimizer = _task(model, interval, accumulation)
            task.load_task_state(state)
        before = _weights(task)
        (task(*_batch(seed=call))["loss"] / accumulation).backward()  # timm's train.py
        if (call + 1) % accumulation == 0:
            optimizer.step()
            optimizer.zero_grad()
        if any(not torch.equal(a, b) for a, b in zip(before, _weights(task))):
            moved.append(call)
        before = _weights(task)
        task.model.eval()
        with torch.no_grad():  # validation calls neither train nor count
            task(*_batch(seed=50 + call))
        task.model.train()
        assert all(torch.equal(a, b) for a, b in zip(before, _weights(task)))
    assert moved == moves and task.trainer.calls == 8
