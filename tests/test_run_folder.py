"""A run's output folder: one writer at a time, a re-run never overwrites an earlier run, a resumed
run is the same run (a changed config is refused, more epochs only when asked, with the longer
run's schedule), a checkpoint swap killed half-way is recovered, and mistakes fail before training."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_exits.config import ConfigError, load_config
from timm_exits.checkpoint import load_checkpoint, save_checkpoint
from timm_exits.files import MARKER, OutputLock, atomic_folder, recover_folder
from timm_exits.engine import check_factories, main, run

from helpers import tiny_data, write_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("runs") / "data")


def _config(data: Path, tmp_path: Path, epochs: int = 1, **options) -> dict:
    path = write_config(tmp_path / "c.py", data, extra=f"tracker = None\ntrain = dict(epochs={epochs}, log_every=1)")
    return load_config(str(path), output_dir=str(tmp_path / "out"), cfg_options=options)


def _state(folder: Path) -> dict:
    return json.loads((folder / "checkpoint" / "state.json").read_text())


def test_a_second_run_writes_beside_the_first_and_a_locked_folder_is_refused(data, tmp_path):
    config = _config(data, tmp_path)
    run(config)
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    run(config)  # the README's command run twice: the first run's files stay
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first
    assert (tmp_path / "out-1" / "results.json").is_file()
    with OutputLock(str(tmp_path / "busy")):  # another run is writing there
        with pytest.raises(FileExistsError, match="is in use by another run"):
            run({**config, "output_dir": str(tmp_path / "busy")}, resume=True)
        run({**config, "output_dir": str(tmp_path / "busy")})
    assert (tmp_path / "busy-1" / "results.json").is_file() and not (tmp_path / "busy" / "results.json").exists()


LOCK_AND_FORK = """
import os, sys, time
from timm_exits.files import OutputLock
lock = OutputLock(sys.argv[1])
child = os.fork()
if child == 0:  # a forked child (a data-loader worker) that outlives the run
    time.sleep(60)
    os._exit(0)
print("LOCKED", child, flush=True)
time.sleep(60)
"""


def test_a_killed_runs_forked_children_do_not_hold_its_folder(tmp_path):
    """``--resume`` right after a kill: the killed run's loader workers may live on for seconds."""
    folder = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-c", LOCK_AND_FORK, str(folder)], stdout=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        word, child = run.stdout.readline().split()
        assert word == "LOCKED"
        with pytest.raises(FileExistsError, match=f"is in use by another run \\(process {run.pid}\\)"):
            OutputLock(str(folder))
        run.kill()
        run.wait()
        with OutputLock(str(folder)):
            os.kill(int(child), 0)  # the child still runs (raises if it has gone)
    finally:
        os.killpg(run.pid, signal.SIGKILL)


def test_resume_refuses_a_changed_config_and_lists_the_changes(data, tmp_path, capsys):
    run(_config(data, tmp_path))
    changed = _config(data, tmp_path, **{"optimizer.lr": 0.2, "data.batch_size": 4})
    with pytest.raises(ValueError, match=r"optimizer.lr: 0.05 -> 0.2.*data.batch_size: 8 -> 4|data.batch_size: 8 -> 4"
                                         r".*optimizer.lr: 0.05 -> 0.2"):
        run(changed, resume=True)
    with pytest.raises(ValueError, match=r"train.epochs: 1 -> 2.*more train.epochs with --extend-epochs"):
        run(_config(data, tmp_path, epochs=2), resume=True)
    before = _state(tmp_path / "out")
    run(_config(data, tmp_path, **{"data.workers": 1, "train.log_every": 5}), resume=True)  # safe to change
    assert _state(tmp_path / "out") == before  # a finished run: evaluated again, not trained
    capsys.readouterr()
    (tmp_path / "fresh").mkdir()
    run(_config(data, tmp_path / "fresh"), resume=True)
    assert "holds no run to continue; starting a fresh run" in capsys.readouterr().out


def test_extending_epochs_continues_with_the_longer_schedule(data, tmp_path):
    run(_config(data, tmp_path, epochs=2))
    assert _state(tmp_path / "out")["epoch"] == 2
    run(_config(data, tmp_path, epochs=3), resume=True, extend_epochs=True)
    state = _state(tmp_path / "out")
    assert state["epoch"] == 3 and state["finished"] and state["updates"] == 3 * 4
    training = torch.load(tmp_path / "out" / "checkpoint" / "training.pt", weights_only=True)
    # timm's cosine schedule over 3 epochs at epoch index 2: lr * (1 + cos(pi * 2 / 3)) / 2 (the
    # restored 2-epoch schedule would give its minimum, 0, and train nothing)
    lr = training["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.05 * (1 + math.cos(math.pi * 2 / 3)) / 2)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["train"]["epochs"] == 3


_KILL_BETWEEN_RENAMES = """
import os, signal, sys
from timm_exits.config import load_config
from timm_exits.engine import run
replace = os.replace
def replace_then_die(src, dst):
    replace(src, dst)
    if str(src).endswith(os.sep + "checkpoint") and ".checkpoint.previous" in str(dst):
        os.kill(os.getpid(), signal.SIGKILL)  # the current checkpoint is aside, the new one not yet in place
os.replace = replace_then_die
run(load_config(sys.argv[1], output_dir=sys.argv[2]))
"""


@pytest.fixture(scope="module")
def killed_between_renames(data, tmp_path_factory):
    """A run killed (SIGKILL) between the checkpoint renames at epoch 1, batch 2, and its config."""
    folder = tmp_path_factory.mktemp("killed")
    config = write_config(folder / "c.py", data, extra="tracker = None\ntrain = dict(epochs=2, checkpoint_every=1)")
    killed = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(config), str(folder / "out")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    return config, folder / "out"


@pytest.mark.parametrize("new", ["complete", "garbage"])
def test_a_kill_between_the_checkpoint_renames_is_recovered(killed_between_renames, tmp_path, capsys, new):
    """``garbage``: the new version's weights lost (as a power cut before they reached the disk
    leaves them: unmarked): the complete previous version is resumed, not deleted."""
    config, out = killed_between_renames[0], tmp_path / "out"
    shutil.copytree(killed_between_renames[1], out)
    assert not (out / "checkpoint").exists() and (out / ".checkpoint.next").is_dir()  # the state a kill leaves
    if new == "garbage":
        weights = out / ".checkpoint.next" / "model.safetensors"
        weights.write_bytes(b"\0" * weights.stat().st_size)
        (out / ".checkpoint.next" / MARKER).unlink()
    run(load_config(str(config), output_dir=str(out)), resume=True)
    printed = capsys.readouterr().out
    version = "new version" if new == "complete" else "previous version"
    assert f"restored {out / 'checkpoint'} from the {version}" in printed
    assert f"epoch 1, batch {2 if new == 'complete' else 1}" in printed
    assert _state(out)["finished"] and _state(out)["updates"] == 8
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".checkpoint")) == []


def test_recover_folder_keeps_a_complete_version_whatever_the_moment_of_the_kill(tmp_path):
    folder = tmp_path / "ckpt"
    with atomic_folder(str(folder)) as tmp:
        Path(tmp, "v").write_text("1")
    # killed while writing the new version: the current one stays, the unfinished one goes
    (tmp_path / ".ckpt.new-abc").mkdir()
    assert recover_folder(str(folder)) is None and Path(folder, "v").read_text() == "1"
    assert not (tmp_path / ".ckpt.new-abc").exists()
    # killed after the current version went aside: the complete new one takes its place
    with atomic_folder(str(tmp_path / "new")) as tmp:
        Path(tmp, "v").write_text("2")
    os.rename(folder, tmp_path / ".ckpt.previous")
    os.rename(tmp_path / "new", tmp_path / ".ckpt.next")
    assert "new version" in recover_folder(str(folder)) and Path(folder, "v").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    # only the previous version survived: it comes back
    os.rename(folder, tmp_path / ".ckpt.previous")
    assert "previous version" in recover_folder(str(folder)) and Path(folder, "v").read_text() == "2"
    # an error while writing leaves the current version and no temporary folder
    with pytest.raises(RuntimeError):
        with atomic_folder(str(folder)) as tmp:
            Path(tmp, "v").write_text("3")
            raise RuntimeError("disk full")
    assert Path(folder, "v").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["ckpt"]


def _checkpoints(tmp_path: Path, new: str) -> tuple:
    """Version 1 of a checkpoint and a new version 2 (complete, or damaged as a kill or a lost write
    leaves it: ``truncated`` weights, or ``garbage`` weights and no marker: never marked complete)."""
    model = torch.nn.Linear(4, 3)
    save_checkpoint(str(tmp_path / "v1"), model, step=1)
    save_checkpoint(str(tmp_path / "v2"), model, step=2)
    weights = tmp_path / "v2" / "model.safetensors"
    if new == "truncated":
        weights.write_bytes(weights.read_bytes()[:40])
    elif new == "garbage":
        weights.write_bytes(b"\xff" * weights.stat().st_size)
        (tmp_path / "v2" / MARKER).unlink()
    return model, tmp_path / "v1", tmp_path / "v2"


# where the writer was killed -> (where version 1 and version 2 are then, by name)
KILL_POINTS = {
    "while writing the new version": ("checkpoint", ".checkpoint.new-x1"),
    "after the new version became .next": ("checkpoint", ".checkpoint.next"),
    "after the current version went aside": (".checkpoint.previous", ".checkpoint.next"),
    "after the new version took its place": (".checkpoint.previous", "checkpoint"),
}


@pytest.mark.parametrize("kill, new", [(kill, new) for kill in KILL_POINTS
                                       for new in ("complete", "truncated", "garbage")
                                       if not (kill.endswith("its place") and new == "garbage")])  # never happens
def test_recovery_keeps_the_newest_complete_version_at_every_kill_point(tmp_path, kill, new):
    model, v1, v2 = _checkpoints(tmp_path / "made", new)
    run = tmp_path / "run"
    run.mkdir()
    for version, name in zip((v1, v2), KILL_POINTS[kill]):
        os.rename(version, run / name)
    restored = recover_folder(str(run / "checkpoint"))
    newest = 2 if new == "complete" and kill != "while writing the new version" else 1
    assert load_checkpoint(str(run / "checkpoint"), model)["step"] == newest
    assert sorted(os.listdir(run)) == ["checkpoint"]  # the other version went
    if newest == 1 and KILL_POINTS[kill][0] != "checkpoint":
        assert "previous version; the new one was not complete" in restored


def test_recovery_never_deletes_a_version_it_cannot_tell_complete(tmp_path):
    _, v1, v2 = _checkpoints(tmp_path / "made", "garbage")
    run = tmp_path / "run"
    run.mkdir()
    os.rename(v2, run / ".checkpoint.next")
    (v1 / MARKER).unlink()  # an older version's checkpoint aside: unmarked, perhaps complete
    os.rename(v1, run / ".checkpoint.previous")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for _ in range(2):
        with pytest.raises(FileNotFoundError, match=r"no complete version of .*checkpoint.* are not marked complete.*"
                                                    r"if one of them is good, rename it to 'checkpoint'"):
            recover_folder(str(run / "checkpoint"))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before and len(before) == 4


@pytest.mark.parametrize("section, value, message", [
    ("model", dict(name="msdnet_cifar_5exitt", kwargs={}), r"not a timm model \(did you mean 'msdnet_cifar_5exit'"),
    ("model", dict(name="msdnet_cifar_5exit", kwargs=dict(growth=3)), r"model.kwargs.*unexpected keyword argument 'growth'"),
    ("optimizer", dict(opt="sgd", lr=0.1, momentun=0.9), r"optimizer .*unexpected keyword argument 'momentun'"),
    ("optimizer", dict(opt="sgdd", lr=0.1), r"optimizer .*sgdd not found"),
    ("scheduler", dict(sched="cosin"), r"scheduler .*Unknown scheduler 'cosin'"),
])
def test_a_misspelt_model_optimizer_or_scheduler_is_refused_before_any_data_is_read(data, tmp_path, section, value,
                                                                                      message):
    config = {**_config(data, tmp_path), section: value}
    with pytest.raises(ConfigError, match=message):
        check_factories(config)
    with pytest.raises(ConfigError, match=message):
        run({**config, "data": {**config["data"], "dir": str(tmp_path / "no-data-here")}})  # the data is not read


def test_unusable_output_folders_end_with_error_and_exit_code_2(data, tmp_path, capsys):
    config = write_config(tmp_path / "c.py", data, extra="tracker = None")
    (tmp_path / "a-file").write_text("")
    assert main(argv=[str(config), "--output-dir", str(tmp_path / "a-file")]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o500)
        assert main(argv=[str(config), "--output-dir", str(tmp_path / "ro" / "out")]) == 2
        assert "cannot write to output folder" in capsys.readouterr().err
    assert main(argv=[str(config), "--output-dir", str(tmp_path / "x"), "--cfg-options", "train.epochs=ten"]) == 2
    assert "train.epochs must be an integer >= 1, got 'ten'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    """A finished one-epoch run and its config file."""
    folder = tmp_path_factory.mktemp("finished")
    config = write_config(folder / "c.py", data, extra="tracker = None\ntrain = dict(epochs=1)")
    run(load_config(str(config), output_dir=str(folder / "out")))
    return config, folder / "out"


def _edit_state(**values):
    def edit(folder: Path):
        path = folder / "checkpoint" / "state.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "finished": False, **values}))
    return edit


def _replace(name: str, by):
    def edit(folder: Path):
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        path.mkdir() if by == "dir" else path.write_bytes(by)
    return edit


class _Pickled:
    def __reduce__(self):
        return (print, ("unpickled",))


@pytest.mark.parametrize("damage, message", [
    (_edit_state(epoch=-3), r"state.json': epoch is -3, expected an integer from 0 to 1 for this run"),
    (_edit_state(epoch=0, batch=10 ** 9), "state.json': batch is 1000000000, expected an integer from 0 to 3"),
    (_edit_state(epoch=0, batch=-5), "state.json': batch is -5"),
    (_edit_state(epoch="0"), "state.json': epoch is '0'"),
    (_edit_state(updates=-1), "state.json': updates is -1"),
    (_edit_state(epoch=0, finished=True), "state.json': finished is True at epoch 0"),
    (_edit_state(phase="phase2"), "is the checkpoint of phase 'phase2', not of 'train'"),
    (lambda f: torch.save({"optimizer": _Pickled(), "rng": {}}, f / "checkpoint" / "training.pt"),
     r"training.pt' is not a timm-exits training state \(not a weights-only PyTorch file"),
    (_replace("checkpoint/state.json", b"{"), "state.json' cannot be read as JSON"),
    (_replace("checkpoint/state.json", "dir"), "state.json' cannot be read as JSON"),
    (_replace("run.json", b"garbage"), "run.json' cannot be read as JSON.*restore it from a copy"),
    (_replace("run.json", b"[]"), "run.json' is not a timm-exits run record"),
    (_replace("run.json", b'{"config": {}, "processes": 0}'), "run.json' records 0 processes"),
    (_replace("run.json", "dir"), "run.json' is not a file; the run writes its run.json there: move it away"),
    (_replace("config.json", "dir"), "config.json' is not a file; the run writes its config.json there"),
    (_replace(".lock", "dir"), r"\.lock' is not a file; the run's lock file belongs there"),
    (_replace("checkpoint", b"x"), "checkpoint' is not a folder; a folder belongs there: move it away"),
], ids=["epoch -3", "batch 10**9", "batch -5", "epoch '0'", "updates -1", "finished at epoch 0", "another phase",
        "pickled training.pt", "garbage state.json", "state.json a folder", "garbage run.json", "run.json a list",
        "run.json 0 processes", "run.json a folder", "config.json a folder", ".lock a folder", "checkpoint a file"])
def test_a_run_folders_own_files_are_checked_like_user_input(finished_run, tmp_path, capsys, damage, message):
    config, out = finished_run[0], tmp_path / "out"
    shutil.copytree(finished_run[1], out)
    damage(out)
    before = _files(out)
    assert main(argv=[str(config), "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(message, err), err
    assert _files(out) == before


def _files(folder: Path) -> dict:
    """Every file's bytes (None for a folder), but the lock's, and run.json's record but the folder's
    own path (--output-dir may change on resume)."""
    files = {p: p.read_bytes() if p.is_file() else None for p in folder.rglob("*") if p.name != ".lock"}
    try:
        record = json.loads(files[folder / "run.json"])
        del record["config"]["output_dir"]
        files[folder / "run.json"] = record
    except (ValueError, TypeError, KeyError):  # damaged on purpose
        pass
    return files
