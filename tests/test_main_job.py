"""The README's main job, launched as a user launches it: ``accelerate launch recipes/train.py``."""
import json
import os
import subprocess
import sys
from pathlib import Path


import timm

import timm_exits  # noqa: F401
from timm_exits.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_trains_every_exit_and_saves_results(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    run = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
         "recipes/train.py", "--epochs", "1", "--output", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "exit  top-1 (%)" in run.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model"] == "msdnet_cifar_5exit" and results["test_images"] == 359
    assert len(results["top1_per_exit"]) == 5
    assert min(results["top1_per_exit"]) > 50  # ten classes: chance is 10%
    model = timm.create_model("msdnet_cifar_5exit", num_classes=10, in_chans=1)
    state = load_checkpoint(str(tmp_path / "checkpoint"), model, model_name="msdnet_cifar_5exit")
    assert state["top1_per_exit"] == results["top1_per_exit"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "results.json"]  # nothing half-written
