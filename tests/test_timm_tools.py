"""timm's evaluation path on our models, as timm's validate.py runs it: a model created by name, weights
from our safetensors through ``timm.models.load_checkpoint`` (``--checkpoint``), timm's dataset, transforms
and loader from the model's own data config, ``--torchscript``, ``--channels-last``, ``--reparam`` (MSDNet's and
RANet's fused inference path, also scripted and channels-last, in validate.py's order) and evaluation under
``torch.inference_mode()`` with timm's ``ClassificationEvaluator``.

And timm's training path, as train.py and ``benchmark.py --bench train`` run it: the model created with
``--model-kwargs`` as train.py parses them, timm's optimizer factory (also with ``--layer-decay``), timm's loader,
Mixup and losses in a ``ClassificationTask``; ``features_only`` beside timm's own ViT."""
import argparse

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import load_checkpoint
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from timm.task import ClassificationEvaluator, ClassificationTask
from timm.utils import ParseKwargs, reparameterize_model

import timm_exits  # noqa: F401
from timm_exits.models.multi_exit import exit_logits
from timm_exits.models.msdnet_fused import FoldedConvAct

from helpers import randomise_norms

MODELS = {  # small configurations of each family
    "msdnet_cifar_5exit": dict(num_channels=8, growth_rate=4, head_channels=16, num_classes=3),
    "resnet18_exits": dict(num_classes=3),
    "resnet18_adn": dict(num_classes=3),
    "ranet_cifar_6exit": dict(num_channels=8, growth_rate=4, step=2, head_channels=16, num_classes=3),
    "dyn_perceiver_regnety_002_cifar": dict(num_latents=16, depths=(1, 1, 1, 1), num_classes=3),
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
    if config["input_size"][-1] > 64:
        config["input_size"] = (3, 64, 64)  # small images for the ImageNet-size models (MSDNet's, RANet's are fixed)
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
    if isinstance(model, timm_exits.MSDNet):  # --reparam: MSDNet's (and RANet's) fused inference path
        fused = reparameterize_model(model)
        assert any(isinstance(m, FoldedConvAct) for m in fused.modules())
        candidates += [(fused, False), (torch.jit.script(reparameterize_model(scriptable)), False),
                       (reparameterize_model(model).to(memory_format=torch.channels_last), True)]
    candidates.append((model.to(memory_format=torch.channels_last), True))  # --channels-last
    for candidate, channels_last in candidates:
        outputs, got = _evaluate(candidate, loader, channels_last)
        assert torch.allclose(outputs, reference, atol=1e-4)
        assert got["top1"] == metrics["top1"]


# ---- train.py and benchmark.py --bench train

def _model_kwargs(*args):
    """``--model-kwargs ...`` as timm's train.py and benchmark.py parse it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs)
    return parser.parse_args(["--model-kwargs", *args]).model_kwargs


def _train_loader(model, image_folder):
    """timm's training loader (train.py's, no prefetcher) over the tiny image folder."""
    config = resolve_data_config(model=model)
    dataset = create_dataset("", root=str(image_folder), split="train", is_training=True)
    return create_loader(dataset, input_size=(3, 32, 32), batch_size=4, is_training=True, use_prefetcher=False,
                         num_workers=0, mean=config["mean"], std=config["std"], device=torch.device("cpu"))


def _exit_parameters(model):
    """Per exit, the names of the parameters its logits depend on (ADN: one set, the selected depth's)."""
    names, params = zip(*model.named_parameters())
    logits = exit_logits(model, torch.randn(2, 3, 32, 32))
    grads = [torch.autograd.grad(y.sum(), params, retain_graph=True, allow_unused=True) for y in logits]
    return [{n for n, g in zip(names, exit_grads) if g is not None} for exit_grads in grads]


@pytest.mark.parametrize("name", list(MODELS))
def test_train_py_trains_the_last_exit_with_the_create_time_option(name, image_folder):
    kwargs = _model_kwargs("multi_exit_training=False", *(f"{k}={v}" for k, v in MODELS[name].items()))
    assert kwargs == {"multi_exit_training": False, **MODELS[name]}
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    *earlier, trained = _exit_parameters(model)
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05, momentum=0.9, weight_decay=2e-5)
    mixup = Mixup(mixup_alpha=0.8, label_smoothing=0.1, num_classes=3)  # train.py --mixup 0.8: soft targets
    losses = []
    for criterion, mix in ((SoftTargetCrossEntropy(), mixup), (LabelSmoothingCrossEntropy(0.1), None)):
        task = ClassificationTask(model, criterion=criterion, verbose=False)
        for images, target in _train_loader(model, image_folder):
            if mix is not None:
                images, target = mix(images, target)
            result = task(images, target)
            assert result["output"].shape == (len(images), 3)  # one tensor of logits, as timm's loss takes
            optimizer.zero_grad()
            result["loss"].backward()
            optimizer.step()
            losses.append(result["loss"].item())
    assert len(losses) == 6 and all(np.isfinite(losses))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trained  # the last exit and what it reads, and nothing else
    if not name.endswith("_adn"):  # (an ADN network's plain forward is one depth: no other exit)
        assert set().union(*earlier) - trained  # so an earlier exit's own head is not trained this way


@pytest.mark.parametrize("name", list(MODELS))
def test_a_plain_loss_on_every_exit_says_how_to_train(name):
    model = timm.create_model(name, **MODELS[name]).train()
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([0, 2])
    for criterion, y in ((torch.nn.CrossEntropyLoss(), target), (SoftTargetCrossEntropy(), torch.eye(3)[target]),
                         (LabelSmoothingCrossEntropy(0.1), target)):
        with pytest.raises(TypeError) as error:
            ClassificationTask(model, criterion=criterion, verbose=False)(x, y)
        message = str(error.value)
        assert "MultiExitTask" in message and "`timm-exits train`" in message
        assert "--model-kwargs multi_exit_training=False" in message
    outputs = model(x)  # still every exit's logits, as a tuple
    assert isinstance(outputs, tuple) and torch.stack(outputs).shape == (len(outputs), 2, 3)


@pytest.mark.parametrize("name", list(MODELS))
def test_benchmark_train_backward_reaches_what_the_last_exit_depends_on(name):
    model = timm.create_model(name, **_model_kwargs("multi_exit_training=False"), **MODELS[name]).train()
    x = torch.randn(2, 3, 32, 32)
    output = model(x)
    if isinstance(output, tuple):  # benchmark.py's train step
        output = output[0]
    output.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    exit_logits(model, x)[-1].sum().backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == reference.keys()
    if isinstance(model, timm_exits.MSDNet):
        assert len(grads) > 0.8 * len(list(model.parameters()))  # every stage, the last head
    for n, g in grads.items():
        torch.testing.assert_close(g, reference[n], rtol=1e-4, atol=1e-6)


LAYER_DECAY = {**{k: v for k, v in MODELS.items() if not k.endswith("_adn")},
               "vit_tiny_patch16_224_exits": dict(num_classes=3, img_size=32)}


@pytest.mark.parametrize("name", list(LAYER_DECAY))
def test_layer_decay_gives_every_exit_head_the_last_heads_rate(name):
    model = timm.create_model(name, **LAYER_DECAY[name])
    groups = param_groups_layer_decay(model, layer_decay=0.65)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.1, layer_decay=0.65)  # train.py --layer-decay
    assert {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]} == scale
    last_head = list(model.get_classifier().parameters())
    classifiers = tuple(f"{c}." for c in model.pretrained_cfg["classifier"])  # (Dynamic Perceiver's are not exits.*)
    exit_heads = [p for n, p in model.named_parameters() if n.startswith(("exits.", *classifiers))]
    assert last_head and len(exit_heads) > len(last_head)
    assert {scale[id(p)] for p in last_head + exit_heads} == {1.0}
    assert min(scale.values()) < 0.65 ** 3  # the backbone still decays from the stem up


def test_vit_exits_features_only_are_timms_vit_features():
    exits = timm.create_model("vit_tiny_patch16_224_exits", features_only=True, img_size=32).eval()
    plain = timm.create_model("vit_tiny_patch16_224", features_only=True, img_size=32).eval()
    plain.load_state_dict({k.replace("model.backbone.", "model.", 1): v for k, v in exits.state_dict().items()})
    assert exits.feature_info.out_indices == plain.feature_info.out_indices == (9, 10, 11)
    assert exits.feature_info.channels() == plain.feature_info.channels()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs, refs = exits(x), plain(x)
    assert len(outs) == len(refs) == 3
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
