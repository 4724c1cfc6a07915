"""Image datasets through timm's readers (ImageFolder layout or a tar of it), with clear errors."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from timm.data import create_dataset, create_transform, resolve_data_config
from torch import nn
from torch.utils.data import Dataset, Subset

__all__ = ["image_dataset", "split_dataset", "num_classes_of"]

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _check_folder(root: str) -> None:
    if not os.path.exists(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist; expected an ImageFolder layout "
                                f"(<root>/<class>/<image>) or a .tar of one")
    if os.path.isdir(root):
        classes = [d for d in os.scandir(root) if d.is_dir()]
        has_images = any(f.name.lower().endswith(_IMAGE_EXTENSIONS)
                         for d in classes for f in os.scandir(d.path) if f.is_file())
        if not classes or not has_images:
            raise ValueError(f"data folder {root!r} holds no images in class folders; expected "
                             f"<root>/<class>/<image> with one of {', '.join(_IMAGE_EXTENSIONS)}")


def image_dataset(root: str, model: Optional[nn.Module] = None, train: bool = False, config: Optional[dict] = None,
                  **transform_kwargs) -> Dataset:
    """An ImageFolder (or tar) dataset with the model's preprocessing (timm's ``resolve_data_config``)
    or the given data ``config`` (``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``)."""
    _check_folder(root)
    if config is None:
        config = resolve_data_config({}, model=model) if model is not None else {}
    transform = create_transform(**config, is_training=train, **transform_kwargs)
    return create_dataset("", root=root, is_training=train, transform=transform)


def num_classes_of(dataset: Dataset) -> int:
    reader = getattr(dataset, "reader", None)
    mapping = getattr(reader, "class_to_idx", None)
    if mapping:
        return len(mapping)
    raise ValueError("cannot tell the number of classes of this dataset")


def split_dataset(dataset: Dataset, fraction: float, seed: int = 0) -> Tuple[Subset, Subset]:
    """A seeded random split into (held-out ``fraction``, rest)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    n = round(len(dataset) * fraction)
    if n == 0 or n == len(dataset):
        raise ValueError(f"{len(dataset)} images cannot be split with fraction {fraction}")
    return Subset(dataset, order[:n]), Subset(dataset, order[n:])
