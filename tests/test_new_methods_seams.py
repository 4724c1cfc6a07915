"""The newer methods where they meet the trainers, as users combine them.

* An mmengine ``Runner`` checkpoint of PhuongLampert and JEIGates keeps the technique's state (the
  temperature; the oracle-exit counts and the update count), a resumed Runner goes on from it, and the
  checkpoint converts to a model folder that gives the trained model's outputs (JEI-DNN: with its gates).
  That is the cross-trainer path the docs give: the accelerate engine resumes only its own run folders
  (its checkpoints carry a run id), so a technique's state does not move between trainers.
* timm's task (``MultiExitTask``) with Deep Feature Surgery on a RANet, and with the DynPerceiver
  technique and Deep Feature Surgery on a Dynamic Perceiver: the gradients are those of the rule
  re-stated here stage by stage (float64).
"""
import json

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.inference import EarlyExitExecutor
from timm_exits.inference.export import ExportedModel, export_model
from timm_exits.integrations.mmengine import convert_checkpoint, enable_resume
from timm_exits.model_folder import load_model_folder
from timm_exits.task import MultiExitTask
from timm_exits.train.techniques import DynPerceiver as DynPerceiverLoss

from helpers import make_image_folder

MSDNET = dict(num_classes=3, num_channels=4, growth_rate=2)
ALWAYS = 0.3  # with 3 classes every max-probability is >= 1/3: T grows after every update
BATCHES_PER_EPOCH = 3  # 12 images, batches of 4


def _runner(tmp_path, data, technique, epochs, resume=False):
    """A real Runner from a config (so the checkpoint stores it, as recipes/mmengine runs do), checkpointing
    every epoch into ``tmp_path / 'work'``."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    import timm_exits.integrations.mmengine  # noqa: F401  (registers MultiExitClassifier)

    data_config = dict(input_size=(3, 32, 32), crop_pct=1.0)
    loader = dict(dataset=dict(type="ImageFolderDataset", root=str(data), data_config=data_config), sampler=dict(type="DefaultSampler",
                  shuffle=True), batch_size=4, num_workers=0, collate_fn=dict(type="default_collate"))
    cfg = Config(dict(
        default_scope="mmengine", work_dir=str(tmp_path / "work"), randomness=dict(seed=0), resume=resume,
        model=dict(type="MultiExitClassifier", model="msdnet_cifar_5exit", model_kwargs=MSDNET, technique=technique),
        train_dataloader=loader, optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9)),
        train_cfg=dict(by_epoch=True, max_epochs=epochs),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1))))
    return Runner.from_cfg(cfg)


def _temperature(technique):
    return technique.temperature.value


def _oracle_counts(technique):
    return technique.counts.sum().item()


@pytest.mark.slow  # three real Runners
@pytest.mark.parametrize("technique, state, per_epoch", [
    (dict(type="PhuongLampert", max_prob=ALWAYS), _temperature, lambda epochs: 1.05 ** (BATCHES_PER_EPOCH * epochs)),
    (dict(type="JEIGates"), _oracle_counts, lambda epochs: 12.0 * epochs),  # one oracle exit per training image
], ids=["phuong_lampert", "jei_gates"])
def test_an_mmengine_checkpoint_resumes_the_technique_state_and_converts(tmp_path, technique, state, per_epoch):
    enable_resume()
    data = make_image_folder(tmp_path / "data", per_class=4, size=32)
    first = _runner(tmp_path, data, technique, epochs=1)
    first.train()
    assert state(first.model.technique) == pytest.approx(per_epoch(1))
    saved = first.model.technique.state_dict()

    resumed = _runner(tmp_path, data, technique, epochs=1, resume=True)
    assert state(resumed.model.technique) != pytest.approx(per_epoch(1))  # built afresh, before the resume
    resumed.train()  # loads epoch_1.pth, trains no further
    torch.testing.assert_close(resumed.model.technique.state_dict(), saved, rtol=0, atol=0)
    assert resumed.model.updates == BATCHES_PER_EPOCH

    longer = _runner(tmp_path, data, technique, epochs=2, resume=True)
    longer.train()  # one more epoch, from the resumed state (afresh it would end where the first epoch did)
    assert state(longer.model.technique) == pytest.approx(per_epoch(2))
    if technique["type"] == "JEIGates":
        assert longer.model.technique.updates == 2 * BATCHES_PER_EPOCH

    trained = longer.model.model.eval()
    convert_checkpoint(str(tmp_path / "work" / "epoch_2.pth"), str(tmp_path / "folder"))
    loaded, _ = load_model_folder(str(tmp_path / "folder"))
    assert type(loaded) is type(trained)
    recorded = json.loads((tmp_path / "folder" / "config.json").read_text())["timm_exits"]["mmengine_model"]
    assert recorded["technique"]["type"] == technique["type"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        if technique["type"] == "JEIGates":  # the gates trained under mmengine come with the folder
            (a, gates_a), (b, gates_b) = trained.forward_gates(x), loaded.forward_gates(x)
            assert torch.equal(gates_a, gates_b)
        else:
            a, b = trained.forward_exits(x), loaded.forward_exits(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# --- export: the new families' programs call only listed operators --------------------------------------

@pytest.mark.slow  # exporting every stage: half a minute each on a shared 2-core machine
@pytest.mark.parametrize("case", ["ranet", "dyn_perceiver"])
def test_the_new_families_export_and_the_export_exits_early_as_the_model(case, tmp_path):
    name, kwargs = CASES[case][:2]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(5, 3, 32, 32)
    export_model(model, x[:2], str(tmp_path / "export"), name=name)  # refused if an operator is not listed
    exported = ExportedModel(str(tmp_path / "export"))
    with torch.no_grad():
        for a, b in zip(model.forward_exits(x), exported.forward_exits(x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        confidence = model.forward_exits(x)[0].softmax(-1).amax(-1).sort().values
        # two samples confident enough to answer at the first exit, the other three at the last
        thresholds = [((confidence[2] + confidence[3]) / 2).item()] + [2.0] * (model.num_exits - 2) + [0.0]
        ours, theirs = EarlyExitExecutor(model, thresholds)(x), exported.early_exit(x, thresholds)
    assert sorted(ours.exits.tolist()) == [0, 0] + [model.num_exits - 1] * 3
    assert torch.equal(ours.exits, theirs.exits) and torch.equal(ours.preds, theirs.preds)


# --- timm's task: Deep Feature Surgery on the new families ---------------------------------------------

def _split(t: torch.Tensor, keep: float, dim: int) -> torch.Tensor:
    """``t`` with the gradient of its last channels along ``dim`` stopped (the first round(keep * C) pass)."""
    k = round(t.shape[dim] * keep)
    return torch.cat([t.narrow(dim, 0, k), t.narrow(dim, k, t.shape[dim] - k).detach()], dim)


def _ranet_next_state(state, keep):
    return state[:-1] + [_split(state[-1], keep, 1)]  # the tensor the exit reads, as MSDNet's coarsest scale


def _dyn_perceiver_next_state(state, keep):
    return [_split(state[0], keep, 1), _split(state[1], keep, -1)] + state[2:]  # the CNN map, the latents' width


def _exits_with_surgery(model, x, keep, next_state):
    """Every exit's logits; stage i+1 reads ``next_state`` of the state exit i reads."""
    state, outputs = model.forward_stem(x), []
    for i in range(model.num_exits):
        state = model.forward_stage(state, i)
        outputs.append(model.forward_exit(state, i))
        state = next_state(state, keep)
    return outputs


def _grads(model, loss):
    return [g if g is not None else torch.zeros_like(p)
            for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))]


CASES = {
    "ranet": ("ranet_cifar_6exit", dict(num_channels=8, growth_rate=4, step=2, head_channels=16, num_classes=3),
              dict(), _ranet_next_state, lambda outputs, y: sum(F.cross_entropy(z, y) for z in outputs)),
    "dyn_perceiver": ("dyn_perceiver_regnety_002_cifar", dict(num_latents=16, depths=(1, 1, 1, 1), num_classes=3),
                      dict(type="DynPerceiver", kd_weight=0.5), _dyn_perceiver_next_state,
                      lambda outputs, y: sum(DynPerceiverLoss(kd_weight=0.5).losses(outputs, y).values())),
}


@pytest.mark.parametrize("case", list(CASES))
def test_timm_task_trains_with_feature_surgery_on_the_new_families(case):
    name, kwargs, technique, next_state, loss_of = CASES[case]
    torch.manual_seed(0)
    technique = dict(technique)
    task = MultiExitTask(name, technique.pop("type", "CrossEntropy"), model_kwargs=kwargs, feature_surgery=0.5,
                         verbose=False, **technique).double()  # as timm's train.py moves its task
    model = task.model
    assert model.feature_surgery == 0.5
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)

    result = task(x, y)
    got = _grads(model, result["loss"])
    model.feature_surgery = None
    reference = _exits_with_surgery(model, x, 0.5, next_state)
    torch.testing.assert_close(result["loss"], loss_of(reference, y), rtol=1e-12, atol=1e-12)
    expected = _grads(model, loss_of(reference, y))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    plain = _grads(model, loss_of(model.forward_exits(x), y))
    assert any(not torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(got, plain))  # the switch acted
