"""Multi-exit models, registered in timm on import."""
from .multi_exit import MultiExitModel, State, slice_state
from .msdnet import MSDNet

__all__ = ["MultiExitModel", "MSDNet", "State", "slice_state"]
