"""Whether this CPU computes bfloat16 natively, so that code and docs can say if bf16 autocast helps.

Intel AMX (``amx_bf16``) and AVX-512 BF16 (``avx512_bf16``) run bf16 matrix products in hardware;
without them (e.g. an AVX2-only CPU) PyTorch emulates bf16 and autocast is much slower than float32
(``msdnet_cifar_7exit`` on an AVX2-only machine: 0.11x training, 0.12x inference; benchmarks/README.md).
"""
from __future__ import annotations

import sys
from typing import Optional

__all__ = ["cpu_bf16", "bf16_advice"]

_NATIVE = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"))


def cpu_bf16(cpuinfo: Optional[str] = None) -> Optional[str]:
    """The CPU's native bf16 unit (``"AMX"``, ``"AVX-512 BF16"``), ``""`` if it has none, ``None`` if
    unknown (not Linux). ``cpuinfo``: the text of /proc/cpuinfo (read if not given)."""
    if cpuinfo is None:
        if not sys.platform.startswith("linux"):
            return None
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return next((name for flag, name in _NATIVE if flag in flags), "")


def bf16_advice(cpuinfo: Optional[str] = None) -> str:
    """One line for logs and benchmark output: what bf16 autocast does on this CPU."""
    unit = cpu_bf16(cpuinfo)
    if unit is None:
        return "bf16 on this CPU: unknown (no /proc/cpuinfo); measure before choosing bf16"
    if unit:
        return f"bf16 on this CPU: native ({unit}); bf16 autocast can be faster than fp32"
    return ("bf16 on this CPU: not native (no AMX, no AVX-512 BF16); bf16 autocast is emulated and slower "
            "than fp32 here: prefer mixed_precision='no'")
