"""Training you can watch: every epoch the held-out split's accuracy (timm's summary columns, every
exit's top-1 and their mean) in ``summary.csv``, TensorBoard and the run's ``log.txt``, and the best
epoch's weights in ``best/`` beside the last checkpoint; a killed and resumed run ends with the same."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Subset

from timm_exits.config import ConfigError, load_config, resolve_preprocessing
from timm_exits.data import ImageFiles, image_transform, seeded_order
from timm_exits.inference.outputs import anytime_accuracy, collect_outputs
from timm_exits.engine import main, run

from helpers import tiny_data, write_config

ROOT = Path(__file__).resolve().parents[1]
EXITS = [f"exit{k}_top1" for k in range(1, 6)]
COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", *EXITS, "anytime_top1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("watch") / "data")


@pytest.fixture(scope="module")
def watched(data, tmp_path_factory):
    """A finished 2-epoch run of the tiny MSDNet (5 exits), TensorBoard on, and its config file."""
    folder = tmp_path_factory.mktemp("watched")
    config = write_config(folder / "c.py", data)
    run(load_config(str(config), output_dir=str(folder / "out")))
    return config, folder / "out"


def _summary(folder: Path):
    with open(folder / "summary.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, [{k: float(v) if v else None for k, v in row.items()} for row in reader]


def _anytime_top1(weights: Path, data: Path) -> float:
    """The anytime top-1 (mean of the exits' top-1, %) of a weights file on the run's held-out split
    (the first third of the training split's seeded order), computed here from the model."""
    model = timm.create_model("msdnet_cifar_5exit", num_channels=4, growth_rate=2, num_classes=3)
    model.load_state_dict(load_file(weights))
    given = dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0, interpolation=None)
    files = ImageFiles(str(data / "train"), image_transform(resolve_preprocessing(model, given), False))
    val = Subset(files, seeded_order(len(files), 0)[:round(len(files) / 3)])
    top1 = anytime_accuracy(collect_outputs(model, DataLoader(val, batch_size=8), progress=False))["top1"]
    return sum(top1) / len(top1)


def test_every_epoch_is_validated_into_summary_csv(watched):
    columns, rows = _summary(watched[1])
    assert columns == COLUMNS and [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert all(row[k] is not None for k in COLUMNS) and row["train_loss"] > 0 and row["eval_loss"] > 0
        assert row["eval_top1"] == row["exit5_top1"]  # timm's columns: the last exit, what model(x) answers
        assert row["eval_top5"] >= row["eval_top1"] and row["anytime_top1"] == pytest.approx(
            sum(row[k] for k in EXITS) / 5)
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.025])  # cosine over 2 epochs, the epoch's lr


def test_the_log_holds_every_printed_line(watched):
    log = (watched[1] / "log.txt").read_text()
    assert "[train] epoch 1/2: train_loss " in log and "[train] epoch 2/2: train_loss " in log
    assert "anytime_top1" in log and "[train] wrote " in log and log.rstrip().endswith("results.json")


def test_tensorboard_has_the_validation_scalars(watched):
    events = EventAccumulator(str(watched[1] / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    _, rows = _summary(watched[1])
    for column in ("eval_loss", "eval_top1", "exit1_top1", "exit5_top1", "anytime_top1"):
        scalars = events.Scalars(f"train/val/{column}")
        assert [s.step for s in scalars] == [4, 8], tags  # after each epoch's 4 updates
        assert [s.value for s in scalars] == pytest.approx([r[column] for r in rows], abs=1e-4)


def test_best_holds_the_best_epochs_weights(watched, data):
    out = watched[1]
    _, rows = _summary(out)
    best = max(rows, key=lambda r: r["anytime_top1"])  # the first of equals, as timm's CheckpointSaver keeps
    state = json.loads((out / "best" / "state.json").read_text())
    assert (state["metric"], state["epoch"]) == ("anytime_top1", best["epoch"])
    assert state["value"] == pytest.approx(best["anytime_top1"])
    assert _anytime_top1(out / "best" / "model.safetensors", data) == pytest.approx(state["value"])
    assert _anytime_top1(out / "model.safetensors", data) == pytest.approx(rows[-1]["anytime_top1"])
    last = load_file(out / "model.safetensors")
    weights = load_file(out / "best" / "model.safetensors")
    assert all(torch.equal(weights[k], last[k]) for k in last) == (best["epoch"] == 2)


@pytest.mark.slow
def test_interval_and_metric_are_configurable(watched, data, tmp_path):
    config = write_config(tmp_path / "c.py", data, extra="tracker = None\ntrain = dict(epochs=3, val_interval=2, "
                                                         "best_metric='eval_loss')")
    run(load_config(str(config), output_dir=str(tmp_path / "out")))
    _, rows = _summary(tmp_path / "out")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[0]["train_loss"] > 0
    assert rows[0]["eval_top1"] is None and None not in (rows[1]["eval_top1"], rows[2]["eval_top1"])  # 2 and the last
    state = json.loads((tmp_path / "out" / "best" / "state.json").read_text())
    lowest = min(rows[1:], key=lambda r: r["eval_loss"])
    assert (state["metric"], state["epoch"]) == ("eval_loss", lowest["epoch"])
    never = write_config(tmp_path / "n.py", data, extra="tracker = None\ntrain = dict(epochs=2, log_every=1, "
                                                         "val_interval=0)")
    run(load_config(str(never), output_dir=str(tmp_path / "never")))
    _, rows = _summary(tmp_path / "never")
    assert len(rows) == 2 and rows[0]["train_loss"] > 0 and {r["anytime_top1"] for r in rows} == {None}
    assert not (tmp_path / "never" / "best").exists()
    # validating draws nothing from the random generators: the run validated every epoch ends the same
    a, b = load_file(watched[1] / "model.safetensors"), load_file(tmp_path / "never" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _summary(watched[1])[1][1]["train_loss"] == rows[1]["train_loss"]


def test_a_best_metric_the_model_does_not_have_is_refused(data, tmp_path, capsys):
    config = write_config(tmp_path / "c.py", data, extra="tracker = None")
    with pytest.raises(ConfigError, match=r"train.best_metric must be 'anytime_top1', .* got 'accuracy'"):
        load_config(str(config), cfg_options={"train.best_metric": "accuracy"})
    assert main(argv=[str(config), "--output-dir", str(tmp_path / "out"), "--cfg-options",
                      "train.best_metric=exit9_top1"]) == 2
    assert "names an exit" in capsys.readouterr().err and not (tmp_path / "out" / "checkpoint").exists()


_KILL_AFTER_SUMMARY = """
import os, signal, sys
from timm_exits.config import load_config
from timm_exits.engine import run
replace, written = os.replace, []
def replace_then_die(src, dst):
    replace(src, dst)
    written.append(os.path.basename(dst))
    if written.count("summary.csv") == 2:  # epoch 2's row is written, its checkpoint not yet
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace_then_die
run(load_config(sys.argv[1], output_dir=sys.argv[2]))
"""


@pytest.mark.slow
def test_a_resumed_run_continues_summary_best_and_log(watched, data, tmp_path):
    """Killed after epoch 2's summary row and best/ but before its checkpoint (the last one: epoch 2,
    batch 3 of 4): the resumed run repeats the rest of epoch 2 and ends with the uninterrupted run's
    summary.csv and best/, its log continuing the killed run's."""
    config = write_config(tmp_path / "c.py", data, extra="train = dict(epochs=2, checkpoint_every=1)")
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_SUMMARY, str(config), str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode < 0, killed.stderr[-2000:]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (state["epoch"], state["batch"], len(state["summary"])) == (1, 3, 1)
    assert len(_summary(out)[1]) == 2  # the row of the epoch the resumed run repeats
    log = (out / "log.txt").read_text()
    assert "[train] epoch 2/2" in log and "resumed from" not in log
    assert main(argv=[str(config), "--output-dir", str(out), "--resume"]) == 0
    assert (out / "summary.csv").read_bytes() == (watched[1] / "summary.csv").read_bytes()
    whole, resumed = (json.loads((f / "best" / "state.json").read_text()) for f in (watched[1], out))
    assert {k: resumed[k] for k in ("metric", "value", "epoch")} == {k: whole[k] for k in ("metric", "value", "epoch")}
    a, b = load_file(watched[1] / "best" / "model.safetensors"), load_file(out / "best" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    continued = (out / "log.txt").read_text()
    assert continued.startswith(log) and "resumed from" in continued[len(log):]


@pytest.mark.parametrize("field, value", [("summary", []), ("best", {"metric": "eval_loss", "value": 1.0, "epoch": 1})])
def test_a_damaged_record_of_the_epochs_is_refused_on_resume(watched, tmp_path, capsys, field, value):
    out = tmp_path / "out"
    shutil.copytree(watched[1], out)
    path = out / "checkpoint" / "state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    assert main(argv=[str(watched[0]), "--output-dir", str(out), "--resume"]) == 2
    assert "its loss_sum, summary or best is not what this run records at epoch 2" in capsys.readouterr().err
