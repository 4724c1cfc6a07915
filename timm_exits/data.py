"""Image datasets through timm's readers (ImageFolder layout or a tar of it), with clear errors.

Every sample is transformed under its own seed (the dataset's seed, the epoch and the sample
index), so augmentation does not depend on the number of processes or loader workers, nor on
where a resumed run starts: a run killed mid-epoch and resumed sees the same images.
"""
from __future__ import annotations

import copy
import os
import random
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_dataset, create_transform, resolve_data_config
from torch import nn
from torch.utils.data import Dataset, Sampler, Subset
from torchvision import transforms

from .files import atomic_folder

__all__ = ["ImageFiles", "EpochSampler", "image_dataset", "image_transform", "split_dataset", "class_map", "num_classes_of",
           "write_digits"]

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


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with Python's, NumPy's and torch's CPU generators seeded, restoring them afterwards."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


class ImageFiles(Dataset):
    """Images and class indices from timm's reader (a folder or a tar), decoded with PIL in
    ``img_mode`` and transformed under a per-sample seed (see the module docstring).

    A file that cannot be decoded is an error naming it (timm's own dataset skips it silently).
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, img_mode: str = "RGB", seed: int = 0):
        _check_folder(root)
        self.root, self.transform, self.img_mode, self.seed = root, transform, img_mode, seed
        self.reader = create_dataset("", root=root).reader
        self.epoch = 0

    def with_transform(self, transform: Optional[Callable]) -> "ImageFiles":
        """The same files (the reader is shared, not read again) under another transform."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        file, target = self.reader[index]
        try:
            image = Image.open(file).convert(self.img_mode)
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            name = self.reader.filename(index, absolute=True)
            raise ValueError(f"cannot read image {name!r} of {self.root!r} ({e}); replace or remove the file") from None
        if self.transform is None:
            return image, target
        with _seeded(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2 ** 63):
            return self.transform(image), target


class EpochSampler(Sampler):
    """A random order of ``size`` indices drawn from (``seed``, epoch): the same on every process
    and in a resumed run (set the epoch with :meth:`set_epoch`)."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def image_transform(config: dict, train: bool = False, kind: str = "timm", **augment) -> Callable:
    """timm's transform for the data ``config`` (``input_size``, ``mean``, ``std``, ``crop_pct``,
    ``interpolation``; ``augment``: timm's training options such as ``scale``, ``hflip``,
    ``auto_augment``, ``re_prob``), or ``kind='pad_crop'``: the MSDNet CIFAR pipeline (pad 4 with
    zeros, random 32 x 32 crop, horizontal flip for training; normalisation only for evaluation)."""
    if kind == "timm":
        return create_transform(**config, is_training=train, **(augment if train else {}))
    if kind != "pad_crop":
        raise ValueError(f"transform must be 'timm' or 'pad_crop', got {kind!r}")
    size = tuple(config["input_size"][-2:])
    steps = [transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip()] if train else []
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])])


def image_dataset(root: str, model: Optional[nn.Module] = None, train: bool = False, config: Optional[dict] = None,
                  **transform_kwargs) -> ImageFiles:
    """An ImageFolder (or tar) dataset with the model's preprocessing (timm's ``resolve_data_config``)
    or the given data ``config`` (``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``)."""
    _check_folder(root)
    if config is None:
        config = resolve_data_config({}, model=model) if model is not None else {}
    return ImageFiles(root, image_transform(config, train, **transform_kwargs))


def class_map(dataset: Dataset) -> dict:
    """Class name -> index of a dataset read by timm (folder or tar reader)."""
    reader = getattr(dataset, "reader", None)
    mapping = getattr(reader, "class_to_idx", None) or getattr(reader, "class_name_to_idx", None)
    if not mapping:
        raise ValueError("cannot tell the classes of this dataset")
    return dict(mapping)


def num_classes_of(dataset: Dataset) -> int:
    return len(class_map(dataset))


def seeded_order(n: int, seed: int) -> List[int]:
    """A seeded random permutation of ``range(n)`` (the same on every machine and process)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def split_dataset(dataset: Dataset, fraction: float, seed: int = 0) -> Tuple[Subset, Subset]:
    """A seeded random split into (held-out ``fraction``, rest)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    order = seeded_order(len(dataset), seed)
    n = round(len(dataset) * fraction)
    if n == 0 or n == len(dataset):
        raise ValueError(f"{len(dataset)} images cannot be split with fraction {fraction}")
    return Subset(dataset, order[:n]), Subset(dataset, order[n:])


def write_digits(root: str, size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> str:
    """Write scikit-learn's embedded digits (1,797 8 x 8 images, 10 classes) as ``size`` x ``size``
    grayscale PNGs in ImageFolder layout: ``root/train/<digit>/`` and ``root/test/<digit>/`` (a
    seeded split). Nothing is downloaded; an existing folder is kept. Returns ``root``."""
    if os.path.isdir(root):
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = round(len(images) * test_fraction)
    with atomic_folder(root) as tmp:
        for rank, index in enumerate(order):
            folder = os.path.join(tmp, "test" if rank < n_test else "train", str(digits.target[index]))
            os.makedirs(folder, exist_ok=True)
            image = Image.fromarray(images[index]).resize((size, size), Image.BILINEAR)
            image.save(os.path.join(folder, f"{index:04d}.png"))
    return root
