"""timm_exits.profile and the ``timm-exits`` command, run as a user runs them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import timm_exits  # noqa: F401
from timm_exits import MSDNet
from timm_exits.catalogue import families, load_catalogue
from timm_exits.cli import main, models_table
from timm_exits.profile import profile_exits

from helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "timm_exits.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_profile_json_in_the_msdnet_convention():
    run = _cli("profile", "msdnet_cifar_7exit", "--json", "--convention", "msdnet")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["model"] == "msdnet_cifar_7exit" and out["input_size"] == [3, 32, 32] and out["convention"] == "msdnet"
    assert [e["exit"] for e in out["exits"]] == list(range(1, 8))
    # the MSDNet reference op counter's numbers for this model, as IMTA's Table 1 reports them
    assert round(out["exits"][0]["macs"] / 1e6, 4) == 6.8599 and round(out["exits"][-1]["macs"] / 1e6, 4) == 137.2810
    assert round(out["exits"][-1]["params"] / 1e6, 4) == 3.9667


def test_profile_table_defaults_to_macs():
    run = _cli("profile", "msdnet_imagenet_5exit")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert "MACs" in lines[0] and len(lines) == 2 + 5
    # conv + linear MACs are below the reference counter's 1360.53 M (which adds ReLU, pooling, biases)
    last = float(lines[-1].split()[-1])
    assert 1350 < last < 1360.53


def test_profile_other_input_size_and_errors():
    run = _cli("profile", "msdnet_imagenet_5exit", "--input-size", "3", "192", "192", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["exits"][-1]["macs"] < 1355606016 * 0.75
    bad = _cli("profile", "msdnet_cifar_7exit", "--input-size", "3", "64", "64")
    assert bad.returncode == 2 and "must reduce the coarsest scale to 1x1" in bad.stderr



@pytest.mark.parametrize("command", ["profile", "evaluate"])
def test_an_unknown_model_name_is_the_same_error_in_every_command(command, tmp_path, capsys):
    from timm_exits import cli

    extra = ["--data-dir", str(make_image_folder(tmp_path / "data", per_class=1))] if command == "evaluate" else []
    assert cli.main([command, "resnet_nope", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'resnet_nope': expected a timm model name (see `timm-exits models`")


def test_profile_leaves_a_real_model_untouched():
    model = MSDNet(num_blocks=2, base=1, step=1, num_channels=8, growth_rate=4, gr_factor="1-2-4", bn_factor="1-2-4",
                   stem_type="cifar", head_channels=16, num_classes=5, img_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    costs = profile_exits(model, input_size=(3, 32, 32))
    assert all(not p.is_meta for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert costs[-1].params == sum(p.numel() for p in model.parameters())
    assert costs[0].macs < costs[1].macs


def test_attention_is_counted():
    class TwoExitAttention(nn.Module):  # the smallest model with the contract and an attention op
        num_exits = 2

        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.heads = nn.ModuleList([nn.Linear(16, 3), nn.Linear(16, 3)])

        def forward_stem(self, x):
            return x

        def forward_stage(self, x, i):
            return self.attn(x, x, x, need_weights=False)[0] if i == 1 else x

        def forward_exit(self, x, i, pre_logits=False):
            return self.heads[i](x.mean(1))

    tokens, dim = 10, 16
    costs = profile_exits(TwoExitAttention(), input_size=(tokens, dim))
    projections = 4 * tokens * dim * dim  # q, k, v and output projections
    scores = 2 * tokens * tokens * dim  # q k^T and attn v
    assert costs[0].macs == dim * 3
    assert costs[1].macs - costs[0].macs == projections + scores + dim * 3


def test_bad_profile_arguments():
    with pytest.raises(ValueError, match="convention must be one of"):
        profile_exits(MSDNet(), convention="flops")
    with pytest.raises(ValueError, match="has no pretrained_cfg"):
        profile_exits(nn.Linear(2, 2))


def test_a_plain_model_counts_as_one_exit():
    costs = profile_exits(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)), input_size=(4,), convention="macs_norm")
    assert costs == [costs[0]] and costs[0].exit == 1
    assert costs[0].macs == 4 * 3 + 5 * 3 and costs[0].params == 4 * 3 + 3 + 2 * 3


@pytest.mark.parametrize("family", ["msdnet", "exits", "adn", "ranet"])
def test_docs_models_tables_are_the_catalogue(family):  # each family's page in docs/models/
    assert models_table(family) in (ROOT / "docs" / "models" / f"{family}.md").read_text()


def test_models_command_lists_every_variant():
    run = _cli("models")
    listed = [line.split()[0] for line in run.stdout.strip().splitlines()]
    variants = [name for family in families() for name in load_catalogue(family)["variants"]]
    assert run.returncode == 0 and sorted(listed) == sorted(variants) and len(families()) >= 5


def test_the_fvcore_name_is_refused_with_what_the_convention_counts():
    with pytest.raises(ValueError, match="'fvcore' is now 'macs_norm'.*not what fvcore itself counts"):
        profile_exits(nn.Linear(4, 3), input_size=(4,), convention="fvcore")


@pytest.mark.parametrize("flags, message", [
    (["--num-classes", "-3"], "error: --num-classes must be an integer >= 1, got -3"),
    (["--input-size", "0", "32", "32"], "error: --input-size must be 3 integers >= 1 or None, got [0, 32, 32]"),
])
def test_profile_refuses_impossible_sizes(flags, message, capsys):
    assert main(["profile", "msdnet_cifar_5exit", *flags]) == 2
    assert capsys.readouterr().err == message + "\n"
