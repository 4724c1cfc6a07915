"""Multi-exit and adaptive-depth models, registered in timm on import."""
from .multi_exit import MultiExitModel, State, slice_state
from .msdnet import MSDNet
from .exits import BackboneWithExits, add_exits
from .adaptive_depth import make_adaptive_depth

__all__ = ["MultiExitModel", "MSDNet", "BackboneWithExits", "add_exits", "make_adaptive_depth", "State",
           "slice_state"]
