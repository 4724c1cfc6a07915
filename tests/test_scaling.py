"""Scaling out keeps a recipe's meaning: ``data.batch_size`` is the global batch, so one process, two
processes (gloo, real ``accelerate launch``) and two machines (two launches on one host) take the
same updates per epoch under the same learning-rate schedule."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from timm_exits.config import resolve_config
from timm_exits import data as data_module
from timm_exits.data import ImageFiles
from timm_exits.engine import batch_plan

from launch import free_port, launch_two_processes
from helpers import make_image_folder, tiny_data, write_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "recipes" / "train.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("scaling") / "data")


def _launch(*args: str, processes: int = 1, machine: int = 0, machines: int = 1, port: int = 0):
    """``accelerate launch`` of the training script; with ``machines`` > 1, one of the machines."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--mixed_precision", "no", "--dynamo_backend", "no"]
    if machines > 1:
        command += ["--multi_gpu", "--num_machines", str(machines), "--machine_rank", str(machine),
                    "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    else:
        command += ["--cpu"]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(command + [TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)


def _finished(process: subprocess.Popen):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out


def _learning_rates(run: Path):
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    return [(e.step, round(e.value, 12)) for e in events.Scalars("train/lr")]


def test_one_and_two_processes_take_the_same_updates_under_the_same_schedule(data, tmp_path):
    config = str(write_config(tmp_path / "config.py", data, extra="train = dict(epochs=2, log_every=1)"))
    out = _finished(_launch(config, "--output-dir", str(tmp_path / "one")))
    two = launch_two_processes(TRAIN, args=[config, "--output-dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[train] global batch 8 (8 per process x 1 processes x 1 accumulation steps), 4 updates per epoch, " \
           "lr 0.05" in out
    assert "[train] global batch 8 (4 per process x 2 processes x 1 accumulation steps), 4 updates per epoch" \
           in two.stdout
    runs = {name: json.loads((tmp_path / name / "run.json").read_text()) for name in ("one", "two")}
    assert runs["one"]["batches"]["train"] == dict(global_batch=8, per_process_batch=8, processes=1,
                                                   grad_accum_steps=1, lr=0.05)
    assert runs["two"]["batches"]["train"] == dict(global_batch=8, per_process_batch=4, processes=2,
                                                   grad_accum_steps=1, lr=0.05)
    states = [json.loads((tmp_path / name / "checkpoint" / "state.json").read_text()) for name in ("one", "two")]
    assert states[0]["updates"] == states[1]["updates"] == 8  # 2 epochs of 32 images in batches of 8
    one, two = _learning_rates(tmp_path / "one"), _learning_rates(tmp_path / "two")
    assert len(one) == 8 and one == two
    assert one[0][1] > one[-1][1]  # the cosine schedule decays


def test_a_global_batch_that_does_not_divide_over_the_processes_is_refused():
    config = resolve_config(dict(model=dict(name="msdnet_cifar_5exit"), data=dict(batch_size=10)))
    assert batch_plan(config, 2)["per_process_batch"] == 5
    with pytest.raises(ValueError, match=r"data.batch_size is the global batch \(all processes together\): 10 "
                                         r"images do not divide over 4 processes; set data.batch_size to a "
                                         r"multiple of 4"):
        batch_plan(config, 4)


@pytest.mark.slow
def test_two_machines_on_one_host_train_checkpoint_and_resume_together(data, tmp_path):
    """Two ``accelerate launch`` invocations, machine rank 0 and 1 of 2 (one process each, gloo over
    localhost): the multi-node path of the ImageNet recipes. They train one epoch, then resume the run
    together for a second."""
    config = str(write_config(tmp_path / "config.py", data, extra="train = dict(epochs=1, log_every=1)\n"
                                                                   "tracker = None"))
    run = tmp_path / "run"

    def together(*args: str):
        port = free_port()
        machines = [_launch(config, "--output-dir", str(run), *args, processes=2, machines=2, machine=rank, port=port)
                    for rank in (0, 1)]
        return [_finished(machine) for machine in machines]

    first, _ = together()
    assert "4 per process x 2 processes" in first
    assert json.loads((run / "checkpoint" / "state.json").read_text())["updates"] == 4
    assert json.loads((run / "run.json").read_text())["processes"] == 2
    resumed, _ = together("--resume", "--extend-epochs", "--cfg-options", "train.epochs=2")
    assert "resumed from" in resumed and "epoch 2" in resumed
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["updates"] == 8 and state["epoch"] == 2 and state["finished"] is True
    assert not (tmp_path / "run-1").exists()  # both machines wrote to the one run folder


def test_a_file_check_passed_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
    """The header check runs once per listing (paths, sizes, times, inodes), not once per process and
    run: the second build opens no file, a changed file makes the check run again."""
    monkeypatch.setenv("TIMM_EXITS_CACHE", str(tmp_path / "cache"))
    opened, check = [], data_module._file_problem
    monkeypatch.setattr(data_module, "_file_problem", lambda file, decode: opened.append(1) or check(file, decode))
    root = make_image_folder(tmp_path / "train", classes=2, per_class=3)
    ImageFiles(str(root))
    assert len(opened) == 6 and len(list((tmp_path / "cache" / "file-checks").iterdir())) == 1
    ImageFiles(str(root))
    assert len(opened) == 6  # remembered: no file opened
    image = root / "class1" / "2.png"
    image.write_bytes(b"\0" * image.stat().st_size)  # broken, with the same size
    with pytest.raises(ValueError, match=r"cannot read image file .*: class1/2.png"):
        ImageFiles(str(root))
    with pytest.raises(ValueError, match="cannot read image file"):  # a failed check is not remembered
        ImageFiles(str(root))
    assert len(opened) == 18
