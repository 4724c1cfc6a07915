"""Checkpoints: exact resume, atomic replacement, refusals, no unpickled code."""
import os

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
    with pytest.raises(ValueError, match="is not a timm-exits training state") as refused:
        load_checkpoint(folder, model, optimizer)
    assert "weights_only" not in str(refused.value)  # not PyTorch's page of advice on unsafe globals


def _snapshot(root) -> dict:
    """Every file under ``root`` (relative path -> bytes) and every folder (-> None)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def _user_folders(tmp_path, model):
    """A run folder (the engine's files, a checkpoint inside, the user's notes) and a source folder."""
    run = tmp_path / "run"
    save_checkpoint(str(run / "checkpoint"), model, model_name="tiny", epoch=1)
    for name, text in (("run.json", '{"config": {}}'), ("config.json", "{}"), ("results.json", "{}"),
                       ("notes.txt", "my notes")):
        (run / name).write_text(text)
    (run / "model.safetensors").write_bytes((run / "checkpoint" / "model.safetensors").read_bytes())
    source = tmp_path / "project"
    (source / "pkg").mkdir(parents=True)
    (source / "train.py").write_text("print('my code')\n")
    (source / "pkg" / "__init__.py").write_text("")
    return run, source


def test_writers_refuse_folders_they_did_not_write_and_touch_nothing(tmp_path):
    from timm_exits.inference.export import export_model

    model, _, _ = _setup()
    model.eval()
    run, source = _user_folders(tmp_path, model)
    before = _snapshot(tmp_path)
    for folder in (run, source, tmp_path):
        with pytest.raises(FileExistsError, match="was not written by timm-exits as a checkpoint.*remove this one"):
            save_checkpoint(str(folder), model, model_name="tiny")
        with pytest.raises(FileExistsError, match="was not written by timm-exits.*choose a new or empty folder"):
            export_model(model, torch.randn(1, 3, 16, 16), str(folder))
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a folder"):
        save_checkpoint(str(tmp_path / "a-file"), model)
    assert _snapshot(tmp_path) == {**before, "a-file": b"mine"}
    # an export and a checkpoint are both ours, but one never replaces the other
    with pytest.raises(FileExistsError, match=r"another kind of timm-exits output \(checkpoint"):
        export_model(model, torch.randn(1, 3, 16, 16), str(run / "checkpoint"))
    export_model(model, torch.randn(1, 3, 16, 16), str(tmp_path / "export"))
    exported = _snapshot(tmp_path / "export")
    with pytest.raises(FileExistsError, match="another kind of timm-exits output"):
        save_checkpoint(str(tmp_path / "export"), model)
    assert _snapshot(tmp_path / "export") == exported and "manifest.json" in exported
    assert _snapshot(run) == {k.split("/", 1)[1]: v for k, v in before.items() if k.startswith("run/")}


def test_writers_replace_their_own_folders_an_empty_one_and_an_older_versions_checkpoint(tmp_path):
    model, optimizer, _ = _setup()
    (tmp_path / "empty").mkdir()
    save_checkpoint(str(tmp_path / "empty"), model, model_name="tiny", step=1)
    save_checkpoint(str(tmp_path / "empty"), model, optimizer, model_name="tiny", step=2)
    assert load_checkpoint(str(tmp_path / "empty"), model)["step"] == 2
    # a checkpoint of an older version (no marker): recognised by its exact files, replaced
    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.safetensors", "training.pt", "state.json"):
        (old / name).write_bytes((tmp_path / "empty" / name).read_bytes())
    save_checkpoint(str(old), model, model_name="tiny", step=3)
    assert load_checkpoint(str(old), model)["step"] == 3
    # ... but not with a file of the user's in it
    older = tmp_path / "older"
    older.mkdir()
    for name in ("model.safetensors", "state.json", "mine.txt"):
        (older / name).write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"not empty \(mine.txt, model.safetensors, state.json\)"):
        save_checkpoint(str(older), model)
    assert sorted(os.listdir(older)) == ["mine.txt", "model.safetensors", "state.json"]


def _damage(folder, name, how):
    path = os.path.join(folder, name)
    if how == "dir":
        os.remove(path)
        os.mkdir(path)
    elif how == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    elif how == "pickled":
        torch.save({"optimizer": Payload(), "rng": {}}, path)
    else:
        open(path, "wb").write(how)


@pytest.mark.parametrize("name, how, message", [
    ("state.json", b"{garbage", "state.json' cannot be read as JSON"),
    ("state.json", b"[1, 2]", "state.json' holds a list, not a mapping"),
    ("state.json", "dir", "state.json' cannot be read as JSON .*Is a directory"),
    ("model.safetensors", b"\xff" * 100, "model.safetensors' cannot be read as safetensors weights"),
    ("model.safetensors", "truncated", "model.safetensors' cannot be read as safetensors weights"),
    ("model.safetensors", "dir", "model.safetensors' cannot be read as safetensors weights"),
    ("training.pt", "pickled", r"training.pt' is not a timm-exits training state \(not a weights-only"),
    ("training.pt", b"garbage" * 10, "training.pt' is not a timm-exits training state"),
    ("training.pt", "truncated", "training.pt' cannot be read as a PyTorch file"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else "garbage" if isinstance(v, bytes) else None)
def test_a_damaged_checkpoint_file_is_named_with_what_to_do(tmp_path, name, how, message):
    model, optimizer, _ = _setup()
    folder = str(tmp_path / "ckpt")
    save_checkpoint(folder, model, optimizer, model_name="tiny")
    _damage(folder, name, how)
    with pytest.raises(ValueError, match=message + ".*restore it from a copy, or remove the checkpoint folder"):
        load_checkpoint(folder, model, optimizer)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    model, _, _ = _setup()
    save_checkpoint(str(tmp_path / "ckpt"), model, model_name="tiny", run_id="a1")
    with pytest.raises(ValueError, match="belongs to another run \\(run id 'a1', this run's is 'b2'\\)"):
        load_checkpoint(str(tmp_path / "ckpt"), model, run_id="b2")
    assert load_checkpoint(str(tmp_path / "ckpt"), model, run_id="a1")["run_id"] == "a1"
