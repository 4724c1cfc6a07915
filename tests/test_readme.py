"""Every ```python block of README.md and of the documentation's pages (docs/**/*.md) runs as
written, each on its own (a fresh namespace, in a temporary working directory).

Blocks that read files a test cannot download get them from a SETUP below, clearly marked: an
image folder, weights in the reference implementations' layout, or timm's weights placed in a local
Hugging Face cache (random values, the real file format and loading path). Our code is never
replaced: the blocks run against the installed package, timm and torch."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torchvision.models import resnet50

import timm_exits  # noqa: F401
from timm_exits.catalogue import load_catalogue
from timm_exits.config import load_config
from timm_exits.model_folder import save_model_folder

from msdnet_reference import reference_for
from helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]


def _python_blocks(page: str) -> list:
    """(page, line of the block's first code line, code) for every ```python block of a page."""
    text = (ROOT / page).read_text()
    return [(page, text.count("\n", 0, m.start()) + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M)]


BLOCKS = [block for page in PAGES for block in _python_blocks(page)]


# --- SETUP: files the blocks read, written into the block's working directory ------------------------

def _msdnet_reference_checkpoint(where: Path) -> None:
    """A kalviny/MSDNet-PyTorch training checkpoint (DataParallel keys) of the step-4 ImageNet MSDNet,
    built by the independent reference re-statement in tests/msdnet_reference.py."""
    command = load_catalogue("msdnet")["variants"]["msdnet_imagenet_5exit"]["reference_command"]
    state = reference_for(command).random_state_dict(seed=0)
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": t for k, t in state.items()}},
               where / "msdnet-step4-imagenet.pth.tar")


def _adn_reference_weights(where: Path) -> None:
    """The official ADN code's released ResNet-50 weights: torchvision names, plus the skip-aware twins
    (`bn1_skip` ...) of the mandatory blocks (the first ceil(n / 2) of a stage of n blocks)."""
    state = resnet50().state_dict()
    for stage, n in enumerate([3, 4, 6, 3], 1):
        for i in range(-(-n // 2)):
            for k in (1, 2, 3):
                prefix = f"layer{stage}.{i}.bn{k}"
                state.update({f"{prefix}_skip.{name}": state[f"{prefix}.{name}"].clone()
                              for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")})
    torch.save(state, where / "resnet50_adn.pth")


def _cifar_folders_and_weights(where: Path) -> None:
    """cifar/val and cifar/test image folders (10 classes of 32 x 32 PNGs) and a 10-class
    msdnet_cifar_7exit's weights as model.safetensors."""
    make_image_folder(where / "cifar" / "val", classes=10, per_class=3, seed=1)
    make_image_folder(where / "cifar" / "test", classes=10, per_class=2, seed=2)
    model = timm.create_model("msdnet_cifar_7exit", num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(where / "model.safetensors"))


def _hub_cache(where: Path) -> dict:
    """timm's ResNet-50 weights (random values) in a Hugging Face cache, read offline: what
    ``pretrained=True`` downloads on a machine with network access."""
    snapshot = where / "hub" / "models--timm--resnet50.a1_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet50").state_dict().items()},
              str(snapshot / "model.safetensors"))
    return dict(HF_HUB_CACHE=str(where / "hub"), HF_HUB_OFFLINE="1")


def _main_job_weights(where: Path) -> None:
    """What the main job writes as output/train/phase1_ge/: its model (built from recipes/digits.py, so
    the documented kwargs must be the recipe's; 10 classes, 1 channel) as a model folder, with the data
    config of recipes/_base_/datasets/digits.py."""
    config = load_config(str(ROOT / "recipes" / "digits.py"))
    net = timm.create_model(config["model"]["name"], num_classes=10, in_chans=1, **config["model"]["kwargs"])
    data = {k: config["data"][k] for k in ("mean", "std", "input_size")}
    save_model_folder(net, str(where / "output" / "train" / "phase1_ge"), data)


SETUP = {  # a string the block contains -> what the block needs
    "output/train/phase1_ge": _main_job_weights,
    "msdnet-step4-imagenet.pth.tar": _msdnet_reference_checkpoint,
    "resnet50_adn.pth": _adn_reference_weights,
    'root=f"cifar/{split}"': _cifar_folders_and_weights,
}
HUB = re.compile(r"\(\"resnet50(_adn)?\", pretrained=True\)")


def test_the_readme_and_the_docs_have_their_python_examples():
    pages = {page for page, _, _ in BLOCKS}
    assert sum(page == "README.md" for page, _, _ in BLOCKS) >= 6 and len(BLOCKS) >= 30
    assert {"docs/models/msdnet.md", "docs/training/techniques.md", "docs/inference/export.md"} <= pages
    assert all("model" in code or "dict(" in code for _, _, code in BLOCKS)


@pytest.mark.parametrize("page, line, code", BLOCKS, ids=[f"{page}:{line}" for page, line, _ in BLOCKS])
def test_python_block_runs(page, line, code, tmp_path, monkeypatch):
    for marker, setup in SETUP.items():
        if marker in code:
            setup(tmp_path)
    source = "\n" * (line - 1) + code  # tracebacks point at the page's own line numbers
    if HUB.search(code):  # the cache location is read when huggingface_hub is imported: a new process
        env = dict(os.environ, **_hub_cache(tmp_path), OMP_NUM_THREADS="1")
        run = subprocess.run([sys.executable, "-c", source],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return
    monkeypatch.chdir(tmp_path)
    exec(compile(source, str(ROOT / page), "exec"), {"__name__": "__docs__"})
