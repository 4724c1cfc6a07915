"""``timm_exits.inference.evaluate``, the one evaluation the CLI, the engine and the benchmarks run."""
import json
from dataclasses import asdict

import pytest
import timm
import torch
from torch.utils.data import DataLoader

import timm_exits  # noqa: F401
from timm_exits.cli import main
from timm_exits.data import ImageFiles, image_transform, split_dataset
from timm_exits.inference import THRESHOLDS_FILE, Thresholds, evaluate
from timm_exits.inference.report import evaluation_report
from timm_exits.model_folder import load_model_folder, save_model_folder
from timm_exits.profile import profile_exits

from helpers import make_image_folder

DATA_CONFIG = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny 3-class MSDNet's model folder and a test image folder of 3 x 10 real PNGs."""
    tmp = tmp_path_factory.mktemp("evaluate_api")
    data = make_image_folder(tmp / "data")
    torch.manual_seed(0)
    model = timm.create_model("msdnet_cifar_5exit", num_classes=3, num_channels=4, growth_rate=2)
    save_model_folder(model, str(tmp / "model"), DATA_CONFIG, ["class0", "class1", "class2"])
    return tmp, data


def test_evaluate_gives_the_report_and_thresholds_of_the_cli(model_folder, capsys):
    tmp, data = model_folder
    model, data_config = load_model_folder(str(tmp / "model"))
    target = 0.6 * profile_exits(model)[-1].macs
    protocols = ["--val-fraction", "0.5", "--sweep", "--patience-sweep", "--calibration", "--envelope",
                 "--target-macs", str(target)]
    assert main(["evaluate", str(tmp / "model"), "--data-dir", str(data), "--workers", "0", "--output",
                 str(tmp / "cli"), *protocols]) == 0, capsys.readouterr().err
    cli = json.loads((tmp / "cli" / "evaluation.json").read_text())

    dataset = ImageFiles(str(data), image_transform(data_config))
    val, test = split_dataset(dataset, 0.5, seed=0)
    report = evaluate(model, DataLoader(test, batch_size=128), DataLoader(val, batch_size=128),
                      input_size=data_config["input_size"], fit_split=cli["budgeted_protocol"]["fit_split"],
                      envelope=True, sweep="ztw", patience=True, calibration=True, target_cost=target,
                      output_dir=str(tmp / "api"), info={"model": "msdnet_cifar_5exit"})
    report = json.loads(json.dumps(report))
    # every key evaluate() reports, the protocols' results and what it records itself, as the CLI has it
    assert {"budgeted", "threshold_sweep", "patience_sweep", "calibration", "convention"} <= set(report) <= set(cli)
    assert report == {k: cli[k] for k in report}
    assert json.loads((tmp / "api" / "evaluation.json").read_text()) == report
    assert (tmp / "api" / "evaluation.png").read_bytes()[:4] == b"\x89PNG"
    fitted = [asdict(Thresholds.load(str(tmp / out / THRESHOLDS_FILE))) for out in ("cli", "api")]
    assert fitted[0] == fitted[1] and fitted[0]["weights"] is not None


def test_evaluate_refuses_what_it_cannot_do_before_any_work(model_folder):
    tmp, data = model_folder
    model, data_config = load_model_folder(str(tmp / "model"))
    loader = DataLoader(ImageFiles(str(data), image_transform(data_config)), batch_size=30)
    with pytest.raises(ValueError, match="give val .* and output_dir"):
        evaluate(model, loader, input_size=(3, 32, 32), target_cost=1e6, output_dir=str(tmp / "no-val"))
    with pytest.raises(ValueError, match="target_cost or target_accuracy, not both"):
        evaluate(model, loader, loader, input_size=(3, 32, 32), target_cost=1e6, target_accuracy=50,
                 output_dir=str(tmp / "both"))
    with pytest.raises(TypeError, match=r"unknown protocol options \['sweeps'\]: expected some of .*'sweep'"):
        evaluate(model, loader, input_size=(3, 32, 32), sweeps="ztw", output_dir=str(tmp / "typo"))
    assert not any((tmp / out).exists() for out in ("no-val", "both", "typo"))


def test_a_q_grid_is_a_grid_or_a_known_name():
    from timm_exits.inference import REFERENCE_Q, ExitOutputs

    torch.manual_seed(0)
    outputs = ExitOutputs(torch.randn(3, 40, 4), torch.randint(0, 4, (40,)))
    by_name = evaluation_report(outputs, outputs, [1.0, 2.0, 3.0], q_grid="imta")
    assert by_name["budgeted_protocol"]["q_grid"] == "imta" and len(by_name["budgeted"]) == 40
    assert evaluation_report(outputs, outputs, [1.0, 2.0, 3.0], q_grid=REFERENCE_Q)["budgeted_protocol"]["q_grid"] == \
        "reference"
    with pytest.raises(ValueError, match="q grid must be one of .*'reference'.* got 'IMTA'"):
        evaluation_report(outputs, outputs, [1.0, 2.0, 3.0], q_grid="IMTA")
