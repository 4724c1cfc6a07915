"""timm-exits: multi-exit and adaptive-depth image classifiers for timm.

Importing the package registers its models with timm::

    import timm, timm_exits
    model = timm.create_model("msdnet_cifar_7exit")
    resnet = timm_exits.add_exits("resnet50", pretrained=True)
    adn = timm.create_model("resnet50_adn"); adn.set_depth("TTFF")
"""
from .models import BackboneWithExits, MSDNet, MultiExitModel, adaptive_depth_of, add_exits, is_multi_exit, \
    make_adaptive_depth, slice_state

__version__ = "0.1.0"
__all__ = ["MSDNet", "MultiExitModel", "BackboneWithExits", "add_exits", "make_adaptive_depth", "is_multi_exit",
           "adaptive_depth_of", "slice_state", "__version__"]
