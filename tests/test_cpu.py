"""bf16 on the CPU: the native units are read from /proc/cpuinfo's flags, and the engine warns when
bf16 autocast is asked for on a CPU that would emulate it (slower than fp32)."""
import subprocess
import sys
from pathlib import Path

import pytest

from timm_exits.cpu import bf16_advice, cpu_bf16

from helpers import tiny_data, write_config

ROOT = Path(__file__).resolve().parents[1]
_CPUINFO = "processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 avx2 {extra}\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 {extra}\n"


@pytest.mark.parametrize("extra, unit", [("amx_tile amx_bf16 avx512f avx512_bf16", "AMX"),
                                         ("avx512f avx512_bf16", "AVX-512 BF16"), ("", ""), ("avx512f", "")])
def test_the_native_bf16_unit_is_read_from_the_cpu_flags(extra, unit):
    info = _CPUINFO.format(extra=extra)
    assert cpu_bf16(info) == unit
    assert ("not native" in bf16_advice(info)) == (unit == "")


def test_the_engine_warns_about_bf16_on_a_cpu_without_it(tmp_path):
    """In its own process: accelerate keeps one mixed-precision state per process."""
    config = write_config(tmp_path / "c.py", tiny_data(tmp_path / "data"), extra="tracker = None\ntrain = dict(epochs=1)")
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), str(config), "--output-dir",
                          str(tmp_path / "out"), "--cfg-options", "train.mixed_precision=bf16"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    warned = "bf16 on this CPU: not native" in run.stderr
    assert warned == (cpu_bf16() == "")  # this machine's own flags decide
