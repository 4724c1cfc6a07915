"""The README's main job, launched as a user launches it: ``accelerate launch recipes/train.py``
(here with two epochs per phase and its folders in a temporary directory)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.checkpoint import load_checkpoint
from timm_exits.config import load_config

ROOT = Path(__file__).resolve().parents[1]



def test_the_main_jobs_config_is_the_readmes_imta_on_the_narrowed_msdnet():
    config = load_config(str(ROOT / "recipes" / "digits.py"))
    assert config["model"] == {"name": "msdnet_cifar_5exit",
                               "kwargs": {"num_channels": 4, "growth_rate": 2, "head_channels": 6}}
    assert config["data"]["embedded"] == "digits"
    ge, imta = config["phases"]
    assert (ge["name"], ge["technique"]["gradient_equilibrium"]) == ("phase1_ge", True)
    assert (imta["name"], imta["technique"]["type"], imta["technique"]["isc"]) == ("phase2_isc_ofa", "OneForAll", "reference")


@pytest.mark.slow
def test_main_job_trains_imta_on_the_embedded_digits(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    run = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "--mixed_precision", "no",
         "--dynamo_backend", "no", "recipes/train.py", "--output-dir", str(tmp_path / "out"),
         "--cfg-options", "train.epochs=2", f"data.dir={tmp_path / 'digits'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # the embedded dataset became real image files: 1,797 PNGs in 10 class folders, split 80 / 20
    pngs = list((tmp_path / "digits").rglob("*.png"))
    assert len(pngs) == 1797 and len(list((tmp_path / "digits" / "val").glob("*/*.png"))) == 359
    assert sorted(p.name for p in (tmp_path / "digits" / "train").iterdir()) == [str(d) for d in range(10)]
    assert "[phase2_isc_ofa] msdnet_cifar_5exit: 359 test images" in run.stdout and "budgeted (maxprob)" in run.stdout
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    ge, imta = results["phases"]
    assert (ge["phase"], imta["phase"]) == ("phase1_ge", "phase2_isc_ofa")
    assert ge["technique"]["gradient_equilibrium"] and imta["technique"]["type"] == "OneForAll"
    assert imta["test_samples"] == 359 and imta["val_samples"] == 288
    top1 = [e["top1"] for e in imta["exits"]]
    assert top1[-1] > 50, top1  # ten classes: chance is 10 % (two epochs: the narrow early exits lag behind)
    for phase in ("phase1_ge", "phase2_isc_ofa"):
        assert sorted(p.name for p in (out / phase).iterdir()) == [
            "best", "checkpoint", "config.json", "evaluation.json", "evaluation.png", "model.safetensors",
            "summary.csv"]  # nothing half-written
        assert len((out / phase / "summary.csv").read_text().splitlines()) == 1 + 2  # a header, a row per epoch
    model = timm.create_model("msdnet_cifar_5exit", num_classes=10, in_chans=1, num_channels=4, growth_rate=2,
                              head_channels=6)  # recipes/_base_/models/msdnet_digits.py
    # each phase folder is a timm model folder: the architecture, its arguments and the preprocessing
    folder = timm.create_model(f"local-dir:{out / 'phase1_ge'}", pretrained=True)
    assert timm.data.resolve_data_config({}, model=folder)["input_size"] == (1, 32, 32)
    assert all(torch.equal(v, load_file(out / "phase1_ge" / "model.safetensors")[k]) for k, v in folder.state_dict().items())
    assert json.loads((out / "phase2_isc_ofa" / "config.json").read_text())["timm_exits"]["phase"] == "phase2_isc_ofa"
    state = load_checkpoint(str(out / "phase1_ge" / "checkpoint"), model, model_name="msdnet_cifar_5exit")
    assert state["finished"] and state["epoch"] == 2 and state["updates"] == 2 * (1149 // 64)
    torch.load(out / "phase2_isc_ofa" / "checkpoint" / "training.pt", weights_only=True)  # no pickled code
    # phase II trains new heads on phase I's network, frozen: its weights are phase I's final ones
    first = load_file(out / "phase1_ge" / "model.safetensors")
    second = load_file(out / "phase2_isc_ofa" / "model.safetensors")
    assert all(torch.equal(second[f"backbone.{k}"], v) for k, v in first.items()
               if "running" not in k and "batches_tracked" not in k)  # BN statistics still move, as in IMTA
    assert any(k.startswith("isc.") for k in second)
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
