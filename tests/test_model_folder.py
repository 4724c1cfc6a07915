"""A trained model as a timm model folder: saved (whole or not at all, strict JSON, its class
names), rebuilt by timm (``local-dir:``) and by ``load_model_folder`` (refusing unusable
preprocessing), evaluated by ``timm-exits evaluate`` with its own preprocessing and classes (never
over an earlier evaluation), converted from a real mmengine checkpoint; thresholds that know their
input size and weights."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import resolve_data_config
from torchvision import transforms

import timm_exits  # noqa: F401
from timm_exits import cli
from timm_exits.inference import EarlyExitExecutor, Thresholds, weights_sha256
from timm_exits.model_folder import load_model_folder, save_model_folder
from timm_exits.profile import CONVENTIONS, profile_exits
from timm_exits.files import write_weights
from timm_exits.models.boostnet import BoostedExits
from timm_exits.models.imta import IMTAModel
from timm_exits.models.product_anytime import ProductAnytimeModel
from timm_exits.models.ztw import ZTWModel

from helpers import randomise_norms
from helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
GREY = dict(input_size=(1, 32, 32), mean=(0.4,), std=(0.3,), crop_pct=1.0, interpolation="bilinear")
CIFAR = dict(input_size=(3, 32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_pct=1.0, interpolation="bilinear")
FAMILIES = {
    "msdnet_cifar_5exit": (dict(in_chans=1, num_classes=3, num_channels=4, growth_rate=2), GREY),
    "resnet18_exits": (dict(num_classes=3), CIFAR),
    "resnet18_adn": (dict(num_classes=3), CIFAR),
}


def _outputs(model, x):
    with torch.no_grad():
        return model.forward_exits(x) if hasattr(model, "forward_exits") else [model(x)]


def _saved(tmp_path, name, seed=0):
    kwargs, data_config = FAMILIES[name]
    torch.manual_seed(seed)
    model = randomise_norms(timm.create_model(name, **kwargs)).eval()
    folder = tmp_path / name
    save_model_folder(model, str(folder), data_config, technique={"loss": "ce"}, phase="train")
    return model, folder


def _grey_folder(root: Path, classes=3, per_class=4, size=32) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.normal(60 + 60 * c, 40, (size, size)).clip(0, 255).astype("uint8")
            Image.fromarray(img, "L").save(root / f"class{c}" / f"{i}.png")
    return root


def _evaluate(capsys, *args):
    code = cli.main(["evaluate", *map(str, args), "--workers", "0"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", list(FAMILIES))
def test_timm_rebuilds_every_family_from_its_folder(tmp_path, name):
    model, folder = _saved(tmp_path, name)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == name and config["timm_exits"] == {"technique": {"loss": "ce"}, "phase": "train"}
    rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, *FAMILIES[name][1]["input_size"])
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model, x), _outputs(rebuilt, x)))
    data = resolve_data_config({}, model=rebuilt)
    saved = FAMILIES[name][1]
    assert data["input_size"] == saved["input_size"]
    assert tuple(data["mean"]) == saved["mean"] and tuple(data["std"]) == saved["std"]
    loaded, loaded_data = load_model_folder(str(folder))
    assert not loaded.training and loaded_data == data
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model, x), _outputs(loaded, x)))


def test_load_model_folder_takes_a_weights_file_and_an_imta_model(tmp_path):
    model, folder = _saved(tmp_path, "msdnet_cifar_5exit")
    (folder / "model.safetensors").rename(folder / "best.safetensors")
    loaded, _ = load_model_folder(str(folder / "best.safetensors"))
    x = torch.randn(2, 1, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model, x), _outputs(loaded, x)))
    phase2 = randomise_norms(IMTAModel(model, isc="detach"), seed=1).eval()
    save_model_folder(phase2, str(tmp_path / "phase2"), GREY)
    loaded, data = load_model_folder(str(tmp_path / "phase2"))
    assert isinstance(loaded, IMTAModel) and loaded.isc_mode == "detach" and data["input_size"] == (1, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(phase2, x), _outputs(loaded, x)))


@pytest.mark.parametrize("wrap", ["boostnet", "ztw"])
def test_a_boostnet_or_ztw_model_folder_loads_back(tmp_path, wrap):
    """Models that wrap a network (BoostNet's boosted exits, ZTW's cascade and ensembles) are saved
    with the network's config and their settings, and load back with the same outputs."""
    model, _ = _saved(tmp_path, "msdnet_cifar_5exit")
    torch.manual_seed(1)
    wrapped = (BoostedExits(model, reweight=[0.3, 0.4, 0.5, 0.6, 0.7]) if wrap == "boostnet"
               else ZTWModel(model, detach=False, layer_norm=False))
    for p in wrapped.parameters():  # fresh ZTW ensembles are near-identities: move every weight
        p.data.add_(0.1 * torch.randn_like(p))
    save_model_folder(wrapped.eval(), str(tmp_path / wrap), GREY)
    loaded, _ = load_model_folder(str(tmp_path / wrap))
    assert type(loaded) is type(wrapped)
    if wrap == "boostnet":
        assert loaded.reweight == [0.3, 0.4, 0.5, 0.6, 0.7]
    else:
        assert (loaded.detach, loaded.layer_norm, loaded.use_ensembles) == (False, False, True)
    x = torch.randn(2, 1, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(wrapped, x), _outputs(loaded, x)))


WRAPPERS = {
    "imta": lambda net: IMTAModel(net, isc="detach"),
    "boostnet": lambda net: BoostedExits(net, reweight=[0.3, 0.4, 0.5, 0.6, 0.7]),
    "ztw": lambda net: ZTWModel(net, detach=False, layer_norm=False).train_part("ensembles"),
    "product_anytime": lambda net: ProductAnytimeModel(net, weights=[0.5, 1, 1, 2, 0]),
}


def _wrapped(tmp_path, name):
    network, _ = _saved(tmp_path, "msdnet_cifar_5exit")
    torch.manual_seed(1)
    wrapped = WRAPPERS[name](network)
    for p in wrapped.parameters():  # fresh heads and ensembles are near-identities: move every weight
        p.data.add_(0.1 * torch.randn_like(p))
    return randomise_norms(wrapped, seed=2).eval()


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_timm_rebuilds_a_wrapper_from_its_folder(tmp_path, name):
    """IMTA phase II, BoostNet, ZTW and product anytime are timm architectures of their own: the folder
    names the wrapper, the network it wraps and the settings, and timm's local-dir: rebuilds it."""
    wrapped = _wrapped(tmp_path, name)
    save_model_folder(wrapped, str(tmp_path / name), GREY)
    config = json.loads((tmp_path / name / "config.json").read_text())
    assert config["architecture"] == name and config["model_args"]["model"] == "msdnet_cifar_5exit"
    assert config["model_args"]["model_args"]["num_channels"] == 4 and config["pretrained_cfg"]["mean"] == [0.4]
    rebuilt = timm.create_model(f"local-dir:{tmp_path / name}", pretrained=True).eval()
    assert type(rebuilt) is type(wrapped) and rebuilt.pretrained_cfg["architecture"] == name
    if name == "ztw":
        assert rebuilt.use_ensembles and not rebuilt.detach
    x = torch.randn(2, 1, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(wrapped, x), _outputs(rebuilt, x)))
    assert resolve_data_config({}, model=rebuilt)["input_size"] == (1, 32, 32)
    built = timm.create_model(name, **{k: v for k, v in config["model_args"].items()})  # the same, by name
    assert built.state_dict().keys() == wrapped.state_dict().keys()


def test_an_earlier_versions_wrapper_folder_still_loads(tmp_path):
    """Before wrappers were timm architectures, a folder held the network's architecture and the
    wrapper's settings in the timm_exits section."""
    for name, settings in (("imta", {"isc": "detach", "freeze_bn_stats": False}),
                           ("boostnet", {"reweight": [0.3, 0.4, 0.5, 0.6, 0.7]}),
                           ("ztw", {"detach": False, "layer_norm": False, "ensembles": True})):
        wrapped = _wrapped(tmp_path, name)
        _, folder = _saved(tmp_path, "msdnet_cifar_5exit")  # the network's config.json, as it was written
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "timm_exits": {name: settings}}))
        write_weights(wrapped.state_dict(), str(folder / "model.safetensors"), metadata={"format": "pt"})
        loaded, data = load_model_folder(str(folder))
        assert type(loaded) is type(wrapped) and data["input_size"] == (1, 32, 32)
        x = torch.randn(2, 1, 32, 32)
        assert all(torch.equal(a, b) for a, b in zip(_outputs(wrapped, x), _outputs(loaded, x)))


def test_a_wrapper_of_a_network_timm_did_not_make_is_refused(tmp_path):
    network = timm.create_model("msdnet_cifar_5exit", num_classes=3, num_channels=4, growth_rate=2)
    del network.pretrained_cfg
    with pytest.raises(ValueError, match="BoostedExits was not made by timm.create_model"):
        save_model_folder(BoostedExits(network), str(tmp_path / "folder"))
    assert not (tmp_path / "folder").exists()
    with pytest.raises(ValueError, match="boostnet wraps a registered multi-exit timm model"):
        timm.create_model("boostnet", model="nothing_like_it")


def test_a_model_built_by_add_exits_is_refused_rather_than_saved_as_its_backbone(tmp_path):
    model = timm_exits.add_exits("resnet18", exits=[0, 1], num_classes=3)
    with pytest.raises(ValueError, match=r"built by add_exits\('resnet18'.*timm.create_model"):
        save_model_folder(model, str(tmp_path / "exits"))
    assert not (tmp_path / "exits").exists()


def test_load_model_folder_refuses_what_does_not_fit(tmp_path):
    _, folder = _saved(tmp_path, "msdnet_cifar_5exit")
    with pytest.raises(ValueError, match="no config.json in it"):
        load_model_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model_folder(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"(?s)does not fit msdnet_cifar_5exit .*size mismatch"):
        load_model_folder(str(folder), num_classes=7)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architecture": "msdnet_nonexistent"}))
    with pytest.raises(ValueError, match="'msdnet_nonexistent', which is not a registered timm model"):
        load_model_folder(str(folder))


def test_grey_model_evaluated_from_its_folder_as_in_memory(tmp_path, capsys):
    """The main job's kind of model: 1-channel MSDNet on grey PNGs, evaluated with no flags."""
    model, folder = _saved(tmp_path, "msdnet_cifar_5exit")
    data = _grey_folder(tmp_path / "data")
    code, out, err = _evaluate(capsys, folder, "--data-dir", data, "--output", tmp_path / "out")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["model"] == "msdnet_cifar_5exit" and report["data_config"]["input_size"] == [1, 32, 32]
    # by hand: the same PNGs, grey, normalised with the folder's mean / std
    norm = transforms.Compose([transforms.ToTensor(), transforms.Normalize(GREY["mean"], GREY["std"])])
    files = sorted(data.glob("*/*.png"))
    x = torch.stack([norm(Image.open(f).convert("L")) for f in files])
    labels = torch.tensor([int(f.parent.name[-1]) for f in files])
    expected = [100 * (z.argmax(-1) == labels).double().mean().item() for z in _outputs(model, x)]
    assert [e["top1"] for e in report["exits"]] == pytest.approx(expected)
    assert [e["cost"] for e in report["exits"]] == [c.macs for c in profile_exits(model, (1, 32, 32))]
    # before: a model name with --checkpoint could not say "1 channel" and evaluated 3-channel images
    code, _, err = _evaluate(capsys, "msdnet_cifar_5exit", "--checkpoint", folder / "model.safetensors",
                             "--data-dir", data, "--model-kwargs", "num_channels=4", "growth_rate=2",
                             "--output", tmp_path / "named")
    assert code == 2 and "does not fit" in err
    code, _, err = _evaluate(capsys, "msdnet_cifar_5exit", "--checkpoint", folder / "model.safetensors",
                             "--data-dir", data, "--model-kwargs", "num_channels=4", "growth_rate=2",
                             "--input-size", 1, 32, 32, "--mean", 0.4, "--std", 0.3, "--output", tmp_path / "named")
    assert code == 0, err
    named = json.loads((tmp_path / "named" / "evaluation.json").read_text())
    assert [e["top1"] for e in named["exits"]] == pytest.approx(expected)


@pytest.fixture
def cifar_run(tmp_path):
    model, folder = _saved(tmp_path, "resnet18_exits")
    return model, folder, make_image_folder(tmp_path / "data", per_class=4, size=32)


def test_cifar_folder_is_evaluated_at_its_own_size_and_flags_override(tmp_path, capsys, cifar_run):
    model, folder, data = cifar_run
    code, _, err = _evaluate(capsys, folder, "--data-dir", data, "--output", tmp_path / "own")
    assert code == 0, err
    report = json.loads((tmp_path / "own" / "evaluation.json").read_text())
    at32 = [c.macs for c in profile_exits(model, (3, 32, 32))]
    assert [e["cost"] for e in report["exits"]] == at32 != [c.macs for c in profile_exits(model, (3, 224, 224))]
    assert report["data_config"]["mean"] == list(CIFAR["mean"])
    code, _, err = _evaluate(capsys, folder / "model.safetensors", "--data-dir", data, "--output", tmp_path / "flags",
                             "--input-size", 3, 48, 48, "--mean", 0.1, 0.2, 0.3, "--std", 0.5, 0.5, 0.5,
                             "--crop-pct", 0.875, "--interpolation", "bicubic")
    assert code == 0, err
    flags = json.loads((tmp_path / "flags" / "evaluation.json").read_text())
    assert flags["data_config"] == {"input_size": [3, 48, 48], "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5],
                                    "crop_pct": 0.875, "interpolation": "bicubic", "crop_mode": "center"}
    assert [e["cost"] for e in flags["exits"]] == [c.macs for c in profile_exits(model, (3, 48, 48))]


def test_class_count_mismatch_is_refused(tmp_path, capsys, cifar_run):
    _, _, data = cifar_run  # 3 class folders
    other = timm.create_model("resnet18_exits", num_classes=7)
    save_model_folder(other, str(tmp_path / "seven"), CIFAR)
    code, _, err = _evaluate(capsys, tmp_path / "seven", "--data-dir", data)
    assert code == 2 and "the model has 7 classes but --data-dir" in err and "3 class folders" in err
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "seven.safetensors")
    code, _, err = _evaluate(capsys, "resnet18_exits", "--checkpoint", tmp_path / "seven.safetensors",
                             "--model-kwargs", "num_classes=7", "--data-dir", data)
    assert code == 2 and "the model has 7 classes" in err


def test_thresholds_record_and_enforce_their_input_size_and_weights(tmp_path, capsys, cifar_run):
    model, folder, data = cifar_run
    code, _, err = _evaluate(capsys, folder, "--data-dir", data, "--val-fraction", "0.5", "--target-macs", "1e12",
                             "--output", tmp_path / "out")
    assert code == 0, err
    path = tmp_path / "out" / "thresholds.json"
    thresholds = Thresholds.load(str(path), model="resnet18_exits", num_exits=4)
    assert thresholds.input_size == [3, 32, 32]
    executor = EarlyExitExecutor(model, thresholds)
    assert executor(torch.randn(2, 3, 32, 32)).costs.tolist() == pytest.approx(
        [thresholds.costs[e] for e in executor(torch.randn(2, 3, 32, 32)).exits.tolist()])
    with pytest.raises(ValueError, match=r"measured on \(3, 32, 32\) .* got a batch of \(3, 64, 64\)"):
        executor(torch.randn(2, 3, 64, 64))
    assert thresholds.weights == weights_sha256(model)  # the weights they were fitted on, not just the architecture
    other, _ = _saved(tmp_path / "other", "resnet18_exits", seed=1)
    with pytest.raises(ValueError, match=r"fitted on other weights .* even if the architecture is the same"):
        EarlyExitExecutor(other, thresholds)
    old = json.loads(path.read_text())
    del old["input_size"]  # a file written before the input size was recorded
    path.write_text(json.dumps(old))
    assert Thresholds.load(str(path)).input_size is None
    assert EarlyExitExecutor(model, Thresholds.load(str(path)))(torch.randn(2, 3, 64, 64)).preds.shape == (2,)
    with pytest.raises(ValueError, match="input_size must be"):
        Thresholds("m", 2, "maxprob", [0.5, 0.0], input_size=[32, 32])


def _mmengine_run(tmp_path, data, technique=None):
    """A real (one iteration) mmengine run of MultiExitClassifier from a config, as recipes/mmengine do."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    import timm_exits.integrations.mmengine  # noqa: F401  (registers MultiExitClassifier)

    loader = dict(dataset=dict(type="ImageFolderDataset", root=str(data), data_config=CIFAR),
                  sampler=dict(type="DefaultSampler", shuffle=False), batch_size=12, num_workers=0,
                  collate_fn=dict(type="default_collate"))
    cfg = Config(dict(
        default_scope="mmengine", work_dir=str(tmp_path / "work"), randomness=dict(seed=0),
        model=dict(type="MultiExitClassifier", model="msdnet_cifar_5exit",
                   model_kwargs=dict(num_classes=3, num_channels=4, growth_rate=2),
                   technique=technique or dict(type="CrossEntropy")),
        train_dataloader=loader, optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1)),
        train_cfg=dict(by_epoch=True, max_epochs=1), default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1))))
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner, tmp_path / "work" / "epoch_1.pth"


def test_mmengine_checkpoint_converts_to_a_model_folder(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=4, size=32)
    runner, checkpoint = _mmengine_run(tmp_path, data)
    trained = runner.model.model.eval()
    code = cli.main(["convert", str(checkpoint), str(tmp_path / "folder")])
    assert code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["model_args"]["num_channels"] == 4 and config["pretrained_cfg"]["mean"] == list(CIFAR["mean"])
    assert config["timm_exits"]["epoch"] == 1 and config["timm_exits"]["mmengine_model"]["model"] == "msdnet_cifar_5exit"
    model = timm.create_model(f"local-dir:{tmp_path / 'folder'}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(trained, x), _outputs(model, x)))
    # evaluating the folder and the checkpoint itself give the same numbers
    capsys.readouterr()
    for source, out in ((tmp_path / "folder", "from_folder"), (checkpoint, "from_checkpoint")):
        code, _, err = _evaluate(capsys, source, "--data-dir", data, "--output", tmp_path / out)
        assert code == 0, err
    a, b = (json.loads((tmp_path / o / "evaluation.json").read_text()) for o in ("from_folder", "from_checkpoint"))
    assert a["exits"] == b["exits"] and a["data_config"] == b["data_config"]


@pytest.mark.parametrize("technique", [dict(type="BoostNet", reweight=0.3),
                                       dict(type="ZTW", train="joint", detach=False)],
                         ids=["boostnet", "ztw"])
def test_an_mmengine_checkpoint_of_a_wrapper_model_converts(tmp_path, capsys, technique):
    """BoostNet's and ZTW's networks are wrapped when read back from an mmengine checkpoint, with the
    run's settings: the converted folder gives the trained model's outputs."""
    data = make_image_folder(tmp_path / "data", per_class=4, size=32)
    runner, checkpoint = _mmengine_run(tmp_path, data, technique)
    trained = runner.model.model.eval()
    code = cli.main(["convert", str(checkpoint), str(tmp_path / "folder")])
    assert code == 0, capsys.readouterr().err
    loaded, _ = load_model_folder(str(tmp_path / "folder"))
    assert type(loaded) is type(trained)
    x = torch.randn(3, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(trained, x), _outputs(loaded, x)))


def test_convert_needs_a_model_name_without_a_stored_config(tmp_path, capsys):
    """A run built without a config file stores none (meta['cfg'] is empty): --model is required."""
    from helpers import MM_TINY_MSDNET, mm_runner

    mm_runner(tmp_path, MM_TINY_MSDNET, iters=2).train()
    checkpoint = tmp_path / "run" / "iter_2.pth"
    assert cli.main(["convert", str(checkpoint), str(tmp_path / "folder")]) == 2
    assert "stores no config naming its model: give the timm model name (--model NAME)" in capsys.readouterr().err
    assert cli.main(["convert", str(checkpoint), str(tmp_path / "folder"), "--model", "msdnet_cifar_5exit",
                     "--model-kwargs", "num_classes=3", "num_channels=4", "growth_rate=2"]) == 0
    assert load_model_folder(str(tmp_path / "folder"))[0].num_classes == 3
    assert cli.main(["convert", str(tmp_path / "run" / "nothing.pth"), str(tmp_path / "f2")]) == 2


def test_cli_imports_nothing_heavy_for_help_and_every_option_is_explained():
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('standalone_cli', {str(ROOT / 'timm_exits' / 'cli.py')!r})\n"
            "cli = importlib.util.module_from_spec(spec); spec.loader.exec_module(cli)\n"
            "cli.build_parser().format_help()\n"
            "print(sorted(m for m in ('torch', 'timm', 'timm_exits') if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert run.returncode == 0 and run.stdout.strip() == "[]", (run.stdout, run.stderr)
    assert cli.CONVENTIONS == CONVENTIONS
    parser = cli.build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            assert action.help, f"{sub.prog} {action.dest} has no help text"


def test_a_stored_config_is_parsed_never_executed(tmp_path):
    """meta['cfg'] is Python text: only literal values are read; code in it does not run."""
    from timm_exits.integrations.mmengine import load_checkpoint_model

    marker = tmp_path / "ran"
    model = timm.create_model("msdnet_cifar_5exit", num_classes=3, num_channels=4, growth_rate=2)
    cfg = (f"model = dict(type='MultiExitClassifier', model=__import__('pathlib').Path({str(marker)!r}).touch())\n"
           "val_dataloader = dict(dataset=dict(data_config=dict(input_size=(3, 32, 32), mean=(0.1, 0.2, 0.3))))\n")
    torch.save({"meta": {"cfg": cfg}, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "epoch_1.pth")
    with pytest.raises(ValueError, match="stores no config naming its model"):
        load_checkpoint_model(str(tmp_path / "epoch_1.pth"))
    assert not marker.exists()
    loaded, data_config, _ = load_checkpoint_model(str(tmp_path / "epoch_1.pth"), "msdnet_cifar_5exit",
                                                   dict(num_classes=3, num_channels=4, growth_rate=2))
    assert data_config == {"input_size": (3, 32, 32), "mean": (0.1, 0.2, 0.3)} and not loaded.training


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_save_writes_nothing_and_json_is_strict(tmp_path):
    model, folder = _saved(tmp_path, "msdnet_cifar_5exit")  # 1 channel
    before = _files(folder)
    for data_config, info, message in (
            ({**GREY, "input_size": (3, 32, 32)}, {}, "Requested 3 input channels, but the model accepts 1"),
            ({**GREY, "mean": (float("inf"),)}, {}, r"data_config\['mean'\] must be a list of finite numbers"),
            ({**GREY, "crop_pct": 0}, {}, r"data_config\['crop_pct'\] must be a number > 0.0 and <= 1.0"),
            (GREY, {"note": float("nan")}, "Out of range float values are not JSON compliant")):
        other = timm.create_model("msdnet_cifar_5exit", **FAMILIES["msdnet_cifar_5exit"][0])
        with pytest.raises(ValueError, match=message):
            save_model_folder(other, str(folder), data_config, **info)
        assert _files(folder) == before  # the good weights and their config.json, untouched
    loaded, _ = load_model_folder(str(folder))
    x = torch.randn(2, 1, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model, x), _outputs(loaded, x)))


@pytest.mark.parametrize("key, value, message", [
    ("mean", [float("nan")], r"pretrained_cfg.mean must be a list of finite numbers or None, got \[nan\]"),
    ("std", [float("inf")], r"pretrained_cfg.std must be a list of numbers > 0.0 or None, got \[inf\]"),
    ("crop_pct", 0, r"pretrained_cfg.crop_pct must be a number > 0.0 and <= 1.0 or None, got 0"),
])
def test_a_folders_config_json_with_unusable_preprocessing_is_refused(tmp_path, key, value, message):
    _, folder = _saved(tmp_path, "msdnet_cifar_5exit")
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"][key] = value
    (folder / "config.json").write_text(json.dumps(config))  # Python's json writes NaN and Infinity
    with pytest.raises(ValueError, match=r"config.json: " + message):
        load_model_folder(str(folder))


def test_class_names_are_saved_with_the_model_and_compared_at_evaluation(tmp_path, capsys, cifar_run):
    model, _, data = cifar_run  # class folders class0, class1, class2
    save_model_folder(model, str(tmp_path / "named"), CIFAR, ["class0", "class1", "class2"])
    assert timm.create_model(f"local-dir:{tmp_path / 'named'}").pretrained_cfg["label_names"] == [
        "class0", "class1", "class2"]
    code, _, err = _evaluate(capsys, tmp_path / "named", "--data-dir", data, "--output", tmp_path / "ok")
    assert code == 0, err
    save_model_folder(model, str(tmp_path / "swapped"), CIFAR, ["class1", "class0", "class2"])
    code, _, err = _evaluate(capsys, tmp_path / "swapped", "--data-dir", data, "--output", tmp_path / "o1")
    assert code == 2 and err.count("\n") == 1 and (
        "error: --data-dir '" in err and "has 3 classes, the model's config.json 3, and class 0 is 'class0' there but "
        "'class1' in the model's config.json" in err)
    with pytest.raises(ValueError, match=r"label_names must be 3 class names"):
        save_model_folder(model, str(tmp_path / "short"), CIFAR, ["a", "b"])
    four = make_image_folder(tmp_path / "four", classes=4, per_class=2, size=32)
    code, _, err = _evaluate(capsys, tmp_path / "named", "--data-dir", data, "--val-dir", four,
                             "--output", tmp_path / "o2")
    assert code == 2 and "error: --val-dir" in err and "has 4 classes, --data-dir" in err and "3, and class 3 is " \
        "'class3' there but nothing in --data-dir" in err


def test_evaluate_never_overwrites_an_earlier_evaluation(tmp_path, capsys, cifar_run):
    _, folder, data = cifar_run
    (folder / "evaluation.json").write_text("the run's own evaluation")  # a run folder as output
    code, out, err = _evaluate(capsys, folder, "--data-dir", data, "--output", folder)
    assert code == 0, err
    assert (folder / "evaluation.json").read_text() == "the run's own evaluation"
    assert f"{folder} holds earlier output; this evaluation writes to {folder}-1" in out
    assert f"wrote {folder}-1/evaluation.json" in out and (Path(f"{folder}-1") / "evaluation.json").exists()
    code, out, _ = _evaluate(capsys, folder, "--data-dir", data, "--output", folder)
    assert code == 0 and f"this evaluation writes to {folder}-2" in out


def test_mean_and_std_flags_broadcast_and_bad_values_name_their_flag(tmp_path, capsys):
    _, folder = _saved(tmp_path, "msdnet_cifar_5exit")  # 1 channel, mean 0.4, std 0.3
    data = _grey_folder(tmp_path / "data")
    code, _, err = _evaluate(capsys, folder, "--data-dir", data, "--mean", 0.4, "--std", 0.3, "--output", tmp_path / "a")
    assert code == 0, err
    code, _, err = _evaluate(capsys, folder, "--data-dir", data, "--output", tmp_path / "b")
    assert code == 0, err
    a, b = (json.loads((tmp_path / o / "evaluation.json").read_text()) for o in ("a", "b"))
    assert a["exits"] == b["exits"] and a["data_config"]["mean"] == [0.4]
    for flags, message in ((["--std", 0], "--std must be a list of numbers > 0.0 or None, got [0.0]"),
                           (["--std", "inf"], "--std must be a list of numbers > 0.0 or None, got [inf]"),
                           (["--std", -0.5], "--std must be a list of numbers > 0.0 or None, got [-0.5]"),
                           (["--mean", "nan"], "--mean must be a list of finite numbers or None, got [nan]"),
                           (["--crop-pct", "nan"], "--crop-pct must be a number > 0.0 and <= 1.0 or None, got nan"),
                           (["--mean", 0.1, 0.2], "--mean has 2 values for 1-channel input: give 1")):
        code, _, err = _evaluate(capsys, folder, "--data-dir", data, *flags, "--output", tmp_path / "c")
        assert code == 2 and err == f"error: {message}" + err[len(f"error: {message}"):] and err.count("\n") == 1, err


def _checkpoint(path: Path, cfg: str, in_chans: int = 1) -> Path:
    """An mmengine checkpoint of MultiExitClassifier as mmengine stores it (weights, meta with the config)."""
    model = timm.create_model("msdnet_cifar_5exit", in_chans=in_chans, num_classes=3, num_channels=4, growth_rate=2)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "meta": {"cfg": cfg}}, path)
    return path


_CFG = ("model = dict(type='MultiExitClassifier', model='msdnet_cifar_5exit', model_kwargs=dict(num_classes=3, "
        "in_chans=1, num_channels=4, growth_rate=2))\n")


def test_a_failed_convert_leaves_the_folder_as_it_was(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path / "epoch_1.pth", _CFG)
    assert cli.main(["convert", str(checkpoint), str(tmp_path / "folder"), "--mean", "0.5", "--std", "0.5"]) == 0
    before = _files(tmp_path / "folder")
    assert cli.main(["convert", str(checkpoint), str(tmp_path / "folder"), "--input-size", "3", "32", "32"]) == 2
    assert "Requested 3 input channels, but the model accepts 1" in capsys.readouterr().err
    assert _files(tmp_path / "folder") == before
    infinite = _checkpoint(tmp_path / "inf.pth", _CFG + "val_dataloader = dict(dataset=dict(data_config=dict("
                                                        "mean=(1e999,), std=(0.5,))))\n")
    assert cli.main(["convert", str(infinite), str(tmp_path / "folder")]) == 2  # it wrote Infinity into config.json
    assert "the stored config's data_config['mean'] must be a list of finite numbers" in capsys.readouterr().err
    assert _files(tmp_path / "folder") == before and b"Infinity" not in before["config.json"]


def test_a_huge_stored_config_is_refused_before_it_is_parsed(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path / "big.pth", _CFG + "x = [" + "1, " * 400_000 + "]\n")
    start = time.perf_counter()
    assert cli.main(["convert", str(checkpoint), str(tmp_path / "folder")]) == 2
    assert time.perf_counter() - start < 30
    assert "stores a config of 1,200," in capsys.readouterr().err and not (tmp_path / "folder").exists()
