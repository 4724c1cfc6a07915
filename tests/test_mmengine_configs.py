"""The example mmengine configs in recipes/mmengine: each resolves to the technique it names, and
they run through recipes/mmengine/train.py on a tiny image folder (real files), shrunk with
--cfg-options."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mmengine.config import Config

from timm_exits.train import build_technique

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


@pytest.mark.parametrize("config, technique", [
    ("msdnet_cifar_ge.py", dict(type="CrossEntropy")),
    ("msdnet_cifar_pcgrad.py", dict(type="PCGrad", scope="global", order="random", protect_deeper=False)),
    ("msdnet_cifar_hdkd.py", dict(type="HDKD", alpha=0.5, temperature=4.0, lr=3e-4, interval=4)),
    ("msdnet_cifar_imta.py", dict(type="OneForAll", isc="reference", temperature=3.0, gamma=0.9, reduction="batchmean")),
])
def test_example_config_names_its_technique(config, technique):
    """Each config's technique section (the imta one replaces the base's) builds with its options."""
    section = Config.fromfile(str(ROOT / "recipes" / "mmengine" / config)).model.technique.to_dict()
    assert section == technique
    built = build_technique(section).config()
    assert {k: built[k] for k in technique} == technique


@pytest.mark.parametrize("config, extra", [
    ("msdnet_cifar_ge.py", []),
    ("msdnet_cifar_hdkd.py", ["custom_hooks.0.dataloader.num_workers=0", "model.technique.interval=1"]),
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
