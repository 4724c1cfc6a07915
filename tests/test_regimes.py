"""Training regimes (joint, heads_only, backbone) and per-epoch loss weights in every trainer: the
technique alone, the accelerate engine (in process), a real mmengine Runner and the timm task."""
import pytest
import torch
from accelerate import Accelerator
from timm.optim import create_optimizer_v2

import timm
import timm_exits  # noqa: F401  (registers the models)
from timm_exits.config import load_config
from timm_exits.engine import TrainingPhase, run
from timm_exits.task import MultiExitTask
from timm_exits.train import CrossEntropy, PlainTrainer
from timm_exits.train.schedules import sdn_weights

from helpers import TinyImages, mm_loader, tiny_data, write_config

SDN_RESNET = dict(exits="sdn", head="sdn", input_size=(3, 32, 32))
ENGINE_MODEL = f"dict(name='resnet18_exits', kwargs={SDN_RESNET!r})"


def _model(num_classes=3):
    torch.manual_seed(0)
    return timm.create_model("resnet18_exits", num_classes=num_classes, **SDN_RESNET)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bn_buffers(state):
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


def _batch(n=8):
    data = TinyImages(n=n)
    return torch.stack([data[i]["inputs"] for i in range(n)]), torch.stack([data[i]["data_samples"] for i in range(n)])


def _step_on(technique, model, optimizer, images, target):
    model.train()
    return PlainTrainer(model, technique, optimizer).step(images, target)


@pytest.mark.parametrize("freeze_bn_stats", [False, True])
def test_heads_only_trains_the_heads_alone(freeze_bn_stats):
    technique = CrossEntropy(regime="heads_only", freeze_bn_stats=freeze_bn_stats)
    model = technique.prepare(_model())
    optimizer = create_optimizer_v2(model, opt="momentum", lr=0.1, weight_decay=1e-4)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.exits.parameters()}  # the optimizer holds the exit heads only
    before, heads = _snapshot(model.backbone), _snapshot(model.exits)
    images, target = _batch()
    terms = _step_on(technique, model, optimizer, images, target)
    assert list(terms) == ["exit1", "exit2", "exit3"]  # the final head is left out of the loss
    after = model.backbone.state_dict()
    params = {n for n, _ in model.backbone.named_parameters()}
    assert all(torch.equal(before[k], after[k]) for k in params)  # bit-identical
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(not torch.equal(heads[k], v) for k, v in model.exits.state_dict().items() if k.endswith("weight"))
    moved = [k for k, v in _bn_buffers(before).items() if not torch.equal(v, after[k])]
    if freeze_bn_stats:
        assert not moved and not model.backbone.training and model.exits.training
    else:  # SDN's code: the frozen backbone stays in training mode, its BN statistics move
        assert len(moved) == len(_bn_buffers(before)) and model.backbone.training


def test_backbone_regime_trains_the_backbone_on_its_own_head():
    technique = CrossEntropy(regime="backbone")
    model = technique.prepare(_model())
    optimizer = create_optimizer_v2(model, opt="momentum", lr=0.1, weight_decay=1e-4)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.backbone.parameters()}
    heads = _snapshot(model.exits)
    images, target = _batch()
    assert list(_step_on(technique, model, optimizer, images, target)) == ["exit4"]
    assert all(torch.equal(heads[k], v) for k, v in model.exits.state_dict().items())


def test_regime_errors():
    msdnet = timm.create_model("msdnet_cifar_5exit", num_channels=4, growth_rate=2, num_classes=3)
    with pytest.raises(ValueError, match="regime='heads_only' trains part of a backbone with exit heads.*MSDNet has no "
                                         "separate backbone"):
        CrossEntropy(regime="heads_only").prepare(msdnet)
    with pytest.raises(ValueError, match="use them with regime='joint', not 'heads_only'"):
        CrossEntropy(regime="heads_only", gradient_equilibrium=True)
    with pytest.raises(ValueError, match="regime must be 'joint', 'heads_only' or 'backbone', got 'frozen'"):
        CrossEntropy(regime="frozen")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("regimes") / "data")


def test_engine_sdn_schedule_per_epoch(data, tmp_path):
    """The engine gives the technique the epoch: the loss terms of epoch 1 and 2 (its trainer's epoch
    while the epoch runs) are tau(1) and tau(2) of E = 2 times each exit's cross-entropy."""
    config = load_config(str(write_config(tmp_path / "c.py", data, ENGINE_MODEL,
                                          "tracker = None\ntechnique = dict(exit_weights='sdn')")),
                         output_dir=str(tmp_path / "out"))
    phase = TrainingPhase(Accelerator(cpu=True), config, str(tmp_path / "out"))
    phase.start()
    batch = next(iter(phase.train_loader))
    for epoch in range(2):
        expected = sdn_weights(4, epoch, 2)  # caps 0.3, 0.6, 0.9 for three internal classifiers
        assert expected[:3] == pytest.approx([min(c, 0.01 + (epoch + 1) * c / 2) for c in (0.3, 0.6, 0.9)])
        phase.model.eval()  # batch norm in eval mode: the same function twice
        with torch.no_grad():
            logits = phase.model.forward_exits(batch[0])
            terms = phase.technique.losses(logits, batch[1], phase.trainer)
        phase.model.train()
        ce = [torch.nn.functional.cross_entropy(z, batch[1]) for z in logits]
        assert [float(t / c) for t, c in zip(terms.values(), ce)] == pytest.approx(expected)
        phase.train_epoch(epoch)
    assert phase.trainer.epoch == 2
    phase.finish()


def test_engine_heads_only_leaves_the_backbone_as_it_was(data, tmp_path):
    from safetensors.torch import load_file
    from accelerate.utils import set_seed

    config = load_config(str(write_config(tmp_path / "c.py", data, ENGINE_MODEL,
                                          "tracker = None\ntrain = dict(epochs=1)\n"
                                          "technique = dict(regime='heads_only')")),
                         output_dir=str(tmp_path / "out"))
    run(config)
    set_seed(0)  # the engine's initial weights
    start = timm.create_model("resnet18_exits", num_classes=3, **SDN_RESNET).state_dict()
    final = load_file(tmp_path / "out" / "model.safetensors")
    backbone = [k for k in start if k.startswith("backbone.") and not k.endswith(("running_mean", "running_var",
                                                                                  "num_batches_tracked"))]
    assert backbone and all(torch.equal(start[k], final[k]) for k in backbone)
    assert any(not torch.equal(start[k], final[k]) for k in start if k.endswith("running_mean"))  # BN stats moved
    assert all(not torch.equal(start[k], final[k]) for k in start if k.startswith("exits.") and k.endswith("weight"))


def test_engine_phase_wise_starts_each_phase_from_the_one_before(data, tmp_path):
    from safetensors.torch import load_file

    config = load_config(str(write_config(tmp_path / "c.py", data, ENGINE_MODEL,
                                          "tracker = None\ntrain = dict(epochs=1)\n"
                                          "_base_ = ['" + str(_phasewise()) + "']")),
                         output_dir=str(tmp_path / "out"))
    run(config)
    backbone, joint, heads = (load_file(tmp_path / "out" / name / "model.safetensors")
                              for name in ("backbone", "joint", "heads"))
    params = [k for k in backbone if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(not torch.equal(backbone[k], joint[k]) for k in params if k.endswith("weight") and "fc" in k)
    # heads only: every backbone parameter as the joint phase left it, the exit heads changed
    assert all(torch.equal(joint[k], heads[k]) for k in params if k.startswith("backbone."))
    assert all(not torch.equal(joint[k], heads[k]) for k in params if k.startswith("exits.") and k.endswith("weight"))


def _phasewise():
    from pathlib import Path
    return Path(__file__).resolve().parents[1] / "recipes" / "_base_" / "techniques" / "phasewise.py"


@pytest.mark.slow
def test_mmengine_runner_heads_only_and_the_sdn_schedule(tmp_path):
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from timm_exits.integrations.mmengine.trainer import MMEngineTrainer  # (importing it registers the model)

    seen = []

    class Record(Hook):  # the weights the technique reads through mmengine's trainer (the epoch: the message hub's)
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            trainer = MMEngineTrainer(runner.model, runner.optim_wrapper)
            seen.append((runner.epoch, runner.model.technique.weights(4, trainer)))

    def runner(name, hooks=(), **technique):
        return Runner(
            model=dict(type="MultiExitClassifier", model="resnet18_exits", model_kwargs=dict(num_classes=3, **SDN_RESNET),
                       technique=dict(type="CrossEntropy", **technique)),
            work_dir=str(tmp_path / name), train_dataloader=dict(mm_loader(), dataset=TinyImages(n=16)),
            train_cfg=dict(by_epoch=True, max_epochs=2), optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05)),
            custom_hooks=list(hooks), default_hooks=dict(checkpoint=None, logger=dict(type="LoggerHook", interval=1)),
            randomness=dict(seed=0), default_scope="mmengine")

    heads = runner("heads", regime="heads_only")
    before = _snapshot(heads.model.model.backbone)
    heads.train()
    after = heads.model.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k, _ in heads.model.model.backbone.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in _bn_buffers(before))  # SDN: BN statistics move
    sdn = runner("sdn", hooks=[Record()], exit_weights="sdn")  # no schedule hook: the epoch is mmengine's
    sdn.train()
    assert [e for e, _ in seen] == [0, 0, 1, 1]  # 2 iterations per epoch
    assert seen[0][1] == pytest.approx(sdn_weights(4, 0, 2)) and seen[-1][1] == pytest.approx(sdn_weights(4, 1, 2))


def test_timm_task_regime_and_schedule():
    task = MultiExitTask(_model(), regime="heads_only", exit_weights="sdn")
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="momentum", lr=0.1)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in task.model.exits.parameters()}
    images, target = _batch()
    before = _snapshot(task.model.backbone)
    with pytest.raises(ValueError, match=r"call task.set_epoch\(epoch, epochs\) at the start of every epoch"):
        task(images, target)
    task.set_epoch(0, 10)
    task.train()
    result = task(images, target)
    assert [k for k in result if k.startswith("loss_")] == ["loss_exit1", "loss_exit2", "loss_exit3"]
    result["loss"].backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in task.model.backbone.named_parameters())
    task.model.eval()
    with torch.no_grad():
        logits = task.model.forward_exits(images)
        result = task(images, target)
    ce = [torch.nn.functional.cross_entropy(z, target) for z in logits[:3]]
    ratios = [float(result[f"loss_exit{k + 1}"] / c) for k, c in enumerate(ce)]
    assert ratios == pytest.approx(sdn_weights(4, 0, 10)[:3])
