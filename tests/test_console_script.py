"""The ``timm-exits`` console script answers ``--help`` without importing torch or timm, and runs
every other command through ``timm_exits.cli``."""
import shutil
import subprocess
import sys

import pytest

_CHECK = """
import sys
sys.argv = ["timm-exits", *{args!r}]
import timm_exits_cli
try:
    timm_exits_cli.main()
except SystemExit as e:
    code = e.code
print("heavy:", sorted(m for m in ("torch", "timm", "timm_exits") if m in sys.modules), "code:", code)
"""


@pytest.mark.parametrize("args", [["--help"], ["evaluate", "--help"], ["profile", "-h"], []])
def test_help_imports_neither_torch_nor_timm(args):
    out = subprocess.run([sys.executable, "-c", _CHECK.format(args=args)], capture_output=True, text=True, timeout=60)
    assert "heavy: [] code: 0" in out.stdout or (not args and "heavy: [] code: 2" in out.stdout), out.stdout + out.stderr
    assert "usage: timm-exits" in out.stdout + out.stderr


def test_the_installed_script_runs_commands_and_reports_mistakes():
    script = shutil.which("timm-exits")
    assert script, "the package's console script is installed"
    listed = subprocess.run([script, "models"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "msdnet_cifar_7exit" in listed.stdout
    unknown = subprocess.run([script, "profile", "msdnet_cifar_7exitt"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "error: unknown model 'msdnet_cifar_7exitt'" in unknown.stderr
    train = subprocess.run([script, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert train.returncode == 0 and "usage: timm-exits train" in train.stdout


def test_techniques_lists_the_registered_types_and_a_types_options_with_their_defaults(capsys):
    import dataclasses

    from timm_exits.cli import main
    from timm_exits.train.techniques import TECHNIQUES, HDKD

    assert main(["techniques"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == sorted(TECHNIQUES) and {"HDKD", "PCGrad", "L2W"} <= set(listed)
    assert main(["techniques", "HDKD"]) == 0
    shown = {line.split()[0]: line.split("default ")[1].split(";")[0]
             for line in capsys.readouterr().out.splitlines() if " default " in line}
    assert shown == {f.name: repr(f.default) for f in dataclasses.fields(HDKD.Options)}  # the CLI shows Options
    assert shown["interval"] == "1" and shown["temperature"] == "4.0"
    assert main(["techniques", "HDK"]) == 2
    assert "unknown technique type 'HDK' (did you mean 'HDKD'?)" in capsys.readouterr().err
    assert main(["techniques", "pcgrad"]) == 2  # a former config string: the type it became, case aside
    assert "unknown technique type 'pcgrad' (did you mean 'PCGrad'?)" in capsys.readouterr().err
