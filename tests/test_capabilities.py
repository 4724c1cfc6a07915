"""is_multi_exit / adaptive_depth_of: what each family of model is, asked in one place."""
import subprocess
import sys
from pathlib import Path

import timm
import torch

from timm_exits import adaptive_depth_of, add_exits, is_multi_exit, make_adaptive_depth
from timm_exits.models.imta import IMTAModel

ROOT = Path(__file__).resolve().parents[1]


def _msdnet():
    return timm.create_model("msdnet_cifar_5exit", num_classes=3, num_channels=4, growth_rate=2)


def test_each_family_says_what_it_is():
    msdnet = _msdnet()
    exits = timm.create_model("resnet18_exits", num_classes=3)
    adn = timm.create_model("resnet18_adn", num_classes=3)
    plain = timm.create_model("resnet18", num_classes=3)
    assert [is_multi_exit(m) for m in (msdnet, exits, adn, plain)] == [True, True, False, False]
    assert adaptive_depth_of(adn) is adn
    assert adaptive_depth_of(msdnet) is None and adaptive_depth_of(exits) is None and adaptive_depth_of(plain) is None
    assert adaptive_depth_of(make_adaptive_depth(plain)) is plain  # converted in place


def test_a_multi_exit_model_built_on_an_adn_network_selects_the_depth_of_its_backbone():
    adn = timm.create_model("resnet18_adn", num_classes=3)
    wrapped = add_exits(adn)
    assert is_multi_exit(wrapped) and adaptive_depth_of(wrapped) is adn
    adaptive_depth_of(wrapped).set_depth("TTFF")
    assert adn.depth_config == "TTFF"


def test_imta_phase_two_is_multi_exit_and_selects_no_depth():
    phase_two = IMTAModel(_msdnet())
    assert is_multi_exit(phase_two) and adaptive_depth_of(phase_two) is None
    on_adn = IMTAModel(add_exits(timm.create_model("resnet18_adn", num_classes=3)))
    assert is_multi_exit(on_adn) and adaptive_depth_of(on_adn) is None  # its network is frozen: no depth to train


def test_a_plain_module_is_neither():
    linear = torch.nn.Linear(2, 2)
    assert not is_multi_exit(linear) and adaptive_depth_of(linear) is None


def test_profile_depth_asks_the_same_question():
    run = subprocess.run([sys.executable, "-m", "timm_exits.cli", "profile", "resnet18", "--depth", "TTFF"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "error: --depth needs an adaptive-depth model (e.g. resnet50_adn); resnet18 has no skippable sub-paths" \
        in run.stderr
