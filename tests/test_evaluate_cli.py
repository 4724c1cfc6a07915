"""``timm-exits evaluate`` on a real image folder with a real checkpoint, as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.utils import reparameterize_model

import timm_exits  # noqa: F401
from timm_exits.cli import main
from timm_exits.data import image_dataset
from timm_exits.inference import (REFERENCE_Q, ExitOutputs, ExitPolicy, Thresholds, anytime_accuracy, budgeted_curve,
                                  collect_outputs, curve_calibration, patience_sweep, product_anytime, threshold_sweep)
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


def _split_outputs(model, data):
    """The validation and test outputs of ``--val-fraction 0.5 --seed 0``, collected here."""
    dataset = image_dataset(str(data), model)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0)).tolist()
    return [collect_outputs(model, torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, part), batch_size=8),
                            progress=False) for part in (order[:15], order[15:])]


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
    _, test = _split_outputs(model, data)
    assert [e["top1"] for e in report["exits"]] == pytest.approx(anytime_accuracy(test)["top1"])
    thresholds = Thresholds.load(str(out / "thresholds.json"), model="msdnet_cifar_5exit", num_exits=5)
    assert thresholds.costs == costs and "validation" in thresholds.note
    assert thresholds.input_size == [3, 32, 32]  # the size the costs are for
    assert (thresholds.fallback, thresholds.strict) == ("last", False)
    # the protocol variant is recorded; the protocols not asked for are absent
    assert report["exit_policy"] == {"score": "maxprob", "fallback": "last", "strict": False}
    assert report["budgeted_protocol"] == {"q_grid": "reference", "q": REFERENCE_Q, "envelope": False, "fit_samples": 15,
                                           "fit_split": "--val-fraction 0.5 of --data-dir (seed 0)"}
    assert not {"threshold_sweep", "patience_sweep", "calibration", "latency"} & set(report)
    assert report["fused"] is False


@pytest.mark.slow
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


def test_evaluate_runs_the_protocols_it_is_asked_for(setup):
    tmp, data, model, checkpoint = setup
    out = tmp / "protocols"
    run = _run("msdnet_cifar_5exit", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--val-fraction", "0.5",
               "--output", str(out), "--workers", "0", "--fallback", "most_confident", "--strict", "--envelope",
               "--sweep", "--patience-sweep", "--cost-fractions", "0.5", "1.0", "--calibration", "--target-macs", "30e6",
               "--latency", "--latency-images", "4", "--latency-repeats", "1")
    assert run.returncode == 0, run.stderr
    assert "threshold sweep (100 points)" in run.stdout and "patience sweep (5 points)" in run.stdout
    assert "calibration per exit" in run.stdout and "early-exit latency on cpu" in run.stdout
    assert "budgeted (maxprob, fallback most_confident, strict >)" in run.stdout
    report = json.loads((out / "evaluation.json").read_text())
    policy = ExitPolicy("maxprob", "most_confident", strict=True)
    assert report["exit_policy"] == policy.as_dict() and report["budgeted_protocol"]["envelope"]
    val, test = _split_outputs(model, data)
    costs = [e["cost"] for e in report["exits"]]
    budgeted = budgeted_curve(val, test, costs, REFERENCE_Q, policy, envelope=True)
    assert [p["accuracy"] for p in report["budgeted"]] == pytest.approx([p.accuracy for p in budgeted])
    sweep = threshold_sweep(test, costs, policy=policy)
    assert report["threshold_sweep"]["grid"] == "ztw" and report["threshold_sweep"]["exit_policy"] == policy.as_dict()
    assert [p["cost"] for p in report["threshold_sweep"]["points"]] == pytest.approx([p.cost for p in sweep])
    table = report["threshold_sweep"]["cost_table"]
    assert table["fractions"] == [0.5, 1.0] and table["full_cost"] == costs[-1]
    assert table["accuracy"][1] == pytest.approx(max(p.accuracy for p in sweep))
    patience = patience_sweep(test, costs, "most_confident")
    assert [p["accuracy"] for p in report["patience_sweep"]["points"]] == pytest.approx([p.accuracy for p in patience])
    calibration = report["calibration"]
    assert calibration["ece_bins"] == 15 and len(calibration["exits"]) == 5 and len(calibration["threshold_sweep"]) == 100
    assert calibration["budgeted"][3] == pytest.approx(curve_calibration(test, [budgeted[3].thresholds], policy)[0])
    latency = report["latency"]
    assert latency["images"] == 4 and latency["repeats"] == 1 and latency["batch1_p50_ms"] > 0
    thresholds = Thresholds.load(str(out / "thresholds.json"))
    assert thresholds.exit_policy == policy


def test_evaluate_scores_product_anytime_online(setup):
    tmp, data, model, checkpoint = setup
    out = tmp / "product"
    run = _run("msdnet_cifar_5exit", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--val-fraction", "0.5",
               "--output", str(out), "--workers", "0", "--product-anytime", "--calibration", "--target-macs", "30e6",
               "--latency", "--latency-images", "4", "--latency-repeats", "1")
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "evaluation.json").read_text())
    assert report["predictor"] == "product_anytime"
    val, test = _split_outputs(model, data)  # the exits' own logits; product anytime computed from them here
    answers = [ExitOutputs.from_probs(product_anytime(o), o.labels) for o in (val, test)]
    assert [e["top1"] for e in report["exits"]] == pytest.approx(anytime_accuracy(answers[1])["top1"])
    budgeted = budgeted_curve(*answers, [e["cost"] for e in report["exits"]], REFERENCE_Q)
    assert [p["accuracy"] for p in report["budgeted"]] == pytest.approx([p.accuracy for p in budgeted])
    assert Thresholds.load(str(out / "thresholds.json")).predictor == "product_anytime"
    assert report["latency"]["images"] == 4


def test_evaluate_runs_the_fused_model_and_keeps_the_costs_of_the_model_as_built(setup):
    """--fuse: outputs and latency from timm.utils.reparameterize_model's copy; the costs are profiled on
    the model as built (under the MSDNet reference counter the fused operators count differently)."""
    tmp, data, model, checkpoint = setup
    out = tmp / "fused"
    run = _run("msdnet_cifar_5exit", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--val-fraction", "0.5",
               "--output", str(out), "--workers", "0", "--fuse", "--convention", "msdnet", "--target-macs", "30e6",
               "--latency", "--latency-images", "4", "--latency-repeats", "1")
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "evaluation.json").read_text())
    fused = reparameterize_model(model)
    costs = [c.macs for c in profile_exits(model, convention="msdnet")]
    assert [c.macs for c in profile_exits(fused, convention="msdnet")] != costs
    assert report["fused"] is True and [e["cost"] for e in report["exits"]] == costs
    assert Thresholds.load(str(out / "thresholds.json")).costs == costs
    _, test = _split_outputs(fused, data)
    assert [e["top1"] for e in report["exits"]] == pytest.approx(anytime_accuracy(test)["top1"])
    assert report["latency"]["images"] == 4


@pytest.mark.parametrize("flags, message", [
    (["--fallback", "first"], "argument --fallback: invalid choice: 'first'"),
    (["--policy", "confidence"], "argument --policy: invalid choice: 'confidence'"),
    (["--sweep", "linear"], "argument --sweep: invalid choice: 'linear'"),
    (["--sweep", "--policy", "patience"], "--sweep needs a probability score"),
    (["--envelope"], "--envelope shapes the budgeted curve, which needs a validation split"),
    (["--cost-fractions", "0.5", "0"], "--cost-fractions must be positive fractions of the full cost"),
    (["--latency"], "--latency times the early-exit executor with the thresholds this run fits"),
    (["--latency", "--target-macs", "1e6", "--latency-images", "0"], "--latency-images, --latency-repeats and"),
])
def test_evaluate_refuses_bad_protocol_options(setup, tmp_path, capsys, flags, message):
    _, data, _, checkpoint = setup
    argv = ["evaluate", "msdnet_cifar_5exit", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--workers", "0",
            "--output", str(tmp_path / "o"), *flags]
    try:  # in process (the subprocess runs above show the same exit path): argparse exits, ours returns 2
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_the_commands_score_and_fallback_names_are_the_inference_modules():
    """cli.py names them without importing torch (``--help`` imports nothing heavy): kept equal here."""
    from timm_exits import cli
    from timm_exits.inference.policies import FALLBACKS, LEARNED_SCORES, SCORES

    assert (cli.SCORES, cli.LEARNED_SCORES, cli.FALLBACKS) == (SCORES, LEARNED_SCORES, FALLBACKS)
