"""timm's evaluation path on our models, as timm's validate.py runs it: a model created by name, weights
from our safetensors through ``timm.models.load_checkpoint`` (``--checkpoint``), timm's dataset, transforms
and loader from the model's own data config, ``--torchscript``, ``--channels-last``, ``--reparam`` (MSDNet's
fused inference path, also scripted and channels-last, in validate.py's order) and evaluation under
``torch.inference_mode()`` with timm's ``ClassificationEvaluator``."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.models import load_checkpoint
from timm.task import ClassificationEvaluator
from timm.utils import reparameterize_model

import timm_exits  # noqa: F401
from timm_exits.models.msdnet_fused import FoldedConvAct

from helpers import randomise_norms

MODELS = {  # small configurations of each family
    "msdnet_cifar_5exit": dict(num_channels=8, growth_rate=4, head_channels=16, num_classes=3),
    "resnet18_exits": dict(num_classes=3),
    "resnet18_adn": dict(num_classes=3),
}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir()
        for i in range(4):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            pixels[..., c] = 255 - 40 * c  # something the classes differ by
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def _evaluate(model, loader, channels_last=False):
    evaluator = ClassificationEvaluator()
    outputs = []
    with torch.inference_mode():
        for images, target in loader:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            output = model(images)
            evaluator.update(output, target)
            outputs.append(output)
    return torch.cat(outputs), evaluator.compute()


@pytest.mark.parametrize("name", list(MODELS))
def test_validate_py_path(name, image_folder, tmp_path):
    kwargs = MODELS[name]
    torch.manual_seed(0)
    trained = timm.create_model(name, **kwargs)
    randomise_norms(trained)  # trained-looking norms
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))

    model = timm.create_model(name, **kwargs)
    load_checkpoint(model, str(path))  # validate.py --checkpoint
    model.eval()
    config = resolve_data_config(model=model)
    if name != "msdnet_cifar_5exit":
        config["input_size"] = (3, 64, 64)  # small images for the ResNets (MSDNet's size is fixed)
    dataset = create_dataset("", root=str(image_folder), split="validation")
    loader = create_loader(dataset, batch_size=5, use_prefetcher=False, device=torch.device("cpu"),
                           num_workers=0, **{k: config[k] for k in ("input_size", "interpolation", "mean", "std",
                                                                    "crop_pct", "crop_mode")})
    reference, metrics = _evaluate(trained.eval(), loader)
    assert reference.shape == (12, 3)  # every image, one tensor of logits per image

    with timm.set_scriptable(True):  # validate.py --torchscript
        scriptable = timm.create_model(name, **kwargs)
    load_checkpoint(scriptable, str(path))
    candidates = [(model, False), (torch.jit.script(scriptable.eval()), False)]
    if name.startswith("msdnet"):  # --reparam: MSDNet's fused inference path
        fused = reparameterize_model(model)
        assert any(isinstance(m, FoldedConvAct) for m in fused.modules())
        candidates += [(fused, False), (torch.jit.script(reparameterize_model(scriptable)), False),
                       (reparameterize_model(model).to(memory_format=torch.channels_last), True)]
    candidates.append((model.to(memory_format=torch.channels_last), True))  # --channels-last
    for candidate, channels_last in candidates:
        outputs, got = _evaluate(candidate, loader, channels_last)
        assert torch.allclose(outputs, reference, atol=1e-4)
        assert got["top1"] == metrics["top1"]
