"""L2W-DEN: one part-1 iteration against an independent re-statement of the reference loop (a
deepcopy and a hand-written SGD-with-momentum step, float64), the budgeted allocation of the meta
samples, the virtual step against torch's SGD, batch-norm statistics left alone by the meta step,
the accelerate engine (in process, checkpoint resume) and two processes under DDP."""
import copy
import math
import os
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from timm_exits import MSDNet
from timm_exits.config import ConfigError, load_config
from timm_exits.quotas import geometric_fractions
from timm_exits.engine import TrainingPhase, run
from timm_exits.task import MultiExitTask
from timm_exits.train import L2W, PlainTrainer, TrainerError, build_technique, sgd_virtual_step
from timm_exits.train.l2w import allocated_loss, budget_allocation, l2w_meta_step

from helpers import MM_TINY_MSDNET, TINY_MSDNET, mm_runner, randomise_norms, tiny_data, write_config
from launch import launch_two_processes


def _msdnet(dtype=torch.float64):
    torch.manual_seed(0)
    model = MSDNet(num_blocks=3, base=1, step=1, num_channels=4, growth_rate=2, gr_factor=[1], bn_factor=[1],
                   stem_type="cifar", head_channels=8, num_classes=3, img_size=8)
    return randomise_norms(model).to(dtype).train()


def _batch(n=16, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _warm_start(model, lr=0.1, momentum=0.9, weight_decay=1e-3):
    """The model's SGD after one plain step, so that it holds momentum buffers."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    x, y = _batch(seed=2)
    sum(F.cross_entropy(z, y) for z in model.forward_exits(x)).backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def _set_parameter(model, name, value):
    module_name, _, leaf = name.rpartition(".")
    model.get_submodule(module_name)._parameters[leaf] = value


def test_part_one_matches_a_re_statement_of_the_reference_loop():
    lr, momentum, wd, eps = 0.1, 0.9, 1e-3, 0.8
    model = _msdnet()
    technique = L2W(epsilon=eps, constraint_dimension="col", hidden_size=16, lr=0.05, weight_decay=1e-3)
    model = technique.prepare(model)
    optimizer = _warm_start(model, lr, momentum, wd)
    start_model, start_net = copy.deepcopy(model), copy.deepcopy(technique.weight_net)
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    x, y = _batch()
    (x1, y1), (x2, y2) = (x[:8], y[:8]), (x[8:], y[8:])

    seen = {}

    class Recording(PlainTrainer):
        def update(self, loss):  # part 1's update, inside the batch: what our code did so far
            seen["meta"] = technique.last_meta
            seen["net"] = [p.detach().clone() for p in technique.weight_net.parameters()]
            super().update(loss)
            seen["params"] = [p.detach().clone() for p in model.parameters()]
            seen["momentum"] = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
            seen["buffers"] = {k: v.clone() for k, v in model.named_buffers()}

    technique.train_step(Recording(model, technique, optimizer), x, y)
    assert "params" in seen  # the first half's update was taken inside the step

    # --- the reference's part 1, re-stated: a pseudo copy in train mode, a hand-written MetaSGD step
    W1, b1, W2, b2 = [p.detach().clone().requires_grad_(True) for p in start_net.parameters()]

    def net(losses):
        return torch.tanh(F.linear(F.relu(F.linear(losses, W1, b1)), W2, b2))

    pseudo = copy.deepcopy(start_model)
    pseudo.channels_last_training = False  # the plain path: its backward is twice differentiable
    names, params = zip(*pseudo.named_parameters())
    ce = torch.stack([F.cross_entropy(z, y1, reduction="none") for z in pseudo.forward_exits(x1)], 1)
    m = net(ce.detach())
    pseudo_weights = 1 + eps * (m - m.mean(1, keepdim=True))
    grads = torch.autograd.grad((pseudo_weights * ce).mean(0).sum(), params, create_graph=True)
    for name, p, g, buf in zip(names, params, grads, buffers):
        _set_parameter(pseudo, name, p.detach() - lr * (momentum * buf + (g + wd * p.detach())))
    meta_logits = pseudo.forward_exits(x2)
    n, num_exits = len(y2), len(meta_logits)
    shares = [0.75 ** k for k in range(1, num_exits + 1)]
    quotas = [math.floor(n * s / sum(shares)) for s in shares]
    assert quotas == [3, 2, 1]  # 8 meta samples: 3, 2, then the last exit takes the other 3
    used, meta_loss = [], 0.0
    for k, z in enumerate(meta_logits):
        confidence = z.detach().softmax(1).max(1).values.tolist()
        order = sorted(range(n), key=lambda i: -confidence[i])
        free = [i for i in order if i not in used]
        picked = free if k == num_exits - 1 else free[:quotas[k]]
        used += picked
        if picked:
            meta_loss = meta_loss + F.cross_entropy(z[picked], y2[picked])
    net_grads = torch.autograd.grad(meta_loss, [W1, b1, W2, b2])
    adam = torch.optim.Adam([W1, b1, W2, b2], lr=0.05, weight_decay=1e-3)
    for p, g in zip([W1, b1, W2, b2], net_grads):
        p.grad = g
    adam.step()
    # the real step: weights of the updated net, one SGD-with-momentum step written out
    real = copy.deepcopy(start_model)
    ce = torch.stack([F.cross_entropy(z, y1, reduction="none") for z in real.forward_exits(x1)], 1)
    with torch.no_grad():
        m = net(ce)
        weights = 1 + eps * (m - m.mean(1, keepdim=True))
    grads = torch.autograd.grad((weights * ce).mean(0).sum(), list(real.parameters()))
    new_momentum = [momentum * buf + g + wd * p.detach() for p, g, buf in zip(real.parameters(), grads, buffers)]
    new_params = [p.detach() - lr * b for p, b in zip(real.parameters(), new_momentum)]

    close = dict(rtol=1e-9, atol=1e-12)
    assert torch.allclose(seen["meta"]["weights"], pseudo_weights.detach(), **close)
    assert (seen["meta"]["weights"] - 1).abs().max() > 1e-3  # not trivially 1
    assert torch.allclose(seen["meta"]["meta_loss"], meta_loss.detach(), **close)
    assert all(torch.allclose(a, b, **close) for a, b in zip(seen["meta"]["grads"], net_grads))
    assert all(b.abs().max() > 1e-6 for b in net_grads)
    assert all(torch.allclose(a, b.detach(), **close) for a, b in zip(seen["net"], [W1, b1, W2, b2]))
    assert all(torch.allclose(a, b, **close) for a, b in zip(seen["params"], new_params))
    assert all(torch.allclose(a, b, **close) for a, b in zip(seen["momentum"], new_momentum))
    # batch norm statistics: one real forward's worth, the pseudo forwards left no trace
    assert all(torch.allclose(seen["buffers"][k], v, **close) for k, v in real.named_buffers())


def test_budget_allocation_by_hand():
    confidences = torch.tensor([[0.9, 0.99, 0.0], [0.2, 0.6, 0.0], [0.8, 0.1, 0.0],
                                [0.1, 0.5, 0.0], [0.7, 0.98, 0.0], [0.3, 0.4, 0.0]])
    # quotas floor(6 * 0.5) = 3, floor(6 * 0.34) = 2; exit 2's most confident samples 0 and 4 are taken
    chosen = budget_allocation(confidences, [0.5, 0.34, 0.16])
    assert [c.tolist() for c in chosen] == [[0, 2, 4], [1, 3], [5]]
    # a quota larger than what is left takes what is left; the last exit may take nothing
    chosen = budget_allocation(confidences[:, :2], [0.9, 0.1])
    assert [sorted(c.tolist()) for c in chosen] == [[0, 1, 2, 4, 5], [3]]
    # L2W's budget: q_k ~ 0.75^k; 4 samples on 5 exits: floor(4 * 0.328) = 1 to the first, 3 to the last
    shares = [0.75 ** k / sum(0.75 ** j for j in range(1, 6)) for k in range(1, 6)]
    assert geometric_fractions(0.75, 5) == pytest.approx(shares, rel=1e-6)
    chosen = budget_allocation(torch.tensor([[0.1] * 5, [0.9] * 5, [0.2] * 5, [0.3] * 5]), shares)
    assert [c.tolist() for c in chosen] == [[1], [], [], [], [3, 2, 0]]


def test_meta_loss_sums_the_exits_means():
    logits = [torch.tensor([[3.0, 0.0], [0.0, 0.5], [2.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])]
    target = torch.tensor([0, 1, 1])
    # fractions [0.34, 0.66]: exit 1 takes floor(3 * 0.34) = 1 sample, its most confident (0); exit 2 the rest
    expected = F.cross_entropy(logits[0][[0]], target[[0]]) + F.cross_entropy(logits[1][[1, 2]], target[[1, 2]])
    assert allocated_loss(logits, target, [0.34, 0.66]).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("options", [dict(momentum=0.0), dict(momentum=0.9, weight_decay=1e-2),
                                     dict(momentum=0.9, dampening=0.3, weight_decay=1e-3),
                                     dict(momentum=0.8, nesterov=True, weight_decay=1e-3),
                                     dict(momentum=0.9, maximize=True)])
def test_virtual_step_is_torch_sgds_step(options):
    model = _msdnet()
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD([{"params": list(params.values())[:3], "lr": 0.3},
                                 {"params": list(params.values())[3:]}], lr=0.1, **options)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # without a momentum buffer, then with one
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params.values()]
        grads[5] = None  # a parameter without a gradient keeps its value
        stepped = sgd_virtual_step(params, grads, optimizer)
        for p, grad in zip(params.values(), grads):
            p.grad = grad
        optimizer.step()
        assert all(torch.allclose(stepped[n], p, rtol=1e-12, atol=1e-14) for n, p in params.items())


def test_meta_step_leaves_the_model_its_statistics_and_the_optimizer_alone():
    model = _msdnet()
    technique = L2W(hidden_size=16)
    model = technique.prepare(model)
    optimizer = _warm_start(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    net_before = [p.detach().clone() for p in technique.weight_net.parameters()]
    x, y = _batch()
    out = l2w_meta_step(model, technique.weight_net, technique.weight_optimizer, optimizer, (x[:8], y[:8]),
                        (x[8:], y[8:]), 0.8, "col", technique.fractions)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running mean / var, num_batches_tracked too
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: nothing accumulated into the model
    assert all(torch.equal(a, optimizer.state[p]["momentum_buffer"]) for a, p in zip(momentum, model.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(net_before, technique.weight_net.parameters()))
    assert model.channels_last_training  # switched back on after the plain path
    assert torch.isfinite(out["meta_loss"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("l2w") / "data")


def test_engine_trains_l2w_and_a_resume_restores_the_weight_net(data, tmp_path):
    extra = ("tracker = None\ntrain = dict(epochs=1)\n"
             "technique = dict(type='L2W', hidden_size=16, lr=0.01, meta_interval=2)")
    config = load_config(str(write_config(tmp_path / "c.py", data, TINY_MSDNET, extra)), output_dir=str(tmp_path / "o"))
    phase = TrainingPhase(Accelerator(cpu=True), config, str(tmp_path / "o"))
    phase.start()
    initial = copy.deepcopy(phase.technique.weight_net.state_dict())
    phase.train_epoch(0)
    trained = phase.technique.state_dict()
    assert phase.state["updates"] == 4  # 4 batches of 8, each two halves of 4
    assert any(not torch.equal(initial[k], v) for k, v in trained["l2w_weight_net"].items())
    assert trained["l2w_optimizer"]["state"][0]["step"] == 4  # meta steps on batches 0 and 2, both halves
    resumed = TrainingPhase(Accelerator(cpu=True), config, str(tmp_path / "o"), resume=True)
    fresh = copy.deepcopy(resumed.technique.weight_net.state_dict())
    assert all(torch.equal(initial[k], v) for k, v in fresh.items())  # the same seeded start
    resumed.start(resume=True)
    restored = resumed.technique.state_dict()
    assert all(torch.equal(v, restored["l2w_weight_net"][k]) for k, v in trained["l2w_weight_net"].items())
    adam, adam_restored = trained["l2w_optimizer"]["state"], restored["l2w_optimizer"]["state"]
    assert adam.keys() == adam_restored.keys()
    assert all(torch.equal(adam[i][k], adam_restored[i][k]) for i in adam for k in ("exp_avg", "exp_avg_sq"))


def test_l2w_errors_are_clear(data, tmp_path):
    with pytest.raises(ValueError, match="L2W option constraint_dimension must be 'mat', 'col' or 'row', got 'diag'"):
        L2W(constraint_dimension="diag")
    with pytest.raises(ValueError, match="L2W option epsilon must be a number > 0.0, got 0.0"):
        L2W(epsilon=0.0)
    with pytest.raises(ValueError, match="L2W has no option 'eps' \\(did you mean 'epsilon'\\?\\)"):
        L2W(eps=0.3)
    with pytest.raises(ValueError, match="L2W option input_type must be 'loss', 'conf' or 'both', got 'logits'"):
        L2W(input_type="logits")
    with pytest.raises(ValueError, match="does not combine with gradient_equilibrium"):
        L2W(gradient_equilibrium=True)
    with pytest.raises(ConfigError, match="technique: L2W has no option 'epsilonn' \\(did you mean 'epsilon'\\?\\)"):
        load_config(str(write_config(tmp_path / "c.py", data, extra="technique = dict(type='L2W', epsilonn=1)")))
    model = _msdnet()
    technique = L2W(hidden_size=8)
    model = technique.prepare(model)
    x, y = _batch(n=1)
    with pytest.raises(ValueError, match="batch size must be at least 2, got 1"):
        PlainTrainer(model, technique, torch.optim.SGD(model.parameters(), lr=0.1)).step(x, y)
    x, y = _batch(n=4)
    with pytest.raises(ValueError, match="follows torch.optim.SGD .* is AdamW"):
        PlainTrainer(model, technique, torch.optim.AdamW(model.parameters())).step(x, y)
    # a trainer that cannot take an update inside a batch: refused before training, naming the ones that can
    with pytest.raises(TrainerError, match="L2W needs optimizer updates inside a batch.*timm's training task "
                                           "\\(MultiExitTask\\) does not give.*accelerate engine \\(train.grad_accum_steps=1\\)"):
        MultiExitTask(_msdnet(torch.float32), "L2W", verbose=False)
    config = load_config(str(write_config(tmp_path / "c.py", data, extra="tracker = None\ntechnique = dict(type='L2W')\n"
                                                                         "train = dict(grad_accum_steps=2)")),
                         output_dir=str(tmp_path / "o"))
    with pytest.raises(TrainerError, match="L2W needs optimizer updates inside a batch, without gradient accumulation, "
                                           "which the accelerate engine does not give here.*train.grad_accum_steps=1"):
        run(config)
    assert not (tmp_path / "o" / "checkpoint").exists()  # refused before training


DDP_SCRIPT = textwrap.dedent('''
    import gc, os
    import torch
    from accelerate import Accelerator
    from timm_exits.config import load_config
    from timm_exits.engine import TrainingPhase, run

    accelerator = Accelerator(cpu=True)
    out = os.environ["OUTPUT_DIR"]
    phase = TrainingPhase(accelerator, load_config(os.environ["CONFIG"], output_dir=out), out)
    phase.start()  # the same seeded network and weight net on every process
    technique = phase.technique
    start = torch.cat([p.detach().reshape(-1) for p in technique.weight_net.parameters()]).clone()
    phase.train_epoch(0)  # every process on its own shard of the data
    net = torch.cat([p.detach().reshape(-1) for p in technique.weight_net.parameters()])
    flat = torch.cat([p.detach().reshape(-1) for p in phase.model.parameters()])
    nets, models = accelerator.gather(net.unsqueeze(0)), accelerator.gather(flat.unsqueeze(0))
    if accelerator.is_main_process:
        print(f"RESULT processes={accelerator.num_processes} nets={torch.equal(nets[0], nets[1])} "
              f"models={torch.equal(models[0], models[1])} moved={not torch.equal(net, start)} "
              f"meta_steps={technique.weight_optimizer.state_dict()['state'][0]['step']:.0f}")
    accelerator.wait_for_everyone()
    # the DDP wrapper holds the process group: free it (and the accelerator's references to it) before
    # end_training destroys the group; a wrapper outliving its group can abort gloo at interpreter exit
    del phase, technique
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
''')


@pytest.mark.slow
def test_weight_nets_stay_identical_under_two_process_ddp(data, tmp_path):
    """The engine under two-process DDP: every process takes L2W's steps on its own shard of the data
    and ends with the same network and weight net (the meta gradients are averaged by hand)."""
    script = tmp_path / "ddp_l2w.py"
    script.write_text(DDP_SCRIPT)
    config = write_config(tmp_path / "c.py", data, extra="tracker = None\ntrain = dict(epochs=1)\n"
                                                         "technique = dict(type='L2W', hidden_size=16, lr=0.01)")
    run = launch_two_processes(str(script), CONFIG=str(config), OUTPUT_DIR=str(tmp_path / "o"))
    assert run.returncode == 0, run.stderr[-3000:]
    # 32 training images, a global batch of 8 (4 per process): 4 batches, a meta step per half
    assert "RESULT processes=2 nets=True models=True moved=True meta_steps=8" in run.stdout


def test_the_technique_base_gives_the_reference_cifar_settings(data, tmp_path):
    base = Path(__file__).resolve().parents[1] / "recipes" / "_base_" / "techniques" / "l2w.py"
    config = load_config(str(write_config(tmp_path / "c.py", data, extra=f"_base_ = [{str(base)!r}]")))
    technique = build_technique(config["technique"])
    assert isinstance(technique, L2W)
    o = technique.options
    assert (o.epsilon, o.constraint_dimension, o.input_type, o.hidden_size, o.meta_interval, o.lr, o.weight_decay,
            o.target_p) == (0.8, "col", "loss", 500, 1, 1e-4, 1e-4, 0.75)


@pytest.mark.parametrize("follows, expected", [(True, 0.5e-3), (False, 1e-3)])
def test_the_weight_nets_lr_follows_the_networks_schedule(follows, expected):
    model = _msdnet()
    technique = L2W(hidden_size=8, lr=1e-3, lr_follows_schedule=follows)
    model = technique.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4)
    optimizer.param_groups[0]["initial_lr"] = 0.8  # what a scheduler sets: halfway down a cosine from 0.8
    x, y = _batch(n=8)
    technique.update_weights(model, optimizer, (x[:4], y[:4]), (x[4:], y[4:]))
    assert technique.weight_optimizer.param_groups[0]["lr"] == pytest.approx(expected)


@pytest.mark.slow
def test_the_mmengine_adapter_trains_l2w_and_resumes_its_weight_net(tmp_path):
    """A real Runner, no hook needed: L2W's own steps (the weight net learns, two updates per batch, a
    meta step per half), its weight net, Adam state and update count in the checkpoint (the model's
    state dict) and back on resume."""
    from timm_exits.integrations.mmengine import MultiExitClassifier, enable_resume

    model = dict(MM_TINY_MSDNET, technique=dict(type="L2W", hidden_size=16))
    runner = mm_runner(tmp_path, model, iters=2)
    technique = runner.model.technique
    net0 = {k: v.clone() for k, v in technique.weight_net.state_dict().items()}
    runner.train()
    net = technique.weight_net.state_dict()
    assert all(not torch.equal(net0[k], net[k]) for k in net)  # the meta steps trained the weight net
    assert technique.weight_optimizer.state_dict()["state"][0]["step"] == 4  # 2 batches, a meta step per half
    assert runner.model.updates == 2  # L2W's intervals count batches
    assert len(runner.optim_wrapper.optimizer.state) and all(  # the SGD updates left their momentum buffers
        s["momentum_buffer"] is not None for s in runner.optim_wrapper.optimizer.state.values())
    checkpoint = MultiExitClassifier(**model)  # what the checkpoint's state dict holds
    checkpoint.load_state_dict(torch.load(tmp_path / "run" / "iter_2.pth", weights_only=False)["state_dict"])
    assert all(torch.equal(checkpoint.technique.weight_net.state_dict()[k], net[k]) for k in net)
    assert checkpoint.updates == 2
    enable_resume()
    resumed = mm_runner(tmp_path, model, iters=2, resume=True)
    assert not all(torch.equal(v, net[k]) for k, v in resumed.model.technique.weight_net.state_dict().items())
    resumed.train()  # nothing left to train: only the resume
    state = resumed.model.technique.state_dict()
    assert all(torch.equal(state["l2w_weight_net"][k], net[k]) for k in net)
    assert state["l2w_optimizer"]["state"][0]["step"] == 4 and resumed.model.updates == 2


def test_the_mmengine_loss_path_and_accumulation_refuse_l2w():
    """L2W takes an optimizer update inside every batch: MMDistributedDataParallel's train_step calls
    the model's loss, not its train_step (L2W would train there without meta steps), and
    accumulative_counts=2 leaves no update inside a batch; both are errors that say what to do."""
    from mmengine.optim import OptimWrapper

    from timm_exits.integrations.mmengine import MultiExitClassifier

    model = MultiExitClassifier(**MM_TINY_MSDNET, technique=dict(type="L2W", hidden_size=8))
    images, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"trains through its technique's own step \(L2W\), which "
                                         r"MMDistributedDataParallel does not call.*MultiExitDistributedDataParallel"):
        model(images, target, mode="loss")
    before = {k: v.clone() for k, v in model.state_dict().items() if k != "_extra_state"}
    accumulating = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    with pytest.raises(TrainerError, match=r"L2W needs optimizer updates inside a batch, without gradient "
                                           r"accumulation, which mmengine does not give here.*accumulative_counts=1"):
        model.train_step(dict(inputs=images, data_samples=target), accumulating)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # refused before any step
    assert model.updates == 0


MM_DDP_SCRIPT = textwrap.dedent('''
    import gc, os, sys, torch
    from accelerate import PartialState
    from mmengine.runner import Runner
    import timm_exits.integrations.mmengine
    sys.path.insert(0, os.environ["TESTS_DIR"])
    from helpers import mm_loader, MM_TINY_MSDNET

    state = PartialState(cpu=True)  # gloo, before the Runner (its own init_dist needs CUDA)
    runner = Runner(
        model=dict(type="MultiExitClassifier", **MM_TINY_MSDNET, technique=dict(type="L2W", hidden_size=16, lr=0.01)),
        work_dir=os.environ["WORK_DIR"], train_dataloader=mm_loader(), train_cfg=dict(by_epoch=False, max_iters=3),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)),
        launcher="pytorch", env_cfg=dict(dist_cfg=dict(backend="gloo")),
        cfg=dict(model_wrapper_cfg=dict(type=os.environ["WRAPPER"], device_ids=None)),
        randomness=dict(seed=0), default_scope="mmengine")
    technique = runner.model.module.technique
    start = torch.cat([p.detach().reshape(-1) for p in technique.weight_net.parameters()]).clone()
    try:
        runner.train()
        net = torch.cat([p.detach().reshape(-1) for p in technique.weight_net.parameters()])
        flat = torch.cat([p.detach().reshape(-1) for p in runner.model.parameters()])
        nets, models = ([torch.zeros_like(t) for _ in range(2)] for t in (net, flat))
        torch.distributed.all_gather(nets, net)
        torch.distributed.all_gather(models, flat)
        steps = len(runner.optim_wrapper.optimizer.state) and next(iter(
            technique.weight_optimizer.state.values()))["step"].item()
        if state.is_main_process:
            print(f"RESULT nets={torch.equal(*nets)} models={torch.equal(*models)} moved={not torch.equal(net, start)} "
                  f"meta_steps={steps:.0f}")
    except ValueError as e:
        if state.is_main_process:
            print(f"REFUSED {e}")
    state.wait_for_everyone()
    del runner  # free the DDP wrapper (it holds the process group) before destroying the group
    gc.collect()
    state.destroy_process_group()
''')


@pytest.mark.slow
def test_the_mmengine_ddp_wrapper_trains_l2w_in_two_processes(tmp_path):
    """A real Runner under two-process DDP (gloo): with MultiExitDistributedDataParallel every process
    takes L2W's steps on its own shard of the data and ends with the same network and weight net
    (gradients and meta gradients averaged; without the averaging they would differ); with mmengine's
    own wrapper the run is refused instead of training without meta steps."""
    script = tmp_path / "mm_ddp_l2w.py"
    script.write_text(MM_DDP_SCRIPT)
    tests = os.path.dirname(__file__)
    run = launch_two_processes(str(script), WORK_DIR=str(tmp_path / "ddp"), TESTS_DIR=tests,
                               WRAPPER="MultiExitDistributedDataParallel")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RESULT nets=True models=True moved=True meta_steps=6" in run.stdout  # 3 batches, 2 halves
    plain = launch_two_processes(str(script), WORK_DIR=str(tmp_path / "plain"), TESTS_DIR=tests,
                                 WRAPPER="MMDistributedDataParallel")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "REFUSED MultiExitClassifier trains through its technique's own step (L2W)" in plain.stdout
