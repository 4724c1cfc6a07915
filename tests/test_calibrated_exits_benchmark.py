"""benchmarks/calibrated_exits.py on a tiny run folder of the study's layout (run.json and the model
folder), with the study's own config and splits."""
import json
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.config import load_config
from timm_exits.model_folder import save_model_folder

from helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_best_within_reads_the_budgeted_curve():
    from calibrated_exits import best_within

    curve = [{"cost": 10.0, "accuracy": 50.0}, {"cost": 20.0, "accuracy": 60.0}, {"cost": 30.0, "accuracy": 55.0}]
    assert best_within(curve, 25.0) == 60.0 and best_within(curve, 30.0) == 60.0 and best_within(curve, 5.0) is None


@pytest.mark.slow  # fits Laplace twice and evaluates four predictors: about a minute on 2 shared cores
def test_the_benchmark_writes_every_predictor_on_a_run_folder(tmp_path):
    from calibrated_exits import BUDGETS, PREDICTORS, main

    data = make_image_folder(tmp_path / "data" / "train", classes=3, per_class=20)
    config = load_config(str(ROOT / "benchmarks" / "cifar10_study" / "baseline.py"), data_dir=str(data.parent))
    config["data"].update(test_fraction=0.25, val_fraction=0.25, workers=0)
    config["model"]["kwargs"] = dict(num_channels=4, growth_rate=2)
    run = tmp_path / "run"
    torch.manual_seed(0)
    network = timm.create_model(config["model"]["name"], num_classes=3, **config["model"]["kwargs"]).eval()
    save_model_folder(network, str(run), dict(input_size=(3, 32, 32), mean=config["data"]["mean"],
                                              std=config["data"]["std"], crop_pct=1.0, interpolation="bilinear"))
    (run / "run.json").write_text(json.dumps({"config": config}))
    main(["--run", str(run), "--data-dir", str(data.parent), "--batch-size", "8", "--workers", "0", "--no-progress"])
    rows = json.loads((run / "calibrated_exits.json").read_text())
    assert list(rows) == list(PREDICTORS)
    for name, row in rows.items():
        assert len(row["top1"]) == len(row["nll"]) == len(row["ece"]) == 5
        assert list(row["budgeted_top1"]) == [f"{b:.0%}" for b in BUDGETS]
    assert rows["mie"]["top1"][0] == rows["exits"]["top1"][0]  # MIE's first exit is the exit itself
    assert len(rows["laplace"]["laplace_settings"]) == 5
