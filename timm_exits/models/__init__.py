"""Multi-exit and adaptive-depth models, and the models that wrap a multi-exit network (IMTA phase II,
BoostNet, ZTW, product anytime), registered in timm on import."""
from .multi_exit import MultiExitModel, State, slice_state
from .msdnet import MSDNet
from .exits import BackboneWithExits, add_exits
from .adaptive_depth import adaptive_depth_of, make_adaptive_depth
from .capabilities import is_multi_exit
from .imta import IMTAModel
from .boostnet import BoostedExits
from .ztw import ZTWModel
from .product_anytime import ProductAnytimeModel
from .dyn_perceiver import DynPerceiver
from .ranet import RANet
from .mie import MIEModel
from .laplace import LaplaceExits
from .jei_gates import JEIGatesModel

__all__ = ["MultiExitModel", "MSDNet", "BackboneWithExits", "add_exits", "make_adaptive_depth", "is_multi_exit",
           "adaptive_depth_of", "State", "slice_state", "IMTAModel", "BoostedExits", "ZTWModel", "ProductAnytimeModel",
           "DynPerceiver", "JEIGatesModel", "RANet", "MIEModel", "LaplaceExits"]
