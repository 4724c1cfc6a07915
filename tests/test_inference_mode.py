"""Under ``torch.inference_mode()`` the learned gates, MIE, last-layer Laplace and Laplace + MIE answer
as under ``torch.no_grad()``: the early-exit executor, the cached evaluation (and ``evaluate`` with
its thresholds file) and a model folder's model, rebuilt inside inference mode."""
import pytest
import timm
import torch

import timm_exits  # noqa: F401
from timm_exits.inference import EarlyExitExecutor, ExitPolicy, Thresholds, collect_outputs, evaluate, resolve_policy
from timm_exits.inference.calibrated import fit_laplace, mie_model
from timm_exits.model_folder import save_model_folder
from timm_exits.models import JEIGatesModel, MIEModel

DATA_CONFIG = dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0, interpolation="bilinear")


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]


def _model(kind):
    """A tiny network inside the predictor ``kind``, and the policy it is evaluated with."""
    torch.manual_seed(0)
    net = timm.create_model("msdnet_cifar_5exit", num_classes=3, num_channels=4, growth_rate=2).eval()
    if kind == "gate":
        model = JEIGatesModel(net).eval()
        return model, resolve_policy("gate", model)
    if kind == "mie":
        return mie_model(net), ExitPolicy("maxprob")
    laplace = fit_laplace(net, _batches(1), _batches(2), prior_vars=[1.0, 2.0], temperatures=[0.5, 1.0],
                          num_samples=5, progress=False)
    return (laplace if kind == "laplace" else MIEModel(laplace, mie_model(net).weights)), ExitPolicy("maxprob")


def _run(model, policy, folder):
    """The executor's answers, the cached outputs and evaluate()'s report and thresholds file."""
    images = _batches(3)[0][0]
    thresholds = [0.6, 0.6, 0.5, 0.5, 0.0] if policy.score == "gate" else [0.45, 0.45, 0.4, 0.4, 0.0]
    result = EarlyExitExecutor(model, thresholds, policy)(images)
    outputs = collect_outputs(model, _batches(4), progress=False)
    report = evaluate(model, _batches(4), _batches(5), input_size=(3, 32, 32), policy=policy,
                      target_cost=8e6, output_dir=str(folder))
    return result, outputs, report, Thresholds.load(str(folder / "thresholds.json"))


@pytest.mark.parametrize("kind", ["gate", "mie", "laplace", "mie+laplace"])
def test_inference_mode_answers_as_no_grad(kind, tmp_path):
    model, policy = _model(kind)
    save_model_folder(model, str(tmp_path / "folder"), DATA_CONFIG)
    with torch.no_grad():
        expected = _run(model, policy, tmp_path / "no_grad")
    images = _batches(3)[0][0]
    with torch.inference_mode():
        rebuilt = timm.create_model(f"local-dir:{tmp_path / 'folder'}", pretrained=True).eval()
        got = _run(rebuilt, resolve_policy("gate", rebuilt) if kind == "gate" else policy, tmp_path / "inference")
        last = rebuilt(images)
        fitted = EarlyExitExecutor(rebuilt, got[3])(images)
    assert last.is_inference() and got[1].logits.is_inference()
    assert all(torch.equal(a, b) for a, b in zip(vars(expected[0]).values(), vars(got[0]).values()) if a is not None)
    assert torch.equal(expected[1].logits, got[1].logits)
    assert expected[2] == got[2]
    assert expected[3] == got[3] and got[3].predictor == kind.replace("gate", "exits")
    # the model rebuilt in inference mode runs outside it too (no in-place update of its inference tensors)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), last)
        assert torch.equal(EarlyExitExecutor(rebuilt, got[3])(images).exits, fitted.exits)
