"""What a model is: whether it has the multi-exit contract.

The training objectives, the profiler and the command line ask this question; it is answered here
only, without naming any model family (whether a model selects a depth is the ADN family's question:
:func:`timm_exits.models.adaptive_depth.adaptive_depth_of`).
"""
from torch import nn

__all__ = ["is_multi_exit"]


_CONTRACT = ("forward_stem", "forward_stage", "forward_exit")  # see timm_exits.models.multi_exit


def is_multi_exit(model: nn.Module) -> bool:
    """Whether ``model`` has the multi-exit contract (``num_exits`` and the three primitives
    ``forward_stem``, ``forward_stage``, ``forward_exit``): MSDNet, a backbone with exits, IMTA's
    phase-II model, an exported model. A plain timm model or an ADN network has not."""
    return hasattr(model, "num_exits") and all(callable(getattr(model, name, None)) for name in _CONTRACT)
