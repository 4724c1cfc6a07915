"""Multi-exit and adaptive-depth models, registered in timm on import."""
from .multi_exit import MultiExitModel, State, slice_state
from .msdnet import MSDNet
from .exits import BackboneWithExits, add_exits
from .adaptive_depth import make_adaptive_depth
from .capabilities import adaptive_depth_of, is_multi_exit

__all__ = ["MultiExitModel", "MSDNet", "BackboneWithExits", "add_exits", "make_adaptive_depth", "is_multi_exit",
           "adaptive_depth_of", "State", "slice_state"]
