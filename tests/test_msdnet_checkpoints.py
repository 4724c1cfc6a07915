"""Loading weights the timm way: ``pretrained=True, pretrained_cfg_overlay=dict(file=...)``, from our
own .safetensors / .pth files and from checkpoints in the reference implementations' layout."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_exits  # noqa: F401
from timm_exits.catalogue import load_catalogue

from helpers import randomise_norms
from msdnet_reference import reference_for

CATALOGUE = load_catalogue("msdnet")["variants"]


def _load(name, path, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def _trained_looking(name):
    """A model whose BN statistics and weights differ from any fresh init."""
    torch.manual_seed(1)
    return randomise_norms(timm.create_model(name)).eval()


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth.tar"])
def test_local_file_round_trip(tmp_path, fmt):
    model = _trained_looking("msdnet_cifar_5exit")
    state = model.state_dict()
    path = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif fmt == "pth":
        torch.save(state, path)
    else:  # a training checkpoint of a DataParallel model
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = _load("msdnet_cifar_5exit", path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(loaded.forward_exits(x), model.forward_exits(x)):
            assert torch.equal(a, b)


def test_other_class_count_keeps_the_backbone_and_renews_every_head(tmp_path):
    model = _trained_looking("msdnet_cifar_5exit")
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    loaded = _load("msdnet_cifar_5exit", path, num_classes=10)
    assert torch.equal(loaded.stem.convs[0].conv.weight, model.stem.convs[0].conv.weight)
    assert torch.equal(loaded.exits[2].conv1.bn.running_mean, model.exits[2].conv1.bn.running_mean)
    assert all(head.fc.out_features == 10 for head in loaded.exits)


@pytest.mark.parametrize("name", ["msdnet_cifar_7exit", "msdnet_imagenet_5exit"])
def test_reference_checkpoint_gives_the_reference_outputs_at_every_exit(tmp_path, name):
    v = CATALOGUE[name]
    reference = reference_for(v["reference_command"])
    state = reference.random_state_dict(seed=0)
    path = tmp_path / "model_best.pth.tar"  # as saved by the reference training scripts
    torch.save({"epoch": 90, "arch": "msdnet", "best_prec1": 75.0,
                "state_dict": {f"module.{k}": t for k, t in state.items()}}, path)
    model = _load(name, path)
    size = timm.models.get_pretrained_cfg(name).input_size
    x = torch.randn(2, *size)
    with torch.no_grad():
        ours = model.forward_exits(x)
        theirs, _ = reference.run(state, x)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()
    # nothing was left at its fresh-init value: every tensor came from the file
    assert sum(t.numel() for t in model.state_dict().values()) == sum(t.numel() for t in state.values())


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("msdnet_cifar_5exit").state_dict().items()}, path)
    with pytest.raises(RuntimeError, match="Missing key|size mismatch"):
        _load("msdnet_cifar_7exit", path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        _load("msdnet_cifar_5exit", tmp_path / "nowhere.safetensors")


def test_unknown_layout_is_explained(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"blocks.0.0.weird.weight": torch.zeros(1), "classifier.0.linear.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a key of a reference MSDNet checkpoint"):
        _load("msdnet_cifar_5exit", path)


@pytest.mark.parametrize("name, kwargs", [("msdnet_cifar_5exit", dict(num_channels=8, growth_rate=4, head_channels=16)),
                                          ("resnet18_adn", {})])
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_a_run_with_another_class_count_keeps_its_classifiers(tmp_path, name, kwargs, fmt):
    torch.manual_seed(0)
    trained = timm.create_model(name, num_classes=10, **kwargs).eval()  # e.g. the main job's 10 digits
    path = tmp_path / f"model.{fmt}"
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    loaded = _load(name, path, num_classes=10, **kwargs)  # the README's loading recipe
    x = torch.randn(2, 3, *timm.models.get_pretrained_cfg(name).input_size[1:])
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
    # another class count than the file's: timm's behaviour, the classifiers are new, the rest loads
    other = _load(name, path, num_classes=7, **kwargs)
    classifier = other.get_classifier()
    assert classifier.out_features == 7
    first_conv = timm.models.get_pretrained_cfg(name).first_conv
    assert torch.equal(other.state_dict()[f"{first_conv}.weight"], state[f"{first_conv}.weight"])
