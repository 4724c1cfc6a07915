"""One meaning of a technique's interval in every trainer: HDKD's ``interval`` counts optimizer
updates over the whole run. With two batches per update and ``interval=2``, the weights are updated
on the batch that ends update 0, 2, 4, ...; the same test runs the accelerate engine, mmengine, timm's
task and the plain loop."""
from pathlib import Path

import pytest
import timm
import torch
from accelerate import Accelerator
from mmengine.optim import OptimWrapper

from timm_exits.config import load_config
from timm_exits.engine import TrainingPhase
from timm_exits.integrations.mmengine import MultiExitClassifier
from timm_exits.train.trainer import cycle
from timm_exits.task import MultiExitTask
from timm_exits.train import HDKD, TECHNIQUES, PlainTrainer, register_technique

from helpers import TINY_MSDNET, tiny_data, write_config

TINY = dict(num_classes=3, num_channels=4, growth_rate=2)
BATCHES, INTERVAL = 8, 2


class RecordingHDKD(HDKD):
    """HDKD that records the batches (counted from 0 over the run) on which its weights were updated."""

    def __init__(self, **options):
        super().__init__(**options)
        self.batch, self.updated_on = 0, []

    def update_weights(self, *args, **kwargs):
        self.updated_on.append(self.batch)
        return super().update_weights(*args, **kwargs)

    def train_step(self, trainer, images, target):
        try:
            return super().train_step(trainer, images, target)
        finally:
            self.batch += 1


def expected(accumulation: int) -> list:
    """The batches that end an update whose number is a multiple of INTERVAL."""
    return [b for b in range(BATCHES) if (b + 1) % accumulation == 0 and (b // accumulation) % INTERVAL == 0]


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def engine(tmp_path: Path) -> list:
    data = tiny_data(tmp_path / "data")  # 32 training images: 4 batches of 8 per epoch, 2 epochs
    extra = (f"tracker = None\ntrain = dict(epochs=2, grad_accum_steps=2)\n"
             f"technique = dict(type='RecordingHDKD', interval={INTERVAL}, xi=0.01)")
    config = load_config(str(write_config(tmp_path / "c.py", data, TINY_MSDNET, extra)), output_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="accumulates 1 batches per update but train.grad_accum_steps is 2"):
        TrainingPhase(Accelerator(cpu=True), config, str(tmp_path / "o"))  # an accelerator that disagrees
    phase = TrainingPhase(Accelerator(cpu=True, gradient_accumulation_steps=2), config, str(tmp_path / "o"))
    phase.start()
    for epoch in phase.remaining_epochs():
        phase.train_epoch(epoch)
    return phase.technique.updated_on


def mmengine(tmp_path: Path) -> list:
    model = MultiExitClassifier("msdnet_cifar_5exit", TINY, technique=dict(type="RecordingHDKD", interval=INTERVAL))
    model.held_out = cycle([{"inputs": x, "data_samples": y} for x, y in _batches(2, seed=1)])
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01), accumulative_counts=2)
    for x, y in _batches(BATCHES):
        model.train_step({"inputs": x, "data_samples": y}, wrapper)
    return model.technique.updated_on


def task(tmp_path: Path) -> list:
    task = MultiExitTask(timm.create_model("msdnet_cifar_5exit", **TINY), "RecordingHDKD", interval=INTERVAL,
                         held_out=_batches(2, seed=1), grad_accum_steps=2, verbose=False)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.01)
    task.attach_optimizer(optimizer)
    for call, (x, y) in enumerate(_batches(BATCHES)):  # timm's train.py: backward every call, a step every 2nd
        (task(x, y)["loss"] / 2).backward()
        if (call + 1) % 2 == 0:
            optimizer.step()
            optimizer.zero_grad()
    return task.technique.updated_on


def plain(tmp_path: Path) -> list:
    technique = RecordingHDKD(interval=INTERVAL)
    model = technique.prepare(timm.create_model("msdnet_cifar_5exit", **TINY))
    loop = PlainTrainer(model, technique, torch.optim.SGD(model.parameters(), lr=0.01), held_out=_batches(2, seed=1))
    for x, y in _batches(BATCHES):
        loop.step(x, y)
    return technique.updated_on


@pytest.fixture(autouse=True)
def recording_hdkd():
    """RecordingHDKD registered for this module's tests only (the package's types stay the package's)."""
    register_technique(RecordingHDKD)
    yield
    del TECHNIQUES["RecordingHDKD"]


@pytest.mark.parametrize("trainer, accumulation", [(engine, 2), (mmengine, 2), (task, 2), (plain, 1)])
def test_hdkd_interval_counts_optimizer_updates_in_every_trainer(trainer, accumulation, tmp_path):
    updated_on = trainer(tmp_path)
    assert updated_on == expected(accumulation) and len(updated_on) >= 2
