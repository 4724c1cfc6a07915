"""timm-exits: multi-exit and adaptive-depth image classifiers for timm.

Importing the package registers its models with timm::

    import timm, timm_exits
    model = timm.create_model("msdnet_cifar_7exit")
"""
from .models import MSDNet, MultiExitModel, slice_state

__version__ = "0.1.0"
__all__ = ["MSDNet", "MultiExitModel", "slice_state", "__version__"]
