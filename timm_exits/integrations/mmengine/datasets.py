"""``ImageFolderDataset``: an image folder (or tar) through timm's reader and transforms, as mmengine samples."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from mmengine.registry import DATASETS

from ...data import image_dataset

__all__ = ["ImageFolderDataset"]


@DATASETS.register_module()
class ImageFolderDataset(torch.utils.data.Dataset):
    """An ImageFolder (or tar) through timm's reader and transforms, as mmengine samples
    ``dict(inputs=image, data_samples=label)``.

    Args:
        root: the image folder (one subfolder per class) or tar.
        data_config: timm's ``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``.
        train: timm's training augmentation; False: its evaluation transform.
        **transform_kwargs: ``check_files`` (:class:`~timm_exits.data.ImageFiles`), ``kind``
            (``'pad_crop'``: the MSDNet CIFAR pipeline) and timm's training options (``scale``,
            ``hflip``, ``auto_augment``, ...; :func:`~timm_exits.data.image_transform`).
    """

    def __init__(self, root: str, data_config: Optional[dict] = None, train: bool = False, **transform_kwargs):
        self.dataset = image_dataset(root, train=train, config=dict(data_config or {}), **transform_kwargs)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        image, label = self.dataset[index]
        return {"inputs": image, "data_samples": label}
