"""``timm-exits evaluate`` on a real image folder with a real checkpoint, as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_exits  # noqa: F401
from timm_exits.data import image_dataset
from timm_exits.inference import Thresholds, anytime_accuracy, collect_outputs
from timm_exits.profile import profile_exits

from helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "timm_exits.cli", "evaluate", *args],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    data = make_image_folder(tmp / "data")
    torch.manual_seed(0)
    model = timm.create_model("msdnet_cifar_5exit", num_classes=3).eval()
    checkpoint = tmp / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint)
    return tmp, data, model, checkpoint


def test_evaluate_writes_tables_json_plot_and_thresholds(setup):
    tmp, data, model, checkpoint = setup
    out = tmp / "out"
    run = _run("msdnet_cifar_5exit", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--val-fraction", "0.5",
               "--output", str(out), "--workers", "0", "--target-macs", "30e6")
    assert run.returncode == 0, run.stderr
    assert "top-1" in run.stdout and "budgeted (maxprob)" in run.stdout
    report = json.loads((out / "evaluation.json").read_text())
    assert (out / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["val_samples"] == 15 and report["test_samples"] == 15 and len(report["budgeted"]) == 39
    costs = [c.macs for c in profile_exits(model)]
    assert [e["cost"] for e in report["exits"]] == costs
    # the same numbers as evaluating the same split by hand
    dataset = image_dataset(str(data), model)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0)).tolist()
    test = collect_outputs(model, torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order[15:]), batch_size=8),
                           progress=False)
    assert [e["top1"] for e in report["exits"]] == pytest.approx(anytime_accuracy(test)["top1"])
    thresholds = Thresholds.load(str(out / "thresholds.json"), model="msdnet_cifar_5exit", num_exits=5)
    assert thresholds.costs == costs and "validation" in thresholds.note
    assert thresholds.input_size == [3, 32, 32]  # the size the costs are for


def test_evaluate_errors_are_explained(setup, tmp_path):
    _, data, _, checkpoint = setup
    missing = _run("msdnet_cifar_5exit", "--data-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    empty = _run("msdnet_cifar_5exit", "--data-dir", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "holds no images in class folders" in empty.stderr
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("msdnet_cifar_5exit", num_classes=7).state_dict().items()}, other)
    wrong = _run("msdnet_cifar_5exit", "--checkpoint", str(other), "--data-dir", str(data), "--workers", "0")
    assert wrong.returncode == 2 and "does not fit msdnet_cifar_5exit with 3 classes" in wrong.stderr
    assert "size mismatch" in wrong.stderr and "Traceback" not in wrong.stderr
    no_val = _run("msdnet_cifar_5exit", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--workers", "0",
                  "--target-accuracy", "50", "--output", str(tmp_path / "o"))
    assert no_val.returncode == 2 and "need a validation split" in no_val.stderr
