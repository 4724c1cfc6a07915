"""JEI-DNN's learned gates (Regol et al., ICLR 2024): the gate features, the oracle exits, the cumulative
targets, the positive weights and the weighted BCE re-stated from the rules and checked on hand-computed
cases (float64); the reference's gate-weighted classifier loss shown equal to the plain cross-entropy
sum (value and gradient); the learned-gate exit policy run by the executor as the cached evaluation
assigns it, kept by a thresholds file and an export; gate training leaving the network bit-identical
in the plain loop, the accelerate engine (the recipe's two phases) and mmengine; the reference's
alternation of gate and classifier turns (which turn at which update, per update under gradient
accumulation, resumed; each turn moving only its own parameters, bit-exactly, under momentum SGD and
AdamW's weight decay); and the refusals."""
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.config import load_config, phase_configs
from timm_exits.engine import run
from timm_exits.inference import (EarlyExitExecutor, ExitOutputs, ExitPolicy, ExportedModel, Thresholds, assign_exits,
                                  export_model, resolve_policy)
from timm_exits.models.gates import ExitGates, gate_features
from timm_exits.models.jei_gates import JEIGatesModel
from timm_exits.train import CrossEntropy, PlainTrainer, build_technique
from timm_exits.train.jei_dnn import (alternation_turn, classifier_loss, gate_loss, gate_targets, oracle_exits,
                                      oracle_pos_weights)

from helpers import mm_runner, tiny_data, write_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(num_classes=10, num_channels=4, growth_rate=2)


def _gated(x: torch.Tensor, seed: int = 0, **kwargs) -> JEIGatesModel:
    """A tiny 5-exit MSDNet and gates on the largest probability that let some of ``x`` leave at each
    exit (gate k fires above the 70th percentile of exit k's largest probability on ``x``)."""
    torch.manual_seed(seed)
    model = JEIGatesModel(timm.create_model("msdnet_cifar_5exit", **{**TINY, **kwargs})).eval()
    with torch.no_grad():
        logits = model.forward_exits(x)
        for gate, z in zip(model.gates.linear, logits):
            top = z.float().softmax(-1).max(-1).values
            scale = 10 / (top.max() - top.min()).item()
            gate.weight.copy_(torch.tensor([[scale, 0.0, 0.0, 0.0]]))
            gate.bias.fill_(-scale * top.quantile(0.7).item())
    return model


def _entropy(p):
    return -sum(v * math.log(v) for v in p if v > 0)


def test_gate_features_by_hand():
    p = [0.5, 0.3, 0.2]
    sq = [v * v for v in p]
    powered = [v / sum(sq) for v in sq]
    expected = [0.5, _entropy(p), 0.2, _entropy(powered)]
    features = gate_features(torch.tensor([p], dtype=torch.float64))
    torch.testing.assert_close(features[0], torch.tensor(expected, dtype=torch.float64))
    # a one-hot row: the zero probabilities add nothing to either entropy (0 log 0 = 0)
    torch.testing.assert_close(gate_features(torch.tensor([[1.0, 0.0]], dtype=torch.float64))[0],
                               torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    logits = torch.randn(3, 4, requires_grad=True)
    assert not gate_features(logits.softmax(-1)).requires_grad  # detached: no gradient into the network


def test_oracle_exits_and_cumulative_targets_by_hand():
    # three exits, two samples; costs 1, 2, 4: normalised 0.25, 0.5, 1; lambda = 0.7
    logits = [torch.tensor([[2.0, 0.0], [0.0, -2.0]]), torch.tensor([[3.0, 0.0], [0.0, 2.0]]),
              torch.tensor([[6.0, 0.0], [0.0, 4.0]])]
    target = torch.tensor([0, 1])
    ce = [[math.log1p(math.exp(-m)) for m in (2.0, 3.0, 6.0)], [math.log1p(math.exp(-m)) for m in (-2.0, 2.0, 4.0)]]
    objective = [[c + 0.7 * w for c, w in zip(row, (0.25, 0.5, 1.0))] for row in ce]
    expected = [min(range(3), key=row.__getitem__) for row in objective]
    assert expected == [0, 1]  # the hand-computed case: sample 0 leaves first, sample 1 at exit 1
    oracle = oracle_exits(logits, target, [1.0, 2.0, 4.0], 0.7)
    assert oracle.tolist() == expected
    assert oracle_exits(logits, target, [1.0, 2.0, 4.0], 0.0).tolist() == [2, 2]  # no cost: the best exit
    assert gate_targets(torch.tensor([0, 1, 2, 3]), 3).tolist() == [[1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_weighted_bce_against_an_element_by_element_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    y = gate_targets(torch.randint(0, 4, (6,), generator=g), 3).double()
    w = torch.tensor([0.5, 2.0, 5.0], dtype=torch.float64)
    total = 0.0
    for i in range(6):
        for j in range(3):
            s = 1 / (1 + math.exp(-x[i, j].item()))
            term = -(y[i, j].item() * math.log(s) + (1 - y[i, j].item()) * math.log(1 - s))
            total += term * (w[j].item() if y[i, j] == 1 else 1.0)
    loss = gate_loss(x, y, w)
    assert loss.item() == pytest.approx(total / 18, rel=1e-12)
    # its gradient is the weighted (sigmoid - target) / n, by autograd on the reference computation
    ref = x.detach().clone().requires_grad_(True)
    weight = torch.where(y == 1, w.expand_as(y), torch.ones_like(y))
    (-(y * F.logsigmoid(ref) + (1 - y) * F.logsigmoid(-ref)) * weight).mean().backward()
    loss.backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_positive_weights_follow_the_reference_rule():
    # counts of oracle exits 0..3 of 10 samples: gate l's weight is (10 - c_l) / c_l, c_l >= 0.1, at most 5
    torch.testing.assert_close(oracle_pos_weights(torch.tensor([3.0, 0.0, 5.0, 2.0])),
                               torch.tensor([7 / 3, 5.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(oracle_pos_weights(torch.tensor([10.0, 0.0, 0.0]), clip=50.0),
                               torch.tensor([0.0, 50.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="no samples counted"):
        oracle_pos_weights(torch.zeros(3))


def _reference_weighted_classifier_loss(losses, gates):
    """The reference's 'weighted' (and default 'boosted') classifier loss, re-stated: P from the frozen
    gates as the probability of exiting at each gate, then mean(P L * sum(L) / sum(P L))."""
    p, used = [], torch.zeros(gates.shape[0], 1, dtype=gates.dtype)
    for l in range(gates.shape[1]):
        g = gates[:, l:l + 1]
        p.append(torch.maximum(torch.zeros_like(g), torch.minimum(g, 1 - used)))
        used = used + g
    p = torch.cat(p, 1)
    weighted = p * losses
    return (weighted * (losses.sum(1) / weighted.sum(1)).unsqueeze(1)).mean()


def test_the_reference_weighted_classifier_loss_is_the_plain_cross_entropy_sum():
    g = torch.Generator().manual_seed(0)
    n, gates, classes = 7, 4, 5
    logits = [torch.randn(n, classes, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(gates)]
    target = torch.randint(0, classes, (n,), generator=g)
    sigmoids = torch.rand(n, gates, dtype=torch.float64, generator=g) * 0.3 + 0.01  # frozen gates, P > 0
    losses = torch.stack([F.cross_entropy(z, target, reduction="none") for z in logits], 1)
    reference = _reference_weighted_classifier_loss(losses, sigmoids)
    # the CrossEntropy technique on the same exits, each weighted 1 / (number of gated exits)
    plain = sum(CrossEntropy(exit_weights=[1 / gates] * gates).losses(logits, target).values())
    assert reference.item() == pytest.approx(plain.item(), rel=1e-12)
    ours = torch.autograd.grad(plain, logits)
    theirs = torch.autograd.grad(_reference_weighted_classifier_loss(
        torch.stack([F.cross_entropy(z, target, reduction="none") for z in logits], 1), sigmoids), logits)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _gate_policy(model: JEIGatesModel) -> ExitPolicy:
    return ExitPolicy("gate", params=model.gates.params())


def test_executor_runs_the_learned_gates_as_the_cached_evaluation_and_as_the_gates_decide():
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _gated(x)
    policy, thresholds = _gate_policy(model), [0.5] * model.num_exits
    outputs = ExitOutputs(torch.stack(model.forward_exits(x)), torch.zeros(24, dtype=torch.long))
    cached = assign_exits(policy.scores(outputs.probs), thresholds, policy)
    result = EarlyExitExecutor(model, thresholds, policy)(x)
    assert torch.equal(result.exits, cached)
    assert len(set(cached.tolist())) > 1  # the gates send samples to several exits
    # the model's own gates: the first exit whose sigmoid reaches 0.5, else the last
    logits, gate_logits = model.forward_gates(x)
    fired = torch.sigmoid(gate_logits) >= 0.5
    by_gates = torch.where(fired.any(1), fired.int().argmax(1), model.num_exits - 1)
    clear = ((torch.sigmoid(gate_logits) - 0.5).abs() > 1e-5).all(1)
    assert torch.equal(by_gates[clear], cached[clear]) and clear.sum() > 20
    torch.testing.assert_close(result.logits, torch.stack(logits)[result.exits, torch.arange(24)])


def test_gate_scores_work_with_the_budgeted_threshold_search():
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = _gated(x)
    outputs = ExitOutputs(torch.stack(model.forward_exits(x)), torch.randint(0, 10, (32,)))
    from timm_exits.inference import fit_thresholds
    policy = _gate_policy(model)
    thresholds = fit_thresholds(policy.scores(outputs.probs), [0.5, 0.25, 0.125, 0.0625, 0.0625], policy)
    exits = assign_exits(policy.scores(outputs.probs), thresholds, policy)
    assert (exits == 0).sum().item() == 16  # the fitted gate threshold sends exit 0's quota


@pytest.mark.slow  # an export / two engine phases: a minute or two on a shared 2-core machine
def test_the_policy_round_trips_through_a_thresholds_file_and_an_export(tmp_path):
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = _gated(x, num_blocks=3)
    policy = _gate_policy(model)
    fitted = Thresholds("jei_gates", model.num_exits, policy, [0.5] * model.num_exits)
    fitted.save(str(tmp_path / "thresholds.json"))
    loaded = Thresholds.load(str(tmp_path / "thresholds.json"))
    assert loaded.exit_policy == policy and loaded == fitted
    expected = EarlyExitExecutor(model, fitted)(x)
    export_model(model, torch.randn(1, 3, 32, 32), str(tmp_path / "export"), thresholds=loaded)
    exported = ExportedModel(str(tmp_path / "export"))
    assert exported.thresholds.exit_policy == policy
    answer = exported.early_exit(x)
    assert torch.equal(answer.exits, expected.exits)
    torch.testing.assert_close(answer.logits, expected.logits, rtol=1e-4, atol=1e-4)
    # a file written before policies had parameters loads with none
    old = {k: v for k, v in fitted.__dict__.items() if k != "params"}
    old.update(policy="maxprob")
    assert Thresholds(**old).exit_policy == ExitPolicy("maxprob")


def test_gate_training_leaves_the_network_bit_identical_and_keeps_its_state():
    torch.manual_seed(0)
    network = timm.create_model("msdnet_cifar_5exit", **TINY).train()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    technique = build_technique(dict(type="JEIGates"))
    model = technique.prepare(network)
    assert isinstance(model, JEIGatesModel) and technique.prepare(model) is model  # idempotent
    gates_before = {k: v.clone() for k, v in model.gates.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 4 * 5  # four gates of Linear(4, 1)
    trainer = PlainTrainer(model, technique, torch.optim.SGD(trainable, lr=0.5))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        terms = trainer.step(x, y)
    assert set(terms) == {"gates"} and math.isfinite(terms["gates"])
    assert model.training and not model.model.training  # the network stays in eval mode
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    assert any(not torch.equal(gates_before[k], v) for k, v in model.gates.state_dict().items())
    assert technique.counts.sum().item() == 16  # two batches of oracle exits, counted
    resumed = build_technique(dict(type="JEIGates"))
    resumed.load_state_dict(technique.state_dict())
    resumed.prepare(model)
    torch.testing.assert_close(resumed.pos_weights(), technique.pos_weights())


def test_the_wrapper_rebuilds_from_its_description_with_its_gates(tmp_path):
    from timm_exits.model_folder import save_model_folder

    model = JEIGatesModel(timm.create_model("msdnet_cifar_5exit", **TINY)).eval()
    with torch.no_grad():
        model.gates.linear[0].bias.fill_(1.25)
    assert timm.create_model("jei_gates", model="msdnet_cifar_5exit", model_args=TINY).num_exits == 5
    save_model_folder(model, str(tmp_path / "folder"))
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'folder'}", pretrained=True)
    assert isinstance(rebuilt, JEIGatesModel) and rebuilt.gates.params() == model.gates.params()


def test_refusals_say_what_was_expected():
    model = JEIGatesModel(timm.create_model("msdnet_cifar_5exit", **TINY))
    with pytest.raises(ValueError, match=r"the 'gate' score takes its parameters \(params=...\)"):
        ExitPolicy("gate")
    with pytest.raises(ValueError, match="the 'maxprob' score takes no params"):
        ExitPolicy("maxprob", params=[[0.0] * 5])
    with pytest.raises(ValueError, match="give ExitPolicy\\('gate', params=...\\)"):
        resolve_policy("gate")
    with pytest.raises(ValueError, match="carries the parameters of the 'gate' score, not of 'maxprob'"):
        model.policy_params("maxprob")
    with pytest.raises(ValueError, match="each gate has 4 weights and a bias"):
        ExitPolicy("gate", params=[[0.0] * 4])
    with pytest.raises(ValueError, match="use fallback='last'"):
        ExitPolicy("gate", "most_confident", params=[[0.0] * 5])
    three_gates = ExitPolicy("gate", params=[[0.0] * 5] * 3)
    with pytest.raises(ValueError, match="parameters for 3 gates; a model with 5 exits has 4"):
        EarlyExitExecutor(model, [0.5] * 5, three_gates)
    with pytest.raises(ValueError, match="parameters for 3 gates; a model with 5 exits has 4"):
        Thresholds("m", 5, three_gates, [0.5] * 5)
    with pytest.raises(ValueError, match="JEIGates option costs: 5 numbers for a model with 5 exits"):
        build_technique(dict(type="JEIGates", costs=[1.0, 2.0])).prepare(model)
    with pytest.raises(ValueError, match="JEIGates option costs must be cumulative"):
        build_technique(dict(type="JEIGates", costs=[2.0, 1.0]))
    with pytest.raises(ValueError, match="JEIGates trains gates on a trained multi-exit model, got ResNet"):
        build_technique(dict(type="JEIGates")).prepare(timm.create_model("resnet10t", num_classes=3))
    with pytest.raises(ValueError, match="the gates train on a frozen one"):
        build_technique(dict(type="JEIGates", gradient_equilibrium=True))
    with pytest.raises(ValueError, match="at least 2 exits"):
        ExitGates(1)


@pytest.mark.parametrize("study_config, second, options", [("jei_gates", "gates", {}),
                                                           ("jei_gates_alternating", "alternating",
                                                            dict(alternate_every=200))])
def test_the_study_config_s_first_phase_is_the_baseline_run_for_run(study_config, second, options):
    study = ROOT / "benchmarks" / "cifar10_study"
    baseline = phase_configs(load_config(str(study / "baseline.py"), data_dir="/data/cifar10"))
    phases = phase_configs(load_config(str(study / f"{study_config}.py"), data_dir="/data/cifar10"))
    assert [name for name, _ in phases] == ["classifiers", second]
    strip = lambda run: {k: v for k, v in run.items() if k not in ("output_dir", "phase")}  # noqa: E731
    assert strip(phases[0][1]) == strip(baseline[0][1])
    assert phases[1][1]["technique"] == build_technique(dict(type="JEIGates", **options)).config()
    assert phases[1][1]["evaluation"]["policy"] == "gate" and phases[0][1]["evaluation"]["policy"] == "maxprob"


@pytest.mark.slow  # an export / two engine phases: a minute or two on a shared 2-core machine
def test_engine_runs_the_recipe_s_two_phases(tmp_path):
    data = tiny_data(tmp_path / "data")
    recipe = (ROOT / "recipes" / "_base_" / "techniques" / "jei_gates.py").read_text()
    config = load_config(str(write_config(tmp_path / "c.py", data, extra="tracker = None\ntrain = dict(epochs=1)\n"
                                          + recipe)), output_dir=str(tmp_path / "out"))
    run(config)
    classifiers, gates = (load_file(tmp_path / "out" / name / "model.safetensors") for name in ("classifiers", "gates"))
    network = {k: v for k, v in gates.items() if k.startswith("model.")}
    assert network and all(torch.equal(classifiers[k[len("model."):]], v) for k, v in network.items())
    assert sorted(k for k in gates if k.startswith("gates.")) == sorted(
        f"gates.linear.{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    # the gate phase is evaluated with its trained gates as the exit policy
    report = json.loads((tmp_path / "out" / "gates" / "evaluation.json").read_text())
    rows = [gates[f"gates.linear.{i}.weight"].flatten().double().tolist() + [gates[f"gates.linear.{i}.bias"].item()]
            for i in range(4)]
    assert report["exit_policy"]["score"] == "gate" and report["exit_policy"]["params"] == rows


def test_a_learned_score_named_alone_takes_its_parameters_from_the_model():
    model = JEIGatesModel(timm.create_model("msdnet_cifar_5exit", **TINY))
    assert resolve_policy("gate", model) == ExitPolicy("gate", params=model.gates.params())
    with pytest.raises(ValueError, match="or evaluate a model that carries them"):
        resolve_policy("gate", model.model)


@pytest.mark.slow
def test_mmengine_runner_trains_the_gates_on_the_frozen_network(tmp_path):
    runner = mm_runner(tmp_path, dict(model="msdnet_cifar_5exit", model_kwargs=dict(num_classes=3, num_channels=4,
                                                                                    growth_rate=2),
                                      technique=dict(type="JEIGates")), iters=2)
    model = runner.model.model
    assert isinstance(model, JEIGatesModel)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner.train()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("model."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("gates."))


def test_the_alternation_schedule_by_hand():
    # turns of 3 updates, the gates' first (the reference's epoch opens with the gate turn)
    expected = ["gates"] * 3 + ["classifiers"] * 3 + ["gates"] * 3 + ["classifiers"]
    assert [alternation_turn(u, 3) for u in range(10)] == expected
    assert [alternation_turn(u, 1) for u in range(4)] == ["gates", "classifiers", "gates", "classifiers"]
    assert alternation_turn(399, 200) == "classifiers" and alternation_turn(400, 200) == "gates"
    with pytest.raises(ValueError, match="a turn of every >= 1 updates, got updates=0, every=0"):
        alternation_turn(0, 0)


def test_the_classifier_loss_is_the_mean_of_the_gated_exits_cross_entropies():
    torch.manual_seed(0)
    logits = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    target = torch.tensor([0, 1, 2, 3, 0])
    by_hand = sum(-F.log_softmax(z, -1)[i, target[i]] for z in logits for i in range(5)) / (3 * 5)
    torch.testing.assert_close(classifier_loss(logits, target), by_hand)
    with pytest.raises(ValueError, match="at least one gated exit"):
        classifier_loss([], target)


def _resnet_with_exits(seed: int = 0):
    torch.manual_seed(seed)
    return timm_exits.add_exits(timm.create_model("resnet10t", num_classes=10), exits=[1, 2]).train()


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw"])
def test_each_turn_moves_only_its_own_parameters_bit_exactly(optimizer):
    technique = build_technique(dict(type="JEIGates", alternate_every=2, costs=[1.0, 2.0, 4.0]))
    model = technique.prepare(_resnet_with_exits())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.exits.{i}.fc.{p}" for i in range(2) for p in ("weight", "bias")} | {
        f"gates.linear.{i}.{p}" for i in range(2) for p in ("weight", "bias")}  # the backbone and its head frozen
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd_momentum"
           else torch.optim.AdamW(params, lr=0.01, weight_decay=0.05))
    trainer = PlainTrainer(model, technique, opt)
    part = lambda name: "gates" if name.startswith("gates.") else "classifiers" if ".exits." in name else "frozen"  # noqa: E731
    turns = []
    for step in range(8):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        turn = technique.turn
        terms = trainer.step(*_batch(step))
        turns.append(turn)
        assert set(terms) == {turn}
        moved = {part(n) for n, p in model.named_parameters() if not torch.equal(before[n], p)}
        # momentum / Adam moments from the other part's earlier turns must not move it now
        assert moved == {turn}, (step, turn, moved)
    assert turns == ["gates", "gates", "classifiers", "classifiers"] * 2
    assert technique.updates == 8 and technique.state_dict()["jei_updates"] == 8


def _batch(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_with_gradient_accumulation_a_turn_is_per_update_and_a_resume_continues_it():
    from timm_exits.task import MultiExitTask

    def task_for(model):
        task = MultiExitTask(model, "JEIGates", alternate_every=1, costs=[1.0, 2.0, 4.0], grad_accum_steps=2,
                             verbose=False)
        optimizer = torch.optim.SGD([p for p in task.get_trainable_module().parameters() if p.requires_grad], lr=0.1)
        return task.attach_optimizer(optimizer), optimizer

    task, optimizer = task_for(_resnet_with_exits())
    turns = []
    for call in range(8):
        if call == 4:  # a resume from the task's checkpoint state continues the schedule
            state = task.get_task_state()
            model = _resnet_with_exits(seed=1)
            model.load_state_dict(task.model.model.state_dict())
            task, optimizer = task_for(model)
            task.load_task_state(state)
        turns.append(task.technique.turn)
        (task(*_batch(call))["loss"] / 2).backward()  # timm's train.py
        if call % 2 == 1:
            optimizer.step()
            optimizer.zero_grad()
        task.model.eval()
        with torch.no_grad():  # a validation call neither trains nor counts
            task(*_batch(50 + call))
        task.model.train()
    # updates end on calls 1, 3, 5, 7: calls 0-1 are update 0 (gates), 2-3 update 1 (classifiers), ...
    assert turns == ["gates", "gates", "classifiers", "classifiers"] * 2
    assert task.technique.updates == 4


def test_alternating_on_msdnet_trains_its_exits_heads_but_the_last():
    technique = build_technique(dict(type="JEIGates", alternate_every=1))
    model = technique.prepare(timm.create_model("msdnet_cifar_5exit", **TINY))
    heads = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and n.startswith("model.")}
    assert heads == {"0", "1", "2", "3"} and all(n.startswith(("model.exits.", "gates."))
                                                  for n, p in model.named_parameters() if p.requires_grad)
    assert technique.unused_parameters and not build_technique(dict(type="JEIGates")).unused_parameters
    # back to gates alone: the network frozen again
    plain = build_technique(dict(type="JEIGates")).prepare(model)
    assert all(n.startswith("gates.") for n, p in plain.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=r"JEIGates option alternate_every must be an integer >= 1 or None, got 0"):
        build_technique(dict(type="JEIGates", alternate_every=0))


@pytest.mark.slow  # two engine phases on tiny data
def test_engine_runs_the_alternating_recipe(tmp_path):
    data = tiny_data(tmp_path / "data")
    recipe = (ROOT / "recipes" / "_base_" / "techniques" / "jei_gates_alternating.py").read_text()
    recipe = recipe.replace("alternate_every=200", "alternate_every=1")
    config = load_config(str(write_config(tmp_path / "c.py", data, extra="tracker = None\ntrain = dict(epochs=1)\n"
                                          + recipe)), output_dir=str(tmp_path / "out"))
    run(config)
    classifiers, alternating = (load_file(tmp_path / "out" / name / "model.safetensors")
                                for name in ("classifiers", "alternating"))
    moved = {k for k, v in alternating.items() if k.startswith("model.") and not torch.equal(classifiers[k[6:]], v)}
    assert moved and all(k.startswith("model.exits.") and not k.startswith("model.exits.4.") for k in moved)
