"""The techniques through a real mmengine Runner: every technique trains a tiny multi-exit model for
a few iterations on CPU, checkpoints save and resume, and PCGrad runs under 2-process DDP (gloo)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import timm

import timm_exits.integrations.mmengine  # noqa: F401  (registers the model, metric, hooks, optim wrapper)
from timm_exits.integrations.mmengine import enable_resume

from helpers import MM_TINY_MSDNET as TINY_MSDNET, mm_loader as _loader, mm_runner as _runner
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
    model, hooks, optim = dict(TINY_MSDNET), [], None
    if technique == "gradient_equilibrium":
        hooks = [dict(type="GradientEquilibriumHook")]
    elif technique == "branch_deconfliction":
        hooks = [dict(type="GradientDeconflictionHook", mode="protect_deeper")]
    elif technique == "pcgrad":
        optim = dict(type="PCGradOptimWrapper", optimizer=dict(type="SGD", lr=0.05), scope="global", order="random")
    elif technique == "hdkd":
        model["loss"] = "hdkd"
        hooks = [dict(type="HarmonizedWeightsHook", val_dataloader=_loader(seed=2), lr=0.05)]
    runner = _train(_runner(tmp_path, model, optim_wrapper=optim, hooks=hooks))
    inner = runner.model.model
    if technique == "gradient_equilibrium":
        assert inner.gradient_equilibrium is True
    if technique == "hdkd":
        assert runner.model.technique.weights.ce_logits.abs().sum() > 0  # the weights were updated
        assert runner.model.technique.lr == 0.05  # the hook's options


def test_imta_phase_two_and_adn_with_the_runner(tmp_path):
    torch.manual_seed(0)
    phase_one = timm.create_model(TINY_MSDNET["model"], **TINY_MSDNET["model_kwargs"])
    path = tmp_path / "phase1.safetensors"
    save_file({k: v.contiguous() for k, v in phase_one.state_dict().items()}, path)
    runner = _runner(tmp_path, dict(TINY_MSDNET, loss="ofa", phase_one_checkpoint=str(path),
                                    loss_kwargs=dict(temperature=3.0, gamma=0.9)), name="imta")
    frozen = [p.detach().clone() for p in runner.model.model.backbone.parameters()]
    _train(runner)
    assert all(torch.equal(a, b) for a, b in zip(frozen, runner.model.model.backbone.parameters()))
    adn = _runner(tmp_path, dict(model="resnet18_adn", model_kwargs=dict(num_classes=3), loss="adn"), name="adn")
    _train(adn)


def test_checkpoints_save_and_resume(tmp_path):
    enable_resume()
    first = _runner(tmp_path, dict(TINY_MSDNET), iters=4, name="resume")
    first.train()
    assert (tmp_path / "resume" / "iter_4.pth").exists()
    weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    resumed = _runner(tmp_path, dict(TINY_MSDNET), iters=6, resume=True, name="resume")
    resumed.train()
    assert resumed.iter == 6 and (tmp_path / "resume" / "iter_6.pth").exists()
    state = torch.load(tmp_path / "resume" / "iter_4.pth", weights_only=False)["state_dict"]
    assert all(torch.equal(state[k], weights[k]) for k in weights)


def test_hdkd_weights_are_saved_and_resumed(tmp_path):
    """A resumed HDKD run goes on from the learned weights, their Adam state and the validation loss's
    averages saved in the checkpoint, not from uniform weights."""
    enable_resume()
    model, hooks = dict(TINY_MSDNET, loss="hdkd"), [dict(type="HarmonizedWeightsHook", val_dataloader=_loader(seed=2),
                                                          lr=0.05)]
    first = _runner(tmp_path, model, iters=4, hooks=hooks, name="hdkd")
    first.train()
    learned = first.model.technique.state_dict()
    saved = torch.load(tmp_path / "hdkd" / "iter_4.pth", weights_only=False)["hdkd"]
    assert torch.equal(saved["hdkd_weights"]["ce_logits"], learned["hdkd_weights"]["ce_logits"])
    assert saved["hdkd_weights"]["ce_logits"].abs().sum() > 0  # learned, not the uniform start
    assert saved["hdkd_optimizer"]["state"][0]["step"] == 4

    resumed = _runner(tmp_path, model, iters=4, hooks=hooks, resume=True, name="hdkd")
    resumed.train()  # already at iteration 4 of 4: loads the checkpoint, trains no further
    state = resumed.model.technique.state_dict()
    for key in ("ce_logits", "kd_logits"):
        assert torch.equal(state["hdkd_weights"][key], saved["hdkd_weights"][key]), key
    assert state["hdkd_optimizer"]["state"][0]["step"] == 4
    assert torch.equal(state["hdkd_val_loss"]["expected"], saved["hdkd_val_loss"]["expected"])


def test_bad_configs_are_explained(tmp_path):
    with pytest.raises(ValueError, match="loss must be one of"):
        _runner(tmp_path, dict(TINY_MSDNET, loss="focal")).model
    with pytest.raises(ValueError, match="needs phase_one_checkpoint"):
        _runner(tmp_path, dict(TINY_MSDNET, loss="ofa")).model
    runner = _runner(tmp_path, dict(TINY_MSDNET), hooks=[dict(type="HarmonizedWeightsHook", val_dataloader=_loader())],
                     name="not-hdkd")
    with pytest.raises(ValueError, match="HarmonizedWeightsHook learns the weights of loss='hdkd'"):
        runner.train()


DDP_SCRIPT = textwrap.dedent('''
    import gc, os, sys, torch
    from accelerate import PartialState
    from mmengine.runner import Runner
    import timm_exits.integrations.mmengine
    sys.path.insert(0, os.environ["TESTS_DIR"])
    from helpers import mm_loader as _loader, MM_TINY_MSDNET as TINY_MSDNET

    state = PartialState(cpu=True)  # gloo, before the Runner (its own init_dist needs CUDA)
    runner = Runner(
        model=dict(type="MultiExitClassifier", **TINY_MSDNET), work_dir=os.environ["WORK_DIR"],
        train_dataloader=_loader(), train_cfg=dict(by_epoch=False, max_iters=3),
        optim_wrapper=dict(type="PCGradOptimWrapper", optimizer=dict(type="SGD", lr=0.1), seed=0),
        launcher="pytorch", env_cfg=dict(dist_cfg=dict(backend="gloo")),
        cfg=dict(model_wrapper_cfg=dict(type="MMDistributedDataParallel", device_ids=None)),
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
                 model_kwargs=dict(num_classes=3, num_channels=4, growth_rate=2))
    train_dataloader = dict(dataset=dict(type="TinyImageDataset"), sampler=dict(type="DefaultSampler", shuffle=True),
                            batch_size=8, collate_fn=dict(type="default_collate"))
    train_cfg = dict(by_epoch=False, max_iters=2)
    optim_wrapper = dict(type="PCGradOptimWrapper", optimizer=dict(type="SGD", lr=0.05))
    custom_hooks = [dict(type="GradientEquilibriumHook")]
    default_scope = "mmengine"
    work_dir = "{work_dir}"
''')


def test_a_config_file_with_custom_imports(tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG.format(work_dir=tmp_path / "work"))
    code = ("from mmengine.config import Config; from mmengine.runner import Runner; "
            f"r = Runner.from_cfg(Config.fromfile({str(config)!r})); r.train(); "
            "print('RESULT', r.iter, r.model.model.gradient_equilibrium, type(r.optim_wrapper).__name__)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RESULT 2 True PCGradOptimWrapper" in run.stdout
