"""The techniques through mmengine: every technique trains a tiny multi-exit model for a few
iterations with a real Runner on CPU, each the technique's own step (PCGrad's deconflicted gradients
under the plain optimizer wrapper, HDKD's interval counted in optimizer updates under gradient
accumulation, SDN's weights following the runner's epoch), checkpoints save and resume the
technique's state, and PCGrad runs under 2-process DDP (gloo)."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.optim import OptimWrapper
from mmengine.runner import Runner
from safetensors.torch import save_file

import timm

from timm_exits.integrations.mmengine import MultiExitClassifier, enable_resume
from timm_exits.models.multi_exit import exit_logits
from timm_exits.train import TrainerError, pcgrad_backward

from helpers import MM_TINY_MSDNET as TINY_MSDNET, TinyImages, mm_loader as _loader, mm_runner as _runner
from launch import launch_two_processes


def _train(runner):
    before = [p.detach().clone() for p in runner.model.parameters()]
    runner.train()
    after = list(runner.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "no parameter moved"
    metrics = runner.message_hub.get_scalar("val/multi_exit/exit1_top1").current()
    assert 0 <= metrics <= 100
    return runner


@pytest.mark.parametrize("technique", ["ce", "gradient_equilibrium", "branch_deconfliction", "pcgrad", "hdkd"])
@pytest.mark.slow
def test_each_technique_trains_with_the_runner(tmp_path, technique):
    model, hooks = dict(TINY_MSDNET), []
    if technique == "gradient_equilibrium":
        hooks = [dict(type="GradientEquilibriumHook")]
    elif technique == "branch_deconfliction":
        hooks = [dict(type="GradientDeconflictionHook", mode="protect_deeper")]
    elif technique == "pcgrad":
        model["technique"] = dict(type="PCGrad", scope="global", order="random")
    elif technique == "hdkd":
        model["technique"] = dict(type="HDKD", lr=0.05)
        hooks = [dict(type="HeldOutBatchesHook", dataloader=_loader(seed=2))]
    runner = _train(_runner(tmp_path, model, hooks=hooks))
    inner = runner.model.model
    if technique == "gradient_equilibrium":
        assert inner.gradient_equilibrium is True
    if technique == "branch_deconfliction":
        assert inner.gradient_deconfliction == "protect_deeper"
    if technique == "hdkd":
        assert runner.model.technique.weights.ce_logits.abs().sum() > 0  # the weights were updated
        assert runner.model.technique.options.lr == 0.05  # the config's options


def test_imta_phase_two_and_adn_with_the_runner(tmp_path):
    torch.manual_seed(0)
    phase_one = timm.create_model(TINY_MSDNET["model"], **TINY_MSDNET["model_kwargs"])
    path = tmp_path / "phase1.safetensors"
    save_file({k: v.contiguous() for k, v in phase_one.state_dict().items()}, path)
    runner = _runner(tmp_path, dict(TINY_MSDNET, previous=str(path),
                                    technique=dict(type="OneForAll", temperature=3.0, gamma=0.9)), name="imta")
    assert all(torch.equal(v, runner.model.model.backbone.state_dict()[k]) for k, v in phase_one.state_dict().items())
    frozen = [p.detach().clone() for p in runner.model.model.backbone.parameters()]
    _train(runner)
    assert all(torch.equal(a, b) for a, b in zip(frozen, runner.model.model.backbone.parameters()))
    adn = _runner(tmp_path, dict(model="resnet18_adn", model_kwargs=dict(num_classes=3), technique=dict(type="ADN")),
                  name="adn")
    _train(adn)


def test_checkpoints_save_and_resume(tmp_path):
    enable_resume()
    first = _runner(tmp_path, dict(TINY_MSDNET), iters=4, name="resume")
    first.train()
    assert (tmp_path / "resume" / "iter_4.pth").exists()
    weights = {k: v.clone() for k, v in first.model.state_dict().items() if k != "_extra_state"}
    resumed = _runner(tmp_path, dict(TINY_MSDNET), iters=6, resume=True, name="resume")
    resumed.train()
    assert resumed.iter == 6 and (tmp_path / "resume" / "iter_6.pth").exists()
    state = torch.load(tmp_path / "resume" / "iter_4.pth", weights_only=False)["state_dict"]
    assert all(torch.equal(state[k], weights[k]) for k in weights)


def test_hdkd_weights_are_saved_and_resumed(tmp_path):
    """A resumed HDKD run goes on from the learned weights, their Adam state, the validation loss's
    averages and the update count saved in the checkpoint (the model's state dict), not from uniform
    weights."""
    enable_resume()
    model, hooks = dict(TINY_MSDNET, technique=dict(type="HDKD", lr=0.05)), [
        dict(type="HeldOutBatchesHook", dataloader=_loader(seed=2))]
    first = _runner(tmp_path, model, iters=4, hooks=hooks, name="hdkd")
    first.train()
    learned = first.model.technique.state_dict()
    checkpoint = MultiExitClassifier(**model)  # what the checkpoint's state dict holds
    checkpoint.load_state_dict(torch.load(tmp_path / "hdkd" / "iter_4.pth", weights_only=False)["state_dict"])
    saved = checkpoint.technique.state_dict()
    assert checkpoint.updates == 4
    assert torch.equal(saved["hdkd_weights"]["ce_logits"], learned["hdkd_weights"]["ce_logits"])
    assert saved["hdkd_weights"]["ce_logits"].abs().sum() > 0  # learned, not the uniform start
    assert saved["hdkd_optimizer"]["state"][0]["step"] == 4

    resumed = _runner(tmp_path, model, iters=4, hooks=hooks, resume=True, name="hdkd")
    assert resumed.model.technique.weights.ce_logits.abs().sum() == 0  # built uniform, before the resume
    resumed.train()  # already at iteration 4 of 4: loads the checkpoint, trains no further
    state = resumed.model.technique.state_dict()
    for key in ("ce_logits", "kd_logits"):
        assert torch.equal(state["hdkd_weights"][key], saved["hdkd_weights"][key]), key
    assert state["hdkd_optimizer"]["state"][0]["step"] == 4
    assert torch.equal(state["hdkd_val_loss"]["expected"], saved["hdkd_val_loss"]["expected"])
    assert resumed.model.updates == 4


def test_bad_configs_are_explained(tmp_path):
    """A bad technique section fails when the Runner builds the model, with the typed error of the
    technique; a technique whose need the run does not meet is refused before its first step."""
    with pytest.raises(ValueError, match="unknown technique type 'Focal'"):
        _runner(tmp_path, dict(TINY_MSDNET, technique=dict(type="Focal")))
    with pytest.raises(ValueError, match=r"PCGrad has no option 'sed' \(did you mean 'seed'\?\)"):
        _runner(tmp_path, dict(TINY_MSDNET, technique=dict(type="PCGrad", sed=3)))
    with pytest.raises(ValueError, match="HDKD option interval must be an integer >= 1, got 0"):
        _runner(tmp_path, dict(TINY_MSDNET, technique=dict(type="HDKD", interval=0)))
    with pytest.raises(ValueError, match="OneForAll .* starts from the phase-I weights"):
        _runner(tmp_path, dict(TINY_MSDNET, technique=dict(type="OneForAll")))
    runner = _runner(tmp_path, dict(TINY_MSDNET, technique=dict(type="HDKD")), name="no-held-out")
    before = {k: v.clone() for k, v in runner.model.model.state_dict().items()}
    with pytest.raises(TrainerError, match=r"HDKD needs batches of a held-out split, which mmengine does not give "
                                           r"here.*custom_hooks=\[dict\(type='HeldOutBatchesHook'"):
        runner.train()
    assert all(torch.equal(v, runner.model.model.state_dict()[k]) for k, v in before.items())


def test_pcgrad_gives_the_deconflicted_gradients_under_the_plain_optim_wrapper():
    """technique=dict(type='PCGrad') under mmengine's default OptimWrapper (no special wrapper): one
    step of SGD (lr 1) moves every parameter by minus its PCGrad gradient, pcgrad_backward of the
    exits' cross-entropies on a reference copy (the same seed), and not by the plain sum's gradient."""
    torch.manual_seed(0)
    classifier = MultiExitClassifier(**TINY_MSDNET, technique=dict(type="PCGrad", seed=3)).double()
    reference, plain = copy.deepcopy(classifier.model), copy.deepcopy(classifier.model)
    before = [p.detach().clone() for p in classifier.model.parameters()]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    classifier.train_step(dict(inputs=x, data_samples=y), OptimWrapper(torch.optim.SGD(classifier.parameters(), lr=1.0)))
    stats = pcgrad_backward([F.cross_entropy(z, y) for z in reference.forward_exits(x)], list(reference.parameters()),
                            generator=torch.Generator().manual_seed(3))
    sum(F.cross_entropy(z, y) for z in plain.forward_exits(x)).backward()
    assert stats["projections"] > 0  # the exits' gradients conflict here
    differs = False
    for p0, p1, r, q in zip(before, classifier.model.parameters(), reference.parameters(), plain.parameters()):
        expected = r.grad if r.grad is not None else torch.zeros_like(p0)
        torch.testing.assert_close(p0 - p1.detach(), expected, rtol=1e-9, atol=1e-12)
        differs |= q.grad is not None and not torch.allclose(expected, q.grad, rtol=1e-6, atol=1e-9)
    assert differs  # the plain sum's gradient is another step
    assert classifier.updates == 1


class _RecordHDKD(Hook):
    """Per batch: whether HDKD's weights and the network's parameters moved, and the update count."""

    def __init__(self):
        self.seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.weights = {k: v.clone() for k, v in runner.model.technique.weights.state_dict().items()}
        self.params = [p.detach().clone() for p in runner.model.model.parameters()]

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        model = runner.model
        self.seen.append((any(not torch.equal(self.weights[k], v) for k, v in model.technique.weights.state_dict().items()),
                          any(not torch.equal(a, p) for a, p in zip(self.params, model.model.parameters())),
                          model.updates))


def test_hdkd_interval_counts_optimizer_updates_under_accumulation(tmp_path):
    """A Runner with accumulative_counts=2 and interval=2 (tests/test_intervals.py calls train_step
    by hand): the network steps on every 2nd batch, and HDKD's weights, learnt on the batches of
    HeldOutBatchesHook, move exactly on the batches that end updates 0 and 2 (batches 2 and 6)."""
    record = _RecordHDKD()
    runner = _runner(tmp_path, dict(TINY_MSDNET, technique=dict(type="HDKD", lr=0.05, interval=2)), iters=6,
                     optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9), accumulative_counts=2),
                     hooks=[dict(type="HeldOutBatchesHook", dataloader=_loader(seed=2)), record])
    runner.train()
    weights_moved, params_moved, updates = map(list, zip(*record.seen))
    assert params_moved == [False, True] * 3
    assert updates == [0, 1, 1, 2, 2, 3]
    assert weights_moved == [False, True, False, False, False, True]


class _RecordSDN(Hook):
    """Per batch: the runner's epoch and each exit's loss term over its cross-entropy (the weight the
    step used), the cross-entropies from a copy of the network taken before the step."""

    def __init__(self):
        self.seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        with torch.no_grad():
            logits = exit_logits(copy.deepcopy(runner.model.model), data_batch["inputs"])
        self.ce = [float(F.cross_entropy(z, data_batch["data_samples"])) for z in logits]

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.seen.append((runner.epoch, [float(outputs[f"loss_exit{k + 1}"].detach()) / ce for k, ce in enumerate(self.ce)]))


@pytest.mark.slow
def test_sdn_weights_follow_the_runners_epoch(tmp_path):
    """exit_weights='sdn' under an epoch-based Runner, no hook: each step weighs exit i's loss by
    SDN's min(C_i, 0.01 + (epoch + 1) C_i / epochs) (caps C = 0.9 i / 4 for 4 internal exits), the
    final exit by 1, with the runner's epoch."""
    record = _RecordSDN()
    runner = Runner(
        model=dict(type="MultiExitClassifier", **TINY_MSDNET, technique=dict(type="CrossEntropy", exit_weights="sdn")),
        work_dir=str(tmp_path / "sdn"), train_dataloader=dict(_loader(shuffle=False), dataset=TinyImages(n=16)),
        train_cfg=dict(by_epoch=True, max_epochs=2), optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05)),
        custom_hooks=[record], default_hooks=dict(checkpoint=None, logger=dict(type="LoggerHook", interval=1)),
        randomness=dict(seed=0), default_scope="mmengine")
    runner.train()
    caps = [0.9 * i / 4 for i in range(1, 5)]
    expected = {epoch: [min(c, 0.01 + (epoch + 1) * c / 2) for c in caps] + [1.0] for epoch in (0, 1)}
    assert expected[0] != expected[1]
    assert [epoch for epoch, _ in record.seen] == [0, 0, 1, 1]  # 2 batches per epoch
    for epoch, weights in record.seen:
        assert weights == pytest.approx(expected[epoch], rel=1e-5)


DDP_SCRIPT = textwrap.dedent('''
    import gc, os, sys, torch
    from accelerate import PartialState
    from mmengine.runner import Runner
    import timm_exits.integrations.mmengine
    sys.path.insert(0, os.environ["TESTS_DIR"])
    from helpers import mm_loader as _loader, MM_TINY_MSDNET as TINY_MSDNET

    state = PartialState(cpu=True)  # gloo, before the Runner (its own init_dist needs CUDA)
    runner = Runner(
        model=dict(type="MultiExitClassifier", **TINY_MSDNET, technique=dict(type="PCGrad", seed=0)),
        work_dir=os.environ["WORK_DIR"], train_dataloader=_loader(), train_cfg=dict(by_epoch=False, max_iters=3),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1)),
        launcher="pytorch", env_cfg=dict(dist_cfg=dict(backend="gloo")),
        cfg=dict(model_wrapper_cfg=dict(type="MultiExitDistributedDataParallel", device_ids=None)),
        randomness=dict(seed=0), default_scope="mmengine")
    runner.train()
    flat = torch.cat([p.detach().reshape(-1) for p in runner.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    torch.distributed.all_gather(gathered, flat)
    if state.is_main_process:
        print(f"RESULT world={state.num_processes} identical={torch.equal(gathered[0], gathered[1])}")
    state.wait_for_everyone()
    # free the DDP wrapper (it holds the process group) before destroying the group: a group
    # destroyed at interpreter exit can abort gloo ("terminate called without an active exception")
    del runner
    gc.collect()
    state.destroy_process_group()
''')


@pytest.mark.slow
def test_pcgrad_runner_under_two_process_ddp(tmp_path):
    script = tmp_path / "ddp_runner.py"
    script.write_text(DDP_SCRIPT)
    run = launch_two_processes(str(script), WORK_DIR=str(tmp_path / "ddp"), TESTS_DIR=os.path.dirname(__file__))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RESULT world=2 identical=True" in run.stdout


CONFIG = textwrap.dedent('''
    custom_imports = dict(imports=["timm_exits.integrations.mmengine", "mm_tiny_data"], allow_failed_imports=False)
    model = dict(type="MultiExitClassifier", model="msdnet_cifar_5exit",
                 model_kwargs=dict(num_classes=3, num_channels=4, growth_rate=2), technique=dict(type="PCGrad"))
    train_dataloader = dict(dataset=dict(type="TinyImageDataset"), sampler=dict(type="DefaultSampler", shuffle=True),
                            batch_size=8, collate_fn=dict(type="default_collate"))
    train_cfg = dict(by_epoch=False, max_iters=2)
    optim_wrapper = dict(optimizer=dict(type="SGD", lr=0.05))
    custom_hooks = [dict(type="GradientEquilibriumHook")]
    default_scope = "mmengine"
    work_dir = "{work_dir}"
''')


def test_a_config_file_with_custom_imports(tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG.format(work_dir=tmp_path / "work"))
    code = ("from mmengine.config import Config; from mmengine.runner import Runner; "
            f"r = Runner.from_cfg(Config.fromfile({str(config)!r})); r.train(); "
            "print('RESULT', r.iter, r.model.model.gradient_equilibrium, type(r.model.technique).__name__)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RESULT 2 True PCGrad" in run.stdout
