"""MultiExitTask, the timm training task: its loss and gradients equal those of the plain-PyTorch
technique functions (or of an independent formula) on the same batch and weights, for every technique; a short loop
through it trains every exit; timm's task helpers (optimizer, EMA, checkpoint state, DDP) work."""
import contextlib
import copy

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.task import resume_task_checkpoint
from timm.utils import ModelEmaV3

import timm_exits  # noqa: F401  (registers the models)
from timm_exits import add_exits
from timm_exits.task import MultiExitTask
from timm_exits.models.imta import IMTAModel
from timm_exits.train import TrainerError, adn_step, one_for_all_distillation, pcgrad_backward
from timm_exits.train.hdkd import BalancedValidationLoss, HarmonizedWeights, harmonized_loss, hdkd_weight_step, loss_terms

from helpers import randomise_norms

TINY = dict(num_classes=10, num_channels=4, growth_rate=2)


def _msdnet(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("msdnet_cifar_5exit", **TINY).train()


def _adn(exits: bool = False):
    torch.manual_seed(0)  # non-trivial norms: with a fresh ResNet's zero-initialised BNs base = super
    model = randomise_norms(timm.create_model("resnet18_adn", num_classes=6))
    return (add_exits(model) if exits else model).train()


def _batch(n: int = 4, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(model, reference):
    got, expected = _grads(model), _grads(reference)
    assert got and got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("options", [
    dict(),
    dict(exit_weights=[0.5, 1.0, 1.5, 2.0, 3.0], label_smoothing=0.1),
    dict(gradient_equilibrium=True),
    dict(deconfliction="symmetric"),
    dict(gradient_equilibrium=True, deconfliction="protect_deeper"),
])
def test_ce_equals_the_weighted_sum_of_the_exits_cross_entropies(options):
    model = _msdnet()
    reference = copy.deepcopy(model)
    reference.gradient_equilibrium = options.get("gradient_equilibrium", False)
    reference.gradient_deconfliction = options.get("deconfliction")
    task = MultiExitTask(model, "CrossEntropy", verbose=False, **options)
    x, y = _batch()
    result = task(x, y)
    result["loss"].backward()

    logits = reference.forward_exits(x)
    weights = options.get("exit_weights", [1.0] * 5)
    per_exit = [w * F.cross_entropy(z, y, label_smoothing=options.get("label_smoothing", 0.0))
                for w, z in zip(weights, logits)]
    sum(per_exit).backward()
    assert set(result) == {"loss", "output"} | {f"loss_exit{k}" for k in range(1, 6)}
    torch.testing.assert_close(result["loss"], sum(per_exit).detach())
    for k, term in enumerate(per_exit):
        torch.testing.assert_close(result[f"loss_exit{k + 1}"], term.detach())
    torch.testing.assert_close(result["output"], logits[-1])  # the last exit, for timm's accuracy metric
    _assert_same_grads(model, reference)


def test_soft_mixup_targets_are_used_as_given():
    model = _msdnet()
    reference = copy.deepcopy(model)
    task = MultiExitTask(model, "CrossEntropy", label_smoothing=0.1, verbose=False)
    x, y = _batch()
    torch.manual_seed(1)
    x, soft = Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=10)(x, y)
    assert soft.dim() == 2 and soft.max() < 1
    task(x, soft)["loss"].backward()
    # soft cross-entropy, by hand: -sum_c q_c log p_c, averaged over the batch (no second smoothing)
    sum((-(soft * F.log_softmax(z, -1)).sum(-1)).mean() for z in reference.forward_exits(x)).backward()
    _assert_same_grads(model, reference)


def _phase_one(tmp_path):
    phase_one = _msdnet(seed=1)
    path = tmp_path / "phase1.safetensors"
    save_file({k: v.contiguous() for k, v in phase_one.state_dict().items()}, str(path))
    return phase_one, str(path)


def test_ofa_from_a_phase_one_checkpoint_equals_the_objective(tmp_path):
    phase_one, path = _phase_one(tmp_path)
    task = MultiExitTask("msdnet_cifar_5exit", "OneForAll", model_kwargs=TINY, previous=path,
                         temperature=2.0, gamma=0.7, verbose=False)
    model = task.model
    assert isinstance(model, IMTAModel)
    for k, v in phase_one.state_dict().items():  # the frozen network holds the phase-I weights
        assert torch.equal(model.backbone.state_dict()[k], v), k
    reference = copy.deepcopy(model)
    x, y = _batch()
    result = task(x, y)
    result["loss"].backward()
    logits, teacher = reference.forward_train(x)
    expected = one_for_all_distillation(logits, teacher, y, temperature=2.0, gamma=0.7)
    expected.backward()
    assert set(result) == {"loss", "output", "loss_ofa"}
    torch.testing.assert_close(result["loss"], expected.detach())
    torch.testing.assert_close(result["output"], logits[-1])
    _assert_same_grads(model, reference)
    assert all(p.grad is None for p in model.backbone.parameters())  # phase II trains the new heads only

    wrapped = MultiExitTask(copy.deepcopy(phase_one), "OneForAll", isc="detach", verbose=False).model  # a module
    assert isinstance(wrapped, IMTAModel) and wrapped.isc_mode == "detach"
    assert not any(p.requires_grad for p in wrapped.backbone.parameters())


def _hdkd_reference(num_exits):
    """The accelerate engine's HDKD state: weights, their Adam, the balanced validation loss."""
    weights = HarmonizedWeights(num_exits)
    optimizer = torch.optim.Adam(weights.parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    return dict(weights=weights, optimizer=optimizer, val_loss=BalancedValidationLoss(num_exits))


def test_hdkd_weight_update_and_loss_equal_the_engine_step():
    model = _msdnet()
    reference = copy.deepcopy(model)
    held_out = [_batch(seed=10)]
    task = MultiExitTask(model, "HDKD", held_out=held_out, lr=3e-4, alpha=0.6, verbose=False)
    task.attach_optimizer(torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05))
    ref = _hdkd_reference(reference.num_exits)
    for seed in (0, 1):  # the second step draws the (only) held-out batch again
        x, y = _batch(seed=seed)
        model.zero_grad()
        reference.zero_grad()
        result = task(x, y)
        result["loss"].backward()
        hdkd_weight_step(reference, ref["weights"], ref["optimizer"], (x, y), held_out[0], ref["val_loss"],
                         0.05, 0.6, 4.0)
        ce, kd = loss_terms(reference.forward_exits(x), y, 4.0)
        expected = harmonized_loss(ce, kd, tuple(w.detach() for w in ref["weights"]()), alpha=0.6)
        expected.backward()
        assert set(result) == {"loss", "output", "loss_hdkd"}
        torch.testing.assert_close(result["loss"], expected.detach())
        _assert_same_grads(model, reference)
        for a, b in zip(task.technique.weights.parameters(), ref["weights"].parameters()):
            torch.testing.assert_close(a, b)
    assert not torch.allclose(task.technique.weights.ce_logits, torch.zeros(5))  # the weights did move


@pytest.mark.parametrize("exits", [False, True])
def test_adn_single_loss_equals_the_two_backward_reference_step(exits):
    model = _adn(exits)
    reference = copy.deepcopy(model)
    task = MultiExitTask(model, "ADN", alpha=0.3, temperature=2.0, topk=4, verbose=False)
    x, y = _batch(classes=6)
    result = task(x, y)
    result["loss"].backward()
    expected = adn_step(reference, x, y, alpha=0.3, temperature=2.0, topk=4)  # the engine's two backwards
    assert set(result) == {"loss", "output", "loss_super", "loss_base"}
    torch.testing.assert_close(result["loss_super"].detach(), expected["super"])
    torch.testing.assert_close(result["loss_base"].detach(), expected["base"])
    assert expected["base"] > 0
    _assert_same_grads(model, reference)
    with torch.no_grad(), (model.backbone if exits else model).depth(None):  # same batch: same BN statistics
        super_net = model.forward_exits(x)[-1] if exits else model.forward_head(model.forward_features(x))
    torch.testing.assert_close(result["output"].detach(), super_net)  # the output is the super-net's last exit


def test_pcgrad_loss_carries_the_deconflicted_gradient():
    model = _msdnet()
    reference, plain = copy.deepcopy(model), copy.deepcopy(model)
    task = MultiExitTask(model, "PCGrad", seed=3, verbose=False)
    generator = torch.Generator().manual_seed(3)
    projections = 0
    for seed in (0, 1):  # two accumulated batches: the gradients add up as pcgrad_backward's do
        x, y = _batch(seed=seed)
        result = task(x, y)
        (result["loss"] / 2).backward()
        losses = [F.cross_entropy(z, y) / 2 for z in reference.forward_exits(x)]
        projections += pcgrad_backward(losses, list(reference.parameters()), generator=generator)["projections"]
        torch.testing.assert_close(result["loss"].detach(), 2 * sum(losses).detach())
        sum(F.cross_entropy(z, y) / 2 for z in plain.forward_exits(x)).backward()
    assert projections > 0
    _assert_same_grads(model, reference)
    differs = [n for n, g in _grads(model).items() if not torch.allclose(g, _grads(plain)[n], atol=1e-6)]
    assert differs  # the deconflicted gradient is not the plain sum's
    state = task.get_task_state()
    assert torch.equal(state["technique"]["pcgrad_generator"], generator.get_state())


def _exit_losses(model, x, y, depth=None):
    """Every exit's cross-entropy (ADN: at the ``depth`` configuration)."""
    adaptive = getattr(model, "backbone", None)
    with torch.no_grad(), (adaptive.depth(depth) if hasattr(adaptive, "depth") else contextlib.nullcontext()):
        return [float(F.cross_entropy(z, y)) for z in model.forward_exits(x)]


@pytest.mark.parametrize("technique, options", [
    ("CrossEntropy", dict()),
    ("PCGrad", dict(gradient_equilibrium=True)),
    ("HDKD", dict()),
    ("ADN", dict()),
])
def test_a_short_loop_lowers_the_loss_of_every_exit(technique, options):
    x, y = _batch(8, 6 if technique == "ADN" else 10, seed=5)
    model = _adn(exits=True) if technique == "ADN" else _msdnet()
    if technique == "HDKD":
        options = dict(held_out=[_batch(8, seed=6)], xi=0.01)
    task = MultiExitTask(model, technique, verbose=False, **options)
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="adamw", lr=3e-3 if technique == "ADN" else 1e-2,
                                    weight_decay=0.0)
    configs = (None, "TTTT") if technique == "ADN" else (None,)  # ADN: the super-net's and the base-net's exits

    def exit_losses():
        return {c: _exit_losses(model, x, y, c) for c in configs}

    before = exit_losses()
    for _ in range(6):
        optimizer.zero_grad()
        task(x, y)["loss"].backward()
        optimizer.step()
    after = exit_losses()
    for c in configs:
        assert all(a < b for a, b in zip(after[c], before[c])), (c, before[c], after[c])


def test_ofa_loop_trains_every_new_head(tmp_path):
    _, path = _phase_one(tmp_path)
    task = MultiExitTask("msdnet_cifar_5exit", "OneForAll", model_kwargs=TINY, previous=path, verbose=False)
    x, y = _batch(8, seed=5)
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="adamw", lr=1e-2, weight_decay=0.0)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == \
        sum(p.numel() for p in task.model.parameters() if p.requires_grad)  # the frozen network is not optimised
    before = _exit_losses(task.model, x, y)
    for _ in range(6):
        optimizer.zero_grad()
        task(x, y)["loss"].backward()
        optimizer.step()
    assert all(a < b for a, b in zip(_exit_losses(task.model, x, y), before))


def test_ema_eval_model_and_checkpoint_state_are_the_network(tmp_path):
    model = _msdnet()
    held_out = [_batch(seed=10)]
    hdkd = dict(xi=0.05, interval=2)
    task = MultiExitTask(model, "HDKD", held_out=held_out, verbose=False, **hdkd)
    ema = task.setup_ema(decay=0.5)
    assert isinstance(ema, ModelEmaV3) and task.has_ema()
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.1)
    for seed in (0, 1):
        task(*_batch(seed=seed))["loss"].backward()
    optimizer.step()
    hdkd_technique = task.technique
    assert hdkd_technique.optimizer.state[hdkd_technique.weights.ce_logits]["step"] == 1  # interval 2: one update in two calls
    before = {k: v.clone() for k, v in task.get_eval_model(ema=True).state_dict().items()}
    task.update_ema(step=5)  # (timm: step 1 copies the weights)
    eval_model = task.get_eval_model()
    ema_model = task.get_eval_model(ema=True)
    assert eval_model is model and type(ema_model) is type(model)  # not the training wrapper
    name = "exits.0.fc.weight"
    torch.testing.assert_close(ema_model.state_dict()[name], 0.5 * before[name] + 0.5 * model.state_dict()[name])
    x = _batch()[0]
    assert isinstance(ema_model.eval()(x), torch.Tensor) and ema_model(x).shape == (4, 10)  # eval: the last exit

    state = task.get_checkpoint_state()
    assert state["state_dict"].keys() == model.state_dict().keys()  # loads into timm.create_model(...)
    timm.create_model("msdnet_cifar_5exit", **TINY).load_state_dict(state["state_dict"])
    assert set(state["task_state"]) == {"technique", "calls"}
    assert set(state["task_state"]["technique"]) == {"hdkd_weights", "hdkd_optimizer", "hdkd_val_loss"}
    assert "task_state_ema" not in task.get_checkpoint_state(ema=True)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(dict(state, epoch=0), path)
    other = MultiExitTask(_msdnet(seed=2), "HDKD", held_out=held_out, verbose=False, **hdkd)
    resume_task_checkpoint(other, str(path), log_info=False)  # timm's resume (weights-only load)
    torch.testing.assert_close(other.technique.weights.kd_logits, task.technique.weights.kd_logits)
    assert other.trainer.calls == 2 and torch.equal(other.technique.val_loss.expected, task.technique.val_loss.expected)
    assert other.technique.optimizer.state_dict()["state"][0]["step"] == 1
    assert torch.equal(other.model.exits[0].fc.weight, model.exits[0].fc.weight)


def test_optimizer_sees_the_model_through_the_wrapper():
    task = MultiExitTask(_msdnet(), "CrossEntropy", verbose=False)
    trainable = task.get_trainable_module()
    decay = create_optimizer_v2(trainable, opt="sgd", lr=0.1, weight_decay=1e-4)
    no_decay = {id(p) for g in decay.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(task.model.exits[0].fc.bias) in no_decay and id(task.model.exits[0].fc.weight) not in no_decay
    layered = create_optimizer_v2(trainable, opt="sgd", lr=0.1, layer_decay=0.5)  # through group_matcher
    scales = {g["lr_scale"] for g in layered.param_groups}
    assert len(scales) > 2
    assert sum(len(g["params"]) for g in layered.param_groups) == len(list(task.model.parameters()))
    vit = timm.create_model("vit_tiny_patch16_224_adn", img_size=32, num_classes=3)  # has no_weight_decay()
    decay = create_optimizer_v2(MultiExitTask(vit, "ADN", verbose=False).get_trainable_module(), opt="sgd", lr=0.1,
                                weight_decay=1e-4)
    no_decay = {id(p) for g in decay.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(vit.pos_embed) in no_decay and id(vit.patch_embed.proj.weight) not in no_decay


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# MSDNet trains channels-last: DDP notes that its gradients' strides differ from its buckets' (speed only)
@pytest.mark.filterwarnings("ignore:Grad strides do not match bucket view strides")
@pytest.mark.parametrize("technique", ["CrossEntropy", "ADN", "PCGrad"])
def test_prepare_distributed_keeps_loss_and_gradients(process_group, technique):
    model = _adn() if technique == "ADN" else _msdnet()
    reference = copy.deepcopy(model)
    task = MultiExitTask(model, technique, verbose=False)
    plain = MultiExitTask(reference, technique, verbose=False)
    task.prepare_distributed()
    assert isinstance(task.get_trainable_module(), torch.nn.parallel.DistributedDataParallel)
    assert task.model is model and task.get_eval_model() is model
    x, y = _batch(classes=6 if technique == "ADN" else 10)
    result, expected = task(x, y), plain(x, y)
    result["loss"].backward()
    expected["loss"].backward()
    torch.testing.assert_close(result["loss"], expected["loss"])
    _assert_same_grads(model, reference)


def test_bad_input_is_refused_with_a_clear_error(tmp_path):
    msdnet = _msdnet()
    with pytest.raises(ValueError, match="unknown technique type 'focal'"):
        MultiExitTask(msdnet, "focal")
    with pytest.raises(ValueError, match="needs a multi-exit model"):
        MultiExitTask(timm.create_model("resnet18", num_classes=3), "CrossEntropy")
    with pytest.raises(ValueError, match="CrossEntropy needs a multi-exit model .*got ResNet"):
        MultiExitTask("resnet18", "CrossEntropy", model_kwargs=dict(num_classes=3))
    with pytest.raises(ValueError, match="needs an adaptive-depth model"):
        MultiExitTask(msdnet, "ADN")
    with pytest.raises(TrainerError, match=r"HDKD needs batches of a held-out split.*MultiExitTask\(\.\.\., held_out=loader\)"):
        MultiExitTask(msdnet, "HDKD")
    with pytest.raises(TrainerError, match="L2W needs optimizer updates inside a batch.*the accelerate engine"):
        MultiExitTask(msdnet, "L2W")
    with pytest.raises(ValueError, match="held_out is for a technique that learns on held-out batches; CrossEntropy"):
        MultiExitTask(msdnet, "CrossEntropy", held_out=[_batch()])
    with pytest.raises(ValueError, match="HDKD has no option 'learning_rate'"):
        MultiExitTask(msdnet, "HDKD", held_out=[_batch()], learning_rate=1.0)
    with pytest.raises(ValueError, match="gives no batch"):
        MultiExitTask(msdnet, "HDKD", held_out=[], xi=0.1, verbose=False)(*_batch())
    with pytest.raises(ValueError, match="attach_optimizer"):
        MultiExitTask(msdnet, "HDKD", held_out=[_batch()], verbose=False)(*_batch())
    with pytest.raises(ValueError, match=r"a technique of its own: technique=dict\(type='PCGrad'"):
        MultiExitTask(_adn(), "ADN", deconfliction="pcgrad")
    with pytest.raises(ValueError, match="deconfliction must be None, 'symmetric' or 'protect_deeper', got 'pcgrad_pl"):
        MultiExitTask(msdnet, "CrossEntropy", deconfliction="pcgrad_please")
    with pytest.raises(ValueError, match="PCGrad has no option 'mode'"):
        MultiExitTask(msdnet, "PCGrad", mode="tensor")
    with pytest.raises(ValueError, match="ADN has no option 'label_smoothing'"):
        MultiExitTask(_adn(), "ADN", label_smoothing=0.1)
    with pytest.raises(ValueError, match="has none that train"):
        MultiExitTask(_adn(), "ADN", gradient_equilibrium=True)
    with pytest.raises(ValueError, match="phase II trains new heads on a frozen one"):
        MultiExitTask(msdnet, "OneForAll", deconfliction="symmetric")
    with pytest.raises(ValueError, match="need a model name"):
        MultiExitTask(msdnet, "OneForAll", previous=str(tmp_path / "phase1.safetensors"))
    with pytest.raises(ValueError, match="starts from the phase-I weights"):
        MultiExitTask("msdnet_cifar_5exit", "OneForAll", model_kwargs=TINY)
    with pytest.raises(ValueError, match="go with a technique's type name"):
        MultiExitTask(msdnet, dict(type="CrossEntropy"), label_smoothing=0.1)
    with pytest.raises(ValueError, match="grad_accum_steps must be an integer >= 1"):
        MultiExitTask(msdnet, "CrossEntropy", grad_accum_steps=0)
