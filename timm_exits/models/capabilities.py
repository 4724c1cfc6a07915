"""What a model is: multi-exit, adaptive-depth, or a multi-exit model built on an adaptive-depth one.

The training objectives, the profiler and the command line ask these two questions; they are answered
here only.
"""
from typing import Optional

from torch import nn

from .adaptive_depth import AdaptiveDepthMixin

__all__ = ["is_multi_exit", "adaptive_depth_of"]


_CONTRACT = ("forward_stem", "forward_stage", "forward_exit")  # see timm_exits.models.multi_exit


def is_multi_exit(model: nn.Module) -> bool:
    """Whether ``model`` has the multi-exit contract (``num_exits`` and the three primitives
    ``forward_stem``, ``forward_stage``, ``forward_exit``): MSDNet, a backbone with exits, IMTA's
    phase-II model, an exported model. A plain timm model or an ADN network has not."""
    return hasattr(model, "num_exits") and all(callable(getattr(model, name, None)) for name in _CONTRACT)


def adaptive_depth_of(model: nn.Module) -> Optional[AdaptiveDepthMixin]:
    """The adaptive-depth network whose depth ``model`` selects with ``set_depth``: ``model`` itself
    (``resnet50_adn``, :func:`make_adaptive_depth`), the backbone of a multi-exit model built on one
    (``add_exits`` on an ADN network), else ``None``."""
    if isinstance(model, AdaptiveDepthMixin):
        return model
    backbone = getattr(model, "backbone", None) if is_multi_exit(model) else None
    return backbone if isinstance(backbone, AdaptiveDepthMixin) else None
