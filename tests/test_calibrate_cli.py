"""The command line of learned gates and calibrated exits, on real image files and real model folders:
``timm-exits evaluate --policy gate`` and ``--mie``, and ``timm-exits calibrate`` (last-layer Laplace,
with or without MIE) writing a model folder."""
import json
import os

import pytest
import timm
import torch
from torch.utils.data import DataLoader

import timm_exits  # noqa: F401
from timm_exits.cli import main
from timm_exits.data import image_dataset, split_dataset
from timm_exits.inference import (REFERENCE_Q, EarlyExitExecutor, ExitOutputs, ExitPolicy, Thresholds,
                                  anytime_accuracy, budgeted_curve, collect_outputs)
from timm_exits.inference.calibrated import fit_laplace
from timm_exits.model_folder import load_model_folder, save_model_folder
from timm_exits.models import JEIGatesModel, LaplaceExits, MIEModel
from timm_exits.profile import profile_exits

from helpers import make_image_folder

CLASSES = ["class0", "class1", "class2"]
DATA_CONFIG = dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0, interpolation="bilinear")
QUIET = ["--workers", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """30 PNG files in 3 class folders, a tiny MSDNet's model folder and a jei_gates folder around it."""
    tmp = tmp_path_factory.mktemp("calibrate")
    data = make_image_folder(tmp / "data")
    torch.manual_seed(0)
    net = timm.create_model("msdnet_cifar_5exit", num_classes=3, num_channels=4, growth_rate=2).eval()
    save_model_folder(net, str(tmp / "net"), DATA_CONFIG, label_names=CLASSES)
    gates = JEIGatesModel(net).eval()
    with torch.no_grad():  # gates that tell the samples apart (an untrained gate is near-constant)
        for k, gate in enumerate(gates.gates.linear):
            gate.weight.copy_(torch.tensor([[30.0, 2.0 * k, -8.0, 1.0]]))
            gate.bias.fill_(-12.0 - 2.0 * k)
    save_model_folder(gates, str(tmp / "gates"), DATA_CONFIG, label_names=CLASSES)
    return tmp, data, net, gates


def _split(folder, data, fraction=0.5):
    """(held-out, rest) of the images as ``--val-fraction fraction --seed 0`` splits them, with the
    folder's preprocessing."""
    dataset = image_dataset(str(data), load_model_folder(str(folder))[0])
    return split_dataset(dataset, fraction, 0)


def _loader(dataset):
    return DataLoader(dataset, batch_size=128)  # the command's default batch size


def _gate_probabilities(probs, params):
    """JEI-DNN's gate, re-stated: sigmoid(w . [max p, entropy, margin, entropy of p^2 renormalised] + b), float64."""
    p = probs.double()
    top = p.sort(-1, descending=True).values
    entropy = lambda q: -(q * q.clamp_min(1e-300).log()).sum(-1)  # noqa: E731
    squared = p ** 2 / (p ** 2).sum(-1, keepdim=True)
    features = torch.stack([top[:, 0], entropy(p), top[:, 0] - top[:, 1], entropy(squared)], -1)
    w = torch.tensor(params, dtype=torch.float64)
    return torch.sigmoid(features @ w[:4] + w[4])


def test_policy_gate_runs_the_models_own_gates_as_the_executor_does(setup):
    tmp, data, net, gates = setup
    out = tmp / "gate"
    costs = [c.macs for c in profile_exits(net)]
    code = main(["evaluate", str(tmp / "gates"), "--data-dir", str(data), "--val-fraction", "0.5", "--policy", "gate",
                 "--target-macs", str(costs[2]), "--sweep", "--patience-sweep", "--latency", "--latency-images", "15",
                 "--latency-repeats", "1", "--output", str(out), *QUIET])
    assert code == 0
    report = json.loads((out / "evaluation.json").read_text())
    params = gates.gates.params()
    assert report["exit_policy"] == ExitPolicy("gate", params=params).as_dict()
    assert report["threshold_sweep"]["exit_policy"]["score"] == "gate" and len(report["patience_sweep"]["points"]) == 5
    thresholds = Thresholds.load(str(out / "thresholds.json"), model="jei_gates", num_exits=5)
    assert thresholds.exit_policy == ExitPolicy("gate", params=params) and thresholds.predictor == "exits"
    # the test split's exits: the gates re-stated here on the network's probabilities
    _, test = _split(tmp / "gates", data)
    images = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        probs = [z.softmax(-1) for z in net.forward_exits(images)]
    scores = torch.stack([_gate_probabilities(probs[k], params[k]) for k in range(4)])

    def exits_at(thresholds):
        accepted = scores >= torch.tensor(thresholds[:4], dtype=torch.float64).view(-1, 1)
        return torch.where(accepted.any(0), accepted.int().argmax(0), 4)

    def counts(exits):
        return torch.bincount(exits, minlength=5).tolist()

    def counted(fractions):  # a report's exit fractions as numbers of the test images
        return [round(f * len(test)) for f in fractions]

    points = report["threshold_sweep"]["points"]
    assert [counted(p["exit_fractions"]) for p in points] == [counts(exits_at([p["threshold"]] * 5)) for p in points]
    assert counted(report["latency"]["exit_fractions"]) == counts(exits_at(thresholds.thresholds))
    # the Python executor with the folder's gates takes the same exits, where they differ between samples
    mixed = next(p["threshold"] for p in points if sum(f > 0 for f in p["exit_fractions"]) > 1)
    model = load_model_folder(str(tmp / "gates"))[0]
    executor = EarlyExitExecutor(model, [mixed] * 5, ExitPolicy("gate", params=model.policy_params("gate")))
    assert executor(images).exits.tolist() == exits_at([mixed] * 5).tolist()


@pytest.mark.parametrize("source, flags, message", [
    ("net", ["--policy", "gate"], "--policy gate evaluates the learned exit gates a jei_gates model carries; "
                                  "msdnet_cifar_5exit has none"),
    ("gates", ["--policy", "gate", "--fallback", "most_confident"], "has no gate at the last exit"),
    ("gates", ["--policy", "gate", "--mie"], "--mie and --product-anytime change those answers"),
    ("gates", ["--mie", "--product-anytime"], "--mie or --product-anytime"),
])
def test_evaluate_refuses_what_the_gates_and_mie_cannot_do_and_writes_nothing(setup, tmp_path, capsys, source,
                                                                              flags, message):
    tmp, data, _, _ = setup
    code = main(["evaluate", str(tmp / source), "--data-dir", str(data), "--output", str(tmp_path / "o"), *flags,
                 *QUIET])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_mie_evaluates_the_cost_weighted_running_ensemble(setup):
    tmp, data, net, _ = setup
    out = tmp / "mie"
    costs = [c.macs for c in profile_exits(net)]
    assert main(["evaluate", str(tmp / "net"), "--data-dir", str(data), "--val-fraction", "0.5", "--mie",
                 "--target-macs", str(costs[2]), "--output", str(out), *QUIET]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["predictor"] == "mie" and [e["cost"] for e in report["exits"]] == costs
    assert Thresholds.load(str(out / "thresholds.json")).predictor == "mie"
    # MIE written out from the network's own exits: p_k = sum_{j<=k} c_j p_j / sum_{j<=k} c_j, c_j = cost_j / cost_K
    val, test = (collect_outputs(net, _loader(part), progress=False) for part in _split(tmp / "net", data))
    c = torch.tensor(costs, dtype=torch.float64).view(-1, 1, 1) / costs[-1]
    mie = [ExitOutputs.from_probs(((c * o.probs.double()).cumsum(0) / c.cumsum(0)).float(), o.labels)
           for o in (val, test)]
    assert [e["top1"] for e in report["exits"]] == pytest.approx(anytime_accuracy(mie[1])["top1"])
    budgeted = budgeted_curve(*mie, costs, REFERENCE_Q)
    assert [p["accuracy"] for p in report["budgeted"]] == pytest.approx([p.accuracy for p in budgeted])
    assert [p["cost"] for p in report["budgeted"]] == pytest.approx([p.cost for p in budgeted])


@pytest.mark.parametrize("with_mie", [False, True])
def test_calibrate_writes_the_folder_of_fit_laplace_on_the_same_images(setup, tmp_path, with_mie):
    tmp, data, net, _ = setup
    out = tmp_path / "calibrated"
    assert main(["calibrate", str(tmp / "net"), "--train-dir", str(data), "--val-fraction", "0.3", "--prior-vars", "1",
                 "2", "--temperatures", "0.5", "1", "--num-samples", "7", "--output", str(out), *QUIET,
                 *(["--mie"] if with_mie else [])]) == 0
    # the same in Python: factors on the rest of the images, settings chosen on the held-out 30 %
    val, train = _split(tmp / "net", data, 0.3)
    weights = [c.macs / profile_exits(net)[-1].macs for c in profile_exits(net)]
    laplace = fit_laplace(net, _loader(train), _loader(val), [1.0, 2.0], [0.5, 1.0], num_samples=7, progress=False,
                          mie_costs=weights if with_mie else None)
    expected = MIEModel(laplace, weights) if with_mie else laplace
    rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(rebuilt) is type(expected) and (type(rebuilt.model) is LaplaceExits) == with_mie
    assert (rebuilt.model if with_mie else rebuilt).settings == laplace.settings
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == CLASSES and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["timm_exits"]["calibrated"]["predictor"] == ("mie+laplace" if with_mie else "laplace")
    images = torch.stack([train[i][0] for i in range(6)])
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(expected.forward_exits(images), rebuilt.forward_exits(images)))
    # and the command evaluates the folder with its predictor
    assert main(["evaluate", str(out), "--data-dir", str(data), "--output", str(tmp_path / "e"), *QUIET]) == 0
    report = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert report["predictor"] == ("mie+laplace" if with_mie else "laplace") and report["model"] == rebuilt.pretrained_cfg[
        "architecture"]


def test_calibrate_refuses_bad_input_and_writes_nothing(setup, tmp_path, capsys):
    tmp, data, _, _ = setup

    def refused(*argv):
        code = main(["calibrate", *argv, *QUIET])
        return code == 2 and capsys.readouterr().err

    (tmp_path / "empty" / "class0").mkdir(parents=True)
    assert "holds no images in class folders" in refused(str(tmp / "net"), "--train-dir", str(tmp_path / "empty"),
                                                         "--output", str(tmp_path / "a"))
    assert "wrap the network itself" in refused(str(tmp / "gates"), "--train-dir", str(data),
                                                "--output", str(tmp_path / "b"))
    assert "need a validation loader to choose among them" in refused(str(tmp / "net"), "--train-dir", str(data),
                                                                      "--prior-vars", "1", "2",
                                                                      "--output", str(tmp_path / "c"))
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # no folder, no temporary leftovers
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert "exists and is not empty" in refused(str(tmp / "net"), "--train-dir", str(data),
                                                "--output", str(tmp_path / "full"))
    assert os.listdir(tmp_path / "full") == ["notes.txt"]
