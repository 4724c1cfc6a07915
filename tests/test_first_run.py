"""A first run on one's own data: one key sets the resolution of data and model, a size the model
does not take is refused before any data is read (naming the smallest it takes), loader workers fit
the machine, too few held-out images are warned about, a failed start leaves nothing behind, and
under ``timm-exits launch`` the user's error is the last line printed, once."""
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from timm_exits.config import DEFAULTS, ConfigError, load_config
from timm_exits.data import loader_workers
from timm_exits.engine import MIN_VAL_IMAGES, run

from helpers import tiny_data, write_config
from launch import free_port

ROOT = Path(__file__).resolve().parents[1]
# a ViT with exits built for 224 px by default: the data's 32 px must reach it through data.input_size alone
VIT_WITHOUT_SIZE = ("dict(name='vit_tiny_patch16_224_exits', kwargs=dict(patch_size=8, embed_dim=32, depth=2, "
                    "num_heads=2, exits=[0]))")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("first_run") / "data")


def _run(config_path: Path, output: Path, **options):
    config = load_config(str(config_path), output_dir=str(output), cfg_options=options)
    try:
        return run(config)
    finally:
        gc.collect()


def test_data_input_size_alone_sizes_a_vit_and_few_held_out_images_are_warned(data, tmp_path, capfd):
    config = write_config(tmp_path / "vit.py", data, VIT_WITHOUT_SIZE, "tracker = None\ntrain = dict(epochs=1)")
    report, = _run(config, tmp_path / "out")
    assert report["test_samples"] == 21 and len(report["exits"]) == 2
    err = capfd.readouterr().err
    # 48 training images, a third held out: 16 < 100
    assert "warning: the budgeted thresholds are fitted on 16 held-out images" in err and str(MIN_VAL_IMAGES) in err


def test_a_size_in_model_kwargs_that_differs_is_refused_before_the_data(tmp_path):
    model = VIT_WITHOUT_SIZE.replace("patch_size", "img_size=64, patch_size")
    config = write_config(tmp_path / "vit.py", tmp_path / "no-data", model)
    with pytest.raises(ConfigError, match=r"model.kwargs.img_size is 64 but data.input_size is \(3, 32, 32\)"):
        _run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_size_the_model_does_not_take_names_the_smallest_and_the_small_image_family(tmp_path):
    config = load_config(str(ROOT / "recipes" / "imagenet.py"), data_dir=str(tmp_path / "no-data"),
                         output_dir=str(tmp_path / "out"), cfg_options={"data.input_size": (3, 32, 32)})
    with pytest.raises(ConfigError) as e:  # before the (missing) data is looked at
        run(config)
    message = str(e.value)
    assert "msdnet_imagenet_5exit does not run on data.input_size (3, 32, 32)" in message
    assert "the smallest input it takes is 129x129 pixels" in message and "msdnet_cifar_5exit" in message
    assert not (tmp_path / "out").exists()


def test_loader_workers_default_to_the_machine():
    assert DEFAULTS["data"]["workers"] is None
    assert loader_workers(None) == min(8, len(os.sched_getaffinity(0))) and loader_workers(3) == 3
    imagenet = load_config(str(ROOT / "recipes" / "imagenet.py"))
    assert imagenet["data"]["workers"] is None  # not 8 on a 2-core machine


@pytest.mark.parametrize("mistake", [{"data.dir": "/nonexistent/data"}, {"model.kwargs.num_classes": 5}],
                         ids=["bad data dir", "class count"])
def test_a_failed_start_leaves_nothing_behind(data, tmp_path, mistake):
    config = write_config(tmp_path / "c.py", data, extra="train = dict(epochs=1)")  # TensorBoard on (the default)
    with pytest.raises((ValueError, FileNotFoundError)):
        _run(config, tmp_path / "out", **mistake)
    assert not (tmp_path / "out").exists()  # no .lock, run.json, log or tensorboard/: the folder was made by the run
    mine = tmp_path / "mine"  # a folder the user made keeps what it held, and only that
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises((ValueError, FileNotFoundError)):
        _run(config, mine, **mistake)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_the_fixed_command_reuses_the_folder_without_resume_advice(data, tmp_path, capfd):
    config = write_config(tmp_path / "c.py", data, extra="train = dict(epochs=1)")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        _run(config, out, **{"data.dir": "/nonexistent/data"})
    capfd.readouterr()
    _run(config, out)
    printed = capfd.readouterr()
    assert (out / "run.json").is_file() and (out / "checkpoint").is_dir() and not Path(f"{out}-1").exists()
    assert "--resume" not in printed.out + printed.err


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_leaves_a_folder_the_same_command_reuses(data, tmp_path):
    """SIGKILL (nothing runs after it) once the run has claimed its folder and before it saves a checkpoint:
    the folder holds a run.json and no output, and the same command trains in it instead of <out>-1."""
    config = write_config(tmp_path / "c.py", data, extra="train = dict(epochs=1)\ntracker = None")
    out = tmp_path / "out"
    killed = subprocess.Popen([sys.executable, str(ROOT / "recipes" / "train.py"), str(config), "--output-dir", str(out),
                               "--cfg-options", "data.batch_size=2"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        while not (out / "run.json").exists() and killed.poll() is None:
            time.sleep(0.01)
        killed.send_signal(signal.SIGKILL)
    finally:
        killed.wait(60)
    assert (out / "run.json").is_file() and not (out / "checkpoint").exists(), "killed after its first checkpoint"
    _run(config, out)
    assert (out / "checkpoint").is_dir() and (out / "results.json").is_file() and not Path(f"{out}-1").exists()
    _run(config, out)  # a folder with output is kept: the next run writes beside it
    assert (Path(f"{out}-1") / "results.json").is_file()


def _launch(*launcher_args):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "timm_exits.cli", "launch", *launcher_args, "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "train.py"),
                           "--cfg-options", "train.epoch=3"], capture_output=True, text=True, env=env, timeout=300)


def _assert_error_last_and_once(run: subprocess.CompletedProcess) -> None:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr[-3000:]
    assert lines[-1].startswith("error: unknown config key 'train.epoch' (did you mean 'train.epochs'?)"), lines[-5:]
    assert run.stderr.count("unknown config key") == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr


def test_launch_one_process_ends_with_the_error_once():
    _assert_error_last_and_once(_launch("--num_processes", "1", "--cpu"))


@pytest.mark.slow
def test_launch_two_processes_ends_with_the_error_once():
    _assert_error_last_and_once(_launch("--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())))
