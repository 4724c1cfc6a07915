"""A tiny dataset registered in mmengine's DATASETS, for config-file tests."""
from mmengine.registry import DATASETS

from helpers import TinyImages


@DATASETS.register_module()
class TinyImageDataset(TinyImages):
    """Class-coloured 32x32 images (see helpers.TinyImages)."""
