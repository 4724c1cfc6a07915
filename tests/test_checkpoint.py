"""Checkpoints: exact resume, atomic replacement, refusals, no unpickled code."""
import os
import pickle

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from timm_exits import MSDNet
from timm_exits.checkpoint import load_checkpoint, save_checkpoint
from timm_exits.train import multi_exit_cross_entropy


def _setup():
    model = MSDNet(num_blocks=2, base=1, step=1, num_channels=4, growth_rate=2, gr_factor="1-2", bn_factor="1-2",
                   stem_type="cifar", head_channels=8, num_classes=3, img_size=16, drop_rate=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, CosineLRScheduler(optimizer, t_initial=10)


def _train(model, optimizer, scheduler, steps, start):
    g = torch.Generator().manual_seed(123)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(10)]
    model.train()
    for step in range(start, start + steps):
        x, y = batches[step]
        optimizer.zero_grad()
        multi_exit_cross_entropy(model.forward_exits(x), y).backward()  # dropout: uses the RNG
        optimizer.step()
        scheduler.step_update(step + 1)


def test_resume_continues_exactly(tmp_path):
    torch.manual_seed(0)
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, 3, 0)
    save_checkpoint(str(tmp_path / "ckpt"), model, optimizer, scheduler, model_name="tiny", step=3)
    _train(model, optimizer, scheduler, 3, 3)  # the uninterrupted run

    torch.manual_seed(99)  # a different process state: everything must come from the checkpoint
    resumed, optimizer2, scheduler2 = _setup()
    state = load_checkpoint(str(tmp_path / "ckpt"), resumed, optimizer2, scheduler2, model_name="tiny")
    assert state == {"model": "tiny", "step": 3}
    _train(resumed, optimizer2, scheduler2, 3, 3)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert optimizer.param_groups[0]["lr"] == optimizer2.param_groups[0]["lr"]


def test_saving_replaces_atomically_and_failures_keep_the_old_checkpoint(tmp_path):
    model, optimizer, scheduler = _setup()
    folder = str(tmp_path / "ckpt")
    save_checkpoint(folder, model, model_name="tiny", step=1)
    save_checkpoint(folder, model, optimizer, scheduler, model_name="tiny", step=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"] and load_checkpoint(folder, model)["step"] == 2
    with pytest.raises(TypeError):
        save_checkpoint(folder, model, model_name="tiny", step=object())  # not JSON: fails while writing
    assert sorted(os.listdir(tmp_path)) == ["ckpt"] and load_checkpoint(folder, model)["step"] == 2


def test_refusals_are_explained(tmp_path):
    model, optimizer, _ = _setup()
    folder = str(tmp_path / "ckpt")
    save_checkpoint(folder, model, model_name="tiny")
    with pytest.raises(ValueError, match="is a checkpoint of 'tiny', not of 'msdnet_cifar_7exit'"):
        load_checkpoint(folder, model, model_name="msdnet_cifar_7exit")
    other = MSDNet(num_blocks=2, base=1, step=1, num_channels=4, growth_rate=2, gr_factor="1-2", bn_factor="1-2",
                   stem_type="cifar", head_channels=8, num_classes=5, img_size=16)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(folder, other)
    with pytest.raises(FileNotFoundError, match="holds weights only"):
        load_checkpoint(folder, model, optimizer)
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        load_checkpoint(str(tmp_path), model)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_loading_never_unpickles_code(tmp_path):
    model, optimizer, _ = _setup()
    folder = str(tmp_path / "ckpt")
    save_checkpoint(folder, model, optimizer, model_name="tiny")
    torch.save({"optimizer": Payload(), "rng": {}}, os.path.join(folder, "training.pt"))
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(folder, model, optimizer)
