"""The accelerate engine end to end, on real PNG files: the recipes' configs, one and two processes,
gradient accumulation, exact resume after SIGKILL, and the error paths."""
import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from timm_exits.config import ConfigError, load_config, phase_configs, resolve_config
from timm_exits.engine import run, train_phase
from timm_exits.train.techniques import TrainingForward

from launch import launch_two_processes
from helpers import tiny_data, write_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "recipes" / "train.py")

TINY_VIT = ("dict(name='vit_tiny_patch16_224_exits', kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=4, "
            "num_heads=2, exits=[0, 2]))")


def launch_one(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
                           "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=dict(os.environ, **env))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("engine") / "data")


def test_recipes_inherit_and_take_overrides(tmp_path):
    imagenet = load_config(str(ROOT / "recipes" / "imagenet.py"), data_dir="/data/imagenet",
                           cfg_options={"phases.1.technique.gamma": 0.3, "train.epochs": 5})
    (ge, ge_cfg), (imta, imta_cfg) = phase_configs(imagenet)
    assert (ge, imta) == ("phase1_ge", "phase2_isc_ofa")
    assert ge_cfg["technique"]["gradient_equilibrium"] and ge_cfg["technique"]["type"] == "CrossEntropy"
    assert imta_cfg["technique"]["type"] == "OneForAll" and imta_cfg["technique"]["temperature"] == 1.0
    assert imta_cfg["technique"]["gamma"] == 0.3 and imta_cfg["train"]["epochs"] == 5
    assert imagenet["model"]["name"] == "msdnet_imagenet_5exit" and imagenet["data"]["dir"] == "/data/imagenet"
    assert imagenet["scheduler"] == dict(sched="step", decay_epochs=30, decay_rate=0.1, warmup_epochs=0)
    assert imagenet["optimizer"]["filter_bias_and_bn"] is False  # the reference decays norms and biases too
    cifar = load_config(str(ROOT / "recipes" / "cifar.py"))
    assert cifar["scheduler"]["decay_milestones"] == [150, 225] and cifar["data"]["transform"] == "pad_crop"
    assert cifar["model"]["name"] == "msdnet_cifar_7exit" and cifar["data"]["mean"] == (0.5071, 0.4867, 0.4408)
    # a user's own config inherits a recipe and changes what it needs
    mine = tmp_path / "mine.py"
    mine.write_text(f"_base_ = [{str(ROOT / 'recipes' / 'resnet50_adn.py')!r}]\ntrain = dict(epochs=3)\n"
                    "technique = dict(topk=None)\n")
    config = load_config(str(mine))
    assert config["model"]["name"] == "resnet50_adn" and config["train"]["epochs"] == 3
    assert config["technique"]["type"] == "ADN" and config["technique"]["topk"] is None
    assert config["scheduler"]["decay_milestones"] == [60, 100, 140]


def test_config_mistakes_are_explained(tmp_path):
    recipe = str(ROOT / "recipes" / "cifar.py")
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'.*did you mean 'train.epochs'"):
        load_config(recipe, cfg_options={"train.epoch": 3})
    with pytest.raises(ConfigError, match="unknown config key 'phases\\[0\\].techniqe'"):
        resolve_config(dict(model=dict(name="x"), phases=[dict(name="a", techniqe=dict())]))
    with pytest.raises(ValueError, match="overrides 'train.mixed_precision', which is one value for the whole run"):
        resolve_config(dict(model=dict(name="x"), phases=[dict(name="a", train=dict(mixed_precision="bf16"))]))
    with pytest.raises(ValueError, match="names no model"):
        resolve_config(dict())
    with pytest.raises(ConfigError, match="'data' must be a dict"):
        resolve_config(dict(model=dict(name="x"), data="folder"))


@pytest.mark.parametrize("option, value, message", [
    ("train.epochs", "ten", "train.epochs must be an integer >= 1, got 'ten'"),
    ("train.epochs", 0, "train.epochs must be an integer >= 1, got 0"),
    ("train.epochs", -2, "got -2"),
    ("train.grad_accum_steps", 0, "train.grad_accum_steps must be an integer >= 1"),
    ("data.val_fraction", -0.5, r"data.val_fraction must be a number >= 0.0 and < 1.0, got -0.5"),
    ("data.test_fraction", 1.0, "data.test_fraction must be a number >= 0.0 and < 1.0"),
    ("data.batch_size", 2.5, "data.batch_size must be an integer"),
])
def test_config_values_out_of_range_are_refused_before_anything_runs(option, value, message):
    recipe = str(ROOT / "recipes" / "cifar.py")
    with pytest.raises(ConfigError, match=message):
        load_config(recipe, cfg_options={option: value})


def test_phases_are_checked_and_named_as_folders():
    base = dict(model=dict(name="x"))
    with pytest.raises(ConfigError, match=r"phase 'b': train.epochs must be an integer >= 1, got 0"):
        phase_configs(resolve_config(dict(base, phases=[dict(name="a"), dict(name="b", train=dict(epochs=0))])))
    for name in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ConfigError, match="a phase name is a folder name"):
            phase_configs(resolve_config(dict(base, phases=[dict(name=name)])))


def _final_weights(folder: Path):
    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_two_processes_and_accumulation_equal_one_process(data, tmp_path):
    """Same global batch of 8: 1 process x 8, 2 processes x 4 (gloo; the same config: data.batch_size is
    the global batch), 1 process x 4 x 2 accumulated. A ViT (no batch norm) computes the same function
    of the global batch in all three."""
    config = str(write_config(tmp_path / "vit.py", data, TINY_VIT, "tracker = None\ntrain = dict(epochs=1)"))
    one = launch_one(config, "--output-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch_two_processes(TRAIN, args=[config, "--output-dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    accumulated = launch_one(config, "--output-dir", str(tmp_path / "acc"), "--cfg-options", "data.batch_size=4",
                             "train.grad_accum_steps=2")
    assert accumulated.returncode == 0, accumulated.stderr[-3000:]
    reference = _final_weights(tmp_path / "one")
    start = torch.load(tmp_path / "one" / "checkpoint" / "training.pt", weights_only=True)
    assert start["optimizer"]["state"], "the optimizer took steps"
    for other in ("two", "acc"):
        weights = _final_weights(tmp_path / other)
        for k, v in reference.items():
            assert torch.allclose(weights[k], v, atol=2e-5, rtol=1e-4), (other, k)
        a = json.loads((tmp_path / "one" / "results.json").read_text())["phases"][0]
        b = json.loads((tmp_path / other / "results.json").read_text())["phases"][0]
        assert b["test_samples"] == a["test_samples"] == 21 and b["val_samples"] == 16
        assert [e["top1"] for e in b["exits"]] == [e["top1"] for e in a["exits"]]


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_same_weights(data, tmp_path):
    extra = ("train = dict(epochs=2, checkpoint_every=1, log_every=1, ema_decay=0.9)\nmixup = dict(mixup_alpha=0.4)\n"
             "technique = dict(label_smoothing=0.1)\ntracker = None")
    model = "dict(name='msdnet_cifar_5exit', kwargs=dict(num_channels=4, growth_rate=2, drop_rate=0.3))"
    config = str(write_config(tmp_path / "resume.py", data, model, extra))
    whole = subprocess.run([sys.executable, TRAIN, config, "--output-dir", str(tmp_path / "whole")],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    # the same run, killed right after its checkpoint at epoch 1, batch 2 (of 4), then resumed, with
    # loader workers this time: augmentation is seeded per sample, so that must not matter either
    out = tmp_path / "killed"
    killed = subprocess.Popen([sys.executable, TRAIN, config, "--output-dir", str(out), "--cfg-options",
                               "data.workers=2"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    for line in killed.stdout:
        if "checkpoint: epoch 2, batch 2" in line:
            killed.send_signal(signal.SIGKILL)
            break
    assert killed.wait(timeout=300) == -signal.SIGKILL
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert not state["finished"] and 0 < state["batch"] < 4 and state["epoch"] == 1  # killed mid-epoch
    resumed = subprocess.run([sys.executable, TRAIN, config, "--output-dir", str(out), "--resume", "--cfg-options",
                              "data.workers=2"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint'}: epoch 2, batch {state['batch']}" in resumed.stdout
    a, b = _final_weights(tmp_path / "whole"), _final_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _config(data: Path, tmp_path: Path, **changes) -> dict:
    config = load_config(str(write_config(tmp_path / "c.py", data, extra="tracker = None")),
                         output_dir=str(tmp_path / "out"))
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            config[section][leaf] = value
        else:
            config[section] = value
    return config


def test_data_errors_are_explained(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; expected an ImageFolder layout"):
        run(_config(data, tmp_path, data__dir=str(tmp_path / "nowhere")))
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images in class folders"):
        run(_config(data, tmp_path, data__dir=str(tmp_path / "empty")))
    corrupt = tiny_data(tmp_path / "corrupt")
    (corrupt / "train" / "class1" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="cannot read image .*class1/3.png.*replace or remove the file"):
        run(_config(corrupt, tmp_path, data__dir=str(corrupt)))
    held_out = tiny_data(tmp_path / "held-out")  # a corrupt file in the test split: refused before training
    (held_out / "val" / "class2" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="class2/5.png"):
        run(_config(held_out, tmp_path, data__dir=str(held_out), output_dir=str(tmp_path / "held-out-run")))
    assert not (tmp_path / "held-out-run" / "checkpoint").exists()
    with pytest.raises(ConfigError, match="data.check_files must be True, False or 'decode'"):
        run(_config(data, tmp_path, data__check_files="yes"))


def test_splits_in_tar_files(data, tmp_path):
    """timm's tar reader: train.tar and val.tar instead of folders give the same run."""
    import tarfile

    for split in ("train", "val"):
        with tarfile.open(tmp_path / f"{split}.tar", "w") as tar:
            tar.add(data / split, arcname=".")
    folders = run(_config(data, tmp_path, train__epochs=1))[0]
    tars = run(_config(data, tmp_path, train__epochs=1, data__dir=str(tmp_path), output_dir=str(tmp_path / "tars")))[0]
    assert tars["test_samples"] == folders["test_samples"] == 21
    assert [e["top1"] for e in tars["exits"]] == [e["top1"] for e in folders["exits"]]


def test_a_checkpoint_of_another_model_is_refused(data, tmp_path):
    config = _config(data, tmp_path, train__epochs=1)
    run(config)
    other = _config(data, tmp_path, train__epochs=1)
    other["model"] = dict(name="msdnet_cifar_7exit", kwargs=dict(num_channels=4, growth_rate=2))
    with pytest.raises(ValueError, match="model.name: 'msdnet_cifar_5exit' -> 'msdnet_cifar_7exit'"):
        run(other, resume=True)  # the run's config says so
    (tmp_path / "out" / "run.json").unlink()  # a run without it (an older version): the checkpoint says so
    state = tmp_path / "out" / "checkpoint" / "state.json"
    older = {k: v for k, v in json.loads(state.read_text()).items() if k not in ("run_id", "classes")}
    state.write_text(json.dumps(older))  # nor the identities this version records
    with pytest.raises(ValueError, match="is a checkpoint of 'msdnet_cifar_5exit', not of 'msdnet_cifar_7exit'"):
        run(other, resume=True)


def test_resume_refuses_another_runs_checkpoint_and_data_with_other_classes(data, tmp_path):
    """data.dir may move on resume; its classes may not (same count, other names: no other check
    notices), and a checkpoint copied from another run's folder is not this run's."""
    import shutil

    config = _config(data, tmp_path, train__epochs=1)
    run(config)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    run({**config, "data": {**config["data"], "dir": str(moved)}}, resume=True)  # the same classes: resumed
    for split in ("train", "val"):
        (moved / split / "class2").rename(moved / split / "class0b")  # relabelled: another name, another order
    with pytest.raises(ValueError, match=r"classes of .*moved/train' are not those the run was trained on: trained on "
                                         r"3 classes, the data has 3; missing: \['class2'\], not trained on: "
                                         r"\['class0b'\].*its classes may not"):
        run({**config, "data": {**config["data"], "dir": str(moved)}}, resume=True)
    run(config)  # another run of the same config: it writes to out-1
    checkpoint = tmp_path / "out" / "checkpoint"
    shutil.rmtree(checkpoint)
    shutil.copytree(tmp_path / "out-1" / "checkpoint", checkpoint)
    with pytest.raises(ValueError, match="out/checkpoint' belongs to another run .*copied from another run's folder"):
        run(config, resume=True)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(data, tmp_path):
    config = _config(data, tmp_path, optimizer__lr=1e12, train__checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="the loss is not finite.*the last checkpoint is the last good state"):
        run(config)
    folder = tmp_path / "out" / "checkpoint"
    state = json.loads((folder / "state.json").read_text())
    assert not state["finished"] and state["updates"] >= 1
    weights = load_file(folder / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


@pytest.mark.slow
def test_bf16_and_the_other_techniques_train(data, tmp_path):
    """bf16 autocast on CPU with PCGrad; HDKD (its weights learn); ADN on a small ResNet."""
    msdnet = write_config(tmp_path / "t.py", data, extra="tracker = None\ntrain = dict(epochs=1)")
    resnet = write_config(tmp_path / "r.py", data, "dict(name='resnet18_adn', kwargs=dict())",
                          "tracker = None\ntrain = dict(epochs=1)")
    runs = {
        "PCGrad": (msdnet, ["technique.type=PCGrad", "train.mixed_precision=bf16"]),
        "HDKD": (msdnet, ["technique.type=HDKD"]),
        "ADN": (resnet, ["technique.type=ADN", "technique.topk=2"]),
    }
    for name, (config, options) in runs.items():
        result = launch_one(str(config), "--output-dir", str(tmp_path / name), "--cfg-options", *options)
        assert result.returncode == 0, (name, result.stderr[-3000:])
        report = json.loads((tmp_path / name / "results.json").read_text())["phases"][0]
        assert report["technique"]["type"] == name and report["test_samples"] == 21
    hdkd = torch.load(tmp_path / "HDKD" / "checkpoint" / "training.pt", weights_only=True)["technique"]["hdkd_weights"]
    assert hdkd["ce_logits"].abs().sum() > 0  # moved from the uniform start


def test_a_test_set_held_out_of_the_training_folder_and_a_finished_run_resumed(data, tmp_path):
    """CIFAR-10 as one folder of training images (the accuracy study): test, validation and training
    parts from one seeded order; resuming a finished run evaluates it again without training."""
    config = _config(data, tmp_path, data__test_split=None, data__test_fraction=0.25, train__epochs=1)
    report = run(config)[0]
    assert (report["test_samples"], report["val_samples"]) == (12, 16)  # of 48: 12 test, 16 validation, 20 train
    folder = tmp_path / "out" / "checkpoint"
    before, state = load_file(folder / "model.safetensors"), json.loads((folder / "state.json").read_text())
    again = run(config, resume=True)[0]
    assert json.loads((folder / "state.json").read_text()) == state
    assert all(torch.equal(v, load_file(folder / "model.safetensors")[k]) for k, v in before.items())
    assert again["exits"] == report["exits"]
    with pytest.raises(ValueError, match="set data.test_fraction > 0"):
        run(_config(data, tmp_path, data__test_split=None, output_dir=str(tmp_path / "other")))


def test_a_phase_leaves_nothing_it_prepared_alive(data, tmp_path):
    """The accelerator keeps what it prepares: a phase releases it, or every phase's model, optimizer
    and loaders would stay alive through the later phases (and a DDP model outlive its process group)."""
    from accelerate import Accelerator
    (name, phase), = phase_configs(_config(data, tmp_path, train__epochs=1))
    alive = lambda: sum(isinstance(o, TrainingForward) for o in gc.get_objects())  # noqa: E731
    before, accelerator = alive(), Accelerator(cpu=True)
    report = train_phase(accelerator, phase, str(tmp_path / "out"), name)
    gc.collect()  # the accelerator lives on, as it does through the later phases of a run
    assert report["test_samples"] > 0 and alive() == before
