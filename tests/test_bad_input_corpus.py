"""A corpus of broken artifacts and configs, made here, fed through every entry point as a careless
user (or an attacker) would: the command line's ``train``, ``evaluate``, ``convert`` and ``profile``,
and the Python API's ``load_model_folder``, ``ExportedModel`` and ``Thresholds.load`` (what the
executor is given). Each case must end in one ``error:`` line and exit code 2 (the API: a typed
exception), never a traceback, and must leave every existing file as it was."""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import pytest
import timm
import torch
import zipfile

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.cli import main
from timm_exits.inference import ExportedModel, Thresholds, export_model
from timm_exits.model_folder import load_model_folder, save_model_folder

from helpers import MM_TINY_MSDNET, make_image_folder, mm_runner, write_config

TYPED = (ValueError, FileNotFoundError, FileExistsError, PermissionError)
DATA_CONFIG = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0,
                   interpolation="bilinear")
DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested beyond Python's recursion limit


def _tiny_model():
    return timm.create_model("msdnet_cifar_5exit", num_classes=3, num_channels=4, growth_rate=2, num_blocks=3).eval()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """One good artifact of every kind: data, a model folder, an mmengine checkpoint, an export, a
    thresholds file and an engine config."""
    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    make_image_folder(root / "data", per_class=4)
    model = _tiny_model()
    save_model_folder(model, str(root / "model"), DATA_CONFIG)
    mm_runner(root, MM_TINY_MSDNET, iters=2, name="mm").train()
    shutil.copy(root / "mm" / "iter_2.pth", root / "checkpoint.pth")
    export_model(model, torch.randn(2, 3, 32, 32), str(root / "export"))
    Thresholds("msdnet_cifar_5exit", model.num_exits, "maxprob", [0.9] * (model.num_exits - 1) + [0.0]).save(
        str(root / "thresholds.json"))
    write_config(root / "config.py", root / "data", extra="train = dict(epochs=1)")
    return root


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot what it should be" * 10)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])


def _directory(path: Path) -> None:
    path.unlink() if path.is_file() else shutil.rmtree(path)
    path.mkdir()
    (path / "inside").write_text("x")


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(edit(doc)))


def _set(doc: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = doc
    for key in parents:
        node = node[key]
    node[last] = value
    return doc


def _pickled(path: Path) -> None:
    """A pickle that ``torch.load(weights_only=True)`` refuses (it names a function to call)."""
    torch.save({"state_dict": {}, "meta": {"hook": os.getcwd}}, path)


def _zip_without_data(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")  # an empty dict, no version record


@dataclass
class Case:
    """``artifact`` (a name in ``good``) is copied into the case folder, ``breakage`` applied to
    ``target`` (a path in the case folder, "" for the folder itself), then ``argv`` ({case} = the
    case folder) runs through the command line, or ``api`` is called on the copy."""

    id: str
    artifact: str
    target: str
    breakage: Callable[[Path], None]
    argv: List[str] = None
    api: Callable[[str], object] = None


def _evaluate(*extra: str) -> List[str]:
    return ["evaluate", "{case}/model", "--data-dir", "{good}/data", "--workers", "0", "--output", "{case}/out", *extra]


CONVERT = ["convert", "{case}/checkpoint.pth", "{case}/converted", "--model", "msdnet_cifar_5exit", "--model-kwargs",
           "num_classes=3", "num_channels=4", "growth_rate=2"]
TRAIN = ["train", "{case}/config.py", "--output-dir", "{case}/run"]

CASES = [
    # model folders: evaluate and load_model_folder
    *[Case(f"model-config-{name}-{entry}", "model", "model/config.json", breakage, **({"argv": _evaluate()} if entry == "cli"
          else {"api": load_model_folder}))
      for name, breakage in [
          ("garbage", _garbage), ("list", lambda p: _write(p, "[1, 2]")), ("deep", lambda p: _write(p, DEEP)),
          ("directory", _directory),
          ("architecture-type", lambda p: _edit_json(p, lambda d: _set(d, "architecture", 5))),
          ("model-args-type", lambda p: _edit_json(p, lambda d: _set(d, "model_args", [1]))),
          ("unknown-kwarg", lambda p: _edit_json(p, lambda d: _set(d, "model_args.no_such_option", 1))),
          ("mean-nan", lambda p: _edit_json(p, lambda d: _set(d, "pretrained_cfg.mean", [float("nan")] * 3))),
          ("crop-zero", lambda p: _edit_json(p, lambda d: _set(d, "pretrained_cfg.crop_pct", 0))),
      ] for entry in ("cli", "api")],
    *[Case(f"model-weights-{name}-{entry}", "model", "model/model.safetensors", breakage,
           **({"argv": _evaluate()} if entry == "cli" else {"api": load_model_folder}))
      for name, breakage in [("garbage", _garbage), ("truncated", _truncate), ("directory", _directory),
                             ("missing", lambda p: p.unlink())] for entry in ("cli", "api")],
    # evaluate's own paths
    Case("evaluate-output-is-a-file", "model", "out", lambda p: _write(p, "mine"), argv=_evaluate()),
    Case("evaluate-data-is-a-file", "model", "data", lambda p: _write(p, "x"),
         argv=["evaluate", "{case}/model", "--data-dir", "{case}/data", "--workers", "0", "--output", "{case}/out"]),
    Case("evaluate-std-zero", "model", "", lambda p: None, argv=_evaluate("--std", "0", "0", "0")),
    # mmengine checkpoints: convert
    Case("convert-garbage", "checkpoint.pth", "checkpoint.pth", _garbage, argv=CONVERT),
    Case("convert-truncated", "checkpoint.pth", "checkpoint.pth", _truncate, argv=CONVERT),
    Case("convert-pickled-code", "checkpoint.pth", "checkpoint.pth", _pickled, argv=CONVERT),
    Case("convert-zip-without-data", "checkpoint.pth", "checkpoint.pth", _zip_without_data, argv=CONVERT),
    Case("convert-directory", "checkpoint.pth", "checkpoint.pth", _directory, argv=CONVERT),
    Case("convert-output-is-a-file", "checkpoint.pth", "converted", lambda p: _write(p, "mine"), argv=CONVERT),
    Case("convert-wrong-kwargs", "checkpoint.pth", "", lambda p: None, argv=[*CONVERT, "no_such_option=1"]),
    # exports: ExportedModel
    *[Case(f"export-{name}", "export", f"export/{target}", breakage, api=ExportedModel) for name, target, breakage in [
        ("manifest-garbage", "manifest.json", _garbage), ("manifest-deep", "manifest.json", lambda p: _write(p, DEEP)),
        ("manifest-list", "manifest.json", lambda p: _write(p, "[]")),
        ("manifest-directory", "manifest.json", _directory),
        ("weights-truncated", "weights.safetensors", _truncate), ("stem-garbage", "stem.json", _garbage),
        ("files-type", "manifest.json", lambda p: _edit_json(p, lambda d: _set(d, "files", [1]))),
        ("num-exits-huge", "manifest.json", lambda p: _edit_json(p, lambda d: _set(d, "num_exits", 10 ** 9))),
    ]],
    # thresholds files: what the executor is given
    *[Case(f"thresholds-{name}", "thresholds.json", "thresholds.json", breakage, api=Thresholds.load)
      for name, breakage in [
          ("garbage", _garbage), ("list", lambda p: _write(p, "[0.5]")), ("deep", lambda p: _write(p, DEEP)),
          ("directory", _directory), ("unknown-key", lambda p: _edit_json(p, lambda d: {**d, "evil": 1})),
          ("threshold-type", lambda p: _edit_json(p, lambda d: _set(d, "thresholds", "high"))),
          ("exits-negative", lambda p: _edit_json(p, lambda d: _set(d, "num_exits", -1))),
          ("nan", lambda p: _edit_json(p, lambda d: _set(d, "thresholds", [float("nan")] * len(d["thresholds"])))),
      ]],
    # engine configs: train
    Case("train-syntax-error", "config.py", "config.py", lambda p: _write(p, "model = dict(\n"), argv=TRAIN),
    Case("train-circular-base", "config.py", "config.py",
         lambda p: (_write(p, "_base_ = ['other.py']\n"), _write(p.parent / "other.py", "_base_ = ['config.py']\n")),
         argv=TRAIN),
    Case("train-missing-base", "config.py", "config.py", lambda p: _write(p, "_base_ = ['nowhere.py']\n"), argv=TRAIN),
    Case("train-model-not-a-dict", "config.py", "config.py",
         lambda p: _write(p, p.read_text() + "\nmodel = 5\n"), argv=TRAIN),
    Case("train-unknown-model-kwarg", "config.py", "", lambda p: None,
         argv=[*TRAIN, "--cfg-options", "model.kwargs.no_such_option=1"]),
    Case("train-output-is-a-file", "config.py", "run", lambda p: _write(p, "mine"), argv=TRAIN),
    Case("train-config-is-a-directory", "config.py", "config.py", _directory, argv=TRAIN),
    Case("train-config-json-list", "config.py", "config.json", lambda p: _write(p, "[1]"),
         argv=["train", "{case}/config.json", "--output-dir", "{case}/run"]),
    # profile
    Case("profile-negative-classes", "config.py", "", lambda p: None,
         argv=["profile", "msdnet_cifar_5exit", "--num-classes", "-3"]),
    Case("profile-zero-size", "config.py", "", lambda p: None,
         argv=["profile", "msdnet_cifar_5exit", "--input-size", "3", "0", "0"]),
    Case("profile-unknown-model", "config.py", "", lambda p: None, argv=["profile", "no_such_model"]),
]


def _snapshot(root: Path) -> dict:
    """Every file under ``root`` with its SHA-256 (folders as such)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_broken_input_is_one_clear_error_and_nothing_changes(good, tmp_path, capsys, case):
    source = good / case.artifact
    copy = tmp_path / case.artifact
    (shutil.copytree if source.is_dir() else shutil.copy)(source, copy)
    if case.artifact == "config.py":
        shutil.copy(good / "config.py", tmp_path / "config.py")
    case.breakage(tmp_path / case.target if case.target else tmp_path)
    before = _snapshot(tmp_path)
    if case.argv is not None:
        argv = [a.format(case=tmp_path, good=good) for a in case.argv]
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, f"exit code {code}; stderr:\n{err[-3000:]}"
        assert "Traceback" not in err, err[-3000:]
        assert lines and "error:" in lines[-1], err[-3000:]
    else:
        with pytest.raises(TYPED) as raised:
            case.api(str(copy))
        assert str(raised.value), "the error says nothing"
    after = _snapshot(tmp_path)
    changed = {k for k in before if before[k] != after.get(k)}
    assert not changed, f"existing files changed or removed: {sorted(changed)}"


def test_a_full_disk_is_an_os_error_with_its_number_not_a_safetensors_traceback(tmp_path):
    """safetensors reports a failed write as its own error type; the package raises the OSError that
    the command lines print as one ``error:`` line. A file-size limit (RLIMIT_FSIZE, in a child
    process) makes the write fail as a full disk would."""
    script = f"""
import resource, signal, torch
from timm_exits.errors import is_user_error
from timm_exits.files import write_weights
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    write_weights({{"w": torch.zeros(100000)}}, {str(tmp_path / "model.safetensors")!r})
except OSError as e:
    print(e.errno, is_user_error(e))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == [str(errno.EFBIG), "True"], run.stdout + run.stderr


@pytest.mark.slow
def test_a_two_process_run_refused_by_its_main_process_prints_one_error_and_no_traceback(good, tmp_path):
    """The output folder is claimed by the main process; when it refuses it, the other process is
    told so instead of waiting for a folder that never comes (a gloo 'Connection reset' traceback)."""
    from launch import launch_two_processes

    (tmp_path / "run").write_text("mine")
    run = launch_two_processes(str(Path(__file__).resolve().parents[1] / "recipes" / "train.py"),
                               [str(good / "config.py"), "--output-dir", str(tmp_path / "run")], timeout=300)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: output folder '{tmp_path / 'run'}' is a file; expected a folder (or a path to create)"]
    assert "[rank1]: Traceback" not in run.stderr and "Connection reset" not in run.stderr, run.stderr[-3000:]
    assert (tmp_path / "run").read_text() == "mine"
