"""The example mmengine configs in recipes/mmengine, run through recipes/mmengine/train.py on a tiny
image folder (real files), shrunk with --cfg-options."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
SHRINK = ["train_cfg.max_epochs=1", "train_cfg.val_interval=1", "train_dataloader.batch_size=8",
          "train_dataloader.num_workers=0", "val_dataloader.num_workers=0", "val_dataloader.batch_size=16",
          "model.model_kwargs.num_channels=4", "model.model_kwargs.growth_rate=2", "model.model_kwargs.num_classes=3"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    for split, seed in (("train", 0), ("val", 1), ("holdout", 2)):
        make_image_folder(root / split, per_class=8, seed=seed)
    return root


@pytest.mark.parametrize("config, extra", [
    ("msdnet_cifar_ge.py", []),
    ("msdnet_cifar_hdkd.py", ["custom_hooks.0.val_dataloader.num_workers=0", "custom_hooks.0.interval=1"]),
])
def test_example_config_trains(data_root, tmp_path, config, extra):
    work = tmp_path / "work"
    run = subprocess.run([sys.executable, "recipes/mmengine/train.py", f"recipes/mmengine/{config}", "--work-dir", str(work),
                          "--cfg-options", *SHRINK, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, DATA_ROOT=str(data_root)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "epoch_1.pth").exists() or list(work.glob("*.pth"))
    logs = [json.loads(line) for f in work.glob("*/vis_data/scalars.json") for line in f.read_text().splitlines()]
    assert any("multi_exit/exit1_top1" in entry for entry in logs)
