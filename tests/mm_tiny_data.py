"""A tiny dataset registered in mmengine's DATASETS, for config-file tests."""
from mmengine.registry import DATASETS

from test_mmengine import TinyImages


@DATASETS.register_module()
class TinyImageDataset(TinyImages):
    """Class-coloured 32x32 images (see test_mmengine.TinyImages)."""
