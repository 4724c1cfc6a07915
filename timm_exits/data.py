"""Image datasets through timm's readers (ImageFolder layout or a tar of it), with clear errors.

A dataset is checked when it is built, so a data mistake ends a run before its first step: the
layout (``<root>/<class>/<image>``, at least two classes) and every file's header, all offending
files named in one error. 16-bit grayscale PNGs are scaled to 8 bits, not clipped.

Every sample is transformed under its own seed (the dataset's seed, the epoch and the sample
index), so augmentation does not depend on the number of processes or loader workers, nor on
where a resumed run starts: a run killed mid-epoch and resumed sees the same images.
"""
from __future__ import annotations

import copy
import hashlib
import os
import random
import stat
import tarfile
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import PIL
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from timm.data.readers import create_reader
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader import Reader
from torch import nn
from torch.utils.data import Dataset, Sampler, Subset
from torchvision import transforms

from .files import MARKER, atomic_folder, write_json

__all__ = ["IMAGE_MODES", "TRANSFORMS", "ImageFiles", "EpochSampler", "open_image", "image_dataset", "image_transform",
           "held_out_split", "split_dataset", "class_map", "class_names", "num_classes_of", "write_digits", "loader_workers"]

IMAGE_MODES = {"RGB": 3, "L": 1}  # the modes images are decoded in (PIL's names) and their channel counts
TRANSFORMS = ("timm", "pad_crop")

_EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_LAYOUT = "<root>/<class>/<image>"
_SHOWN = 5  # offending files or folders named in an error message, then a count


def _listing(items: List[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _files(items: List[str]) -> str:
    return "files" if len(items) > 1 else "file"


def _is_sixteen_bit(image: Image.Image) -> bool:
    # 16-bit grayscale PNGs open as 'I;16' (or 'I' in older Pillow; a PNG holds no 32-bit integers)
    return image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG")


def open_image(file, mode: str = "RGB") -> Image.Image:
    """A decoded image in ``mode``; 16-bit grayscale is scaled to 8 bits (value / 257, rounded)
    first, where PIL's ``convert`` would saturate every value above 255.

    Args:
        file: a path or an open binary file.
        mode: PIL's mode to convert to, e.g. ``"RGB"`` or ``"L"``.

    Returns:
        The image.
    """
    image = Image.open(file)
    if _is_sixteen_bit(image):
        values = np.asarray(image).astype(np.float64) / 257
        image = Image.fromarray(np.rint(values).clip(0, 255).astype(np.uint8), "L")
    return image.convert(mode)


def _special(path: str) -> Optional[str]:
    """What a path that is neither a regular file nor a folder is (a named pipe, ...), or None; such a
    file is never opened: reading a named pipe or a device can block forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a broken symbolic link" if os.path.islink(path) else None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def _check_root(root: str) -> None:
    """``root`` is a folder or a .tar file."""
    if not os.path.exists(root):
        parent = os.path.dirname(os.path.abspath(root))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        why = f": {parent!r} is a file" if os.path.isfile(parent) else ""
        raise FileNotFoundError(f"data folder {root!r} does not exist{why}; expected an ImageFolder layout "
                                f"({_LAYOUT}) or a .tar of one")
    if _special(root):
        raise ValueError(f"{root!r} is {_special(root)}; expected a folder in ImageFolder layout ({_LAYOUT}) or a .tar "
                         f"of one")
    if os.path.isfile(root) and os.path.splitext(root)[1] != ".tar":  # timm reads only .tar files
        raise ValueError(f"{root!r} is a file; expected a folder in ImageFolder layout ({_LAYOUT}) or a .tar of one")


def _scan(path: str) -> List[os.DirEntry]:
    try:
        with os.scandir(path) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as e:
        raise ValueError(f"cannot list the data folder {path!r}: {e.strerror}") from None


def _check_folder_layout(root: str) -> None:
    """Images only in ``<root>/<class>/``: none loose in ``root``, none in folders inside a class
    folder (timm names a class by the innermost folder), no symlink loops (timm's reader follows
    links), no image names on anything but a regular file (a named pipe would block the reader), and
    at least one class folder of images."""
    loose, nested, loops, special, classes = [], [], [], [], 0
    extensions = get_img_extensions()

    def walk(folder: str, depth: int, above: Tuple[str, ...]) -> bool:
        nonlocal classes
        entries = _scan(folder)
        named = [e for e in entries if e.name.lower().endswith(extensions) and not e.is_dir()]
        special.extend(f"{os.path.relpath(e.path, root)} ({_special(e.path)})" for e in named if not e.is_file())
        images = [e.name for e in named if e.is_file()]
        found = bool(images)
        for entry in (e for e in entries if e.is_dir()):
            name, real = os.path.relpath(entry.path, root), os.path.realpath(entry.path)
            if real in above:
                loops.append(f"{name} -> {os.readlink(entry.path)}")
            elif walk(entry.path, depth + 1, above + (real,)):
                found = True
                nested.extend([name] if depth == 1 else [])
        if depth == 0:
            loose.extend(images)
        elif depth == 1:
            classes += bool(images)
        return found

    walk(root, 0, (os.path.realpath(root),))
    splits = f" ({root!r} looks like a folder of splits: pass one of them, such as {nested[0].split(os.sep)[0]!r})" \
        if nested and not classes else ""
    if special:
        raise ValueError(f"{root!r} holds image names that are not regular files: {_listing(special)}; remove them "
                         f"(they are never opened: reading one could block forever)")
    _raise_layout_problems(root, loose, nested, loops, splits)
    if not classes:
        raise ValueError(f"data folder {root!r} holds no images in class folders; expected {_LAYOUT} with "
                         f"one of {', '.join(extensions)}")


def _check_tar_layout(root: str, reader) -> None:
    """The folders of a tar's images: ``<class>/<image>``, under one common folder if any (such as
    ``train/``); a tar of tars counts each inner tar as a folder."""
    paths = [os.path.normpath(os.path.join(os.path.splitext(inner.name)[0] if inner is not None else "", member.path))
             for member, _, inner in reader.samples]
    folders = sorted({os.path.dirname(p) for p in paths})
    top = min((os.path.dirname(f) for f in folders), key=lambda f: (f.count("/"), f))
    loose = [p for p in paths if os.path.dirname(p) == top]
    nested = [f for f in folders if f != top and os.path.dirname(f) != top]
    _raise_layout_problems(root, loose, nested, [])


def _raise_layout_problems(root: str, loose: List[str], nested: List[str], loops: List[str], hint: str = "") -> None:
    problems = []
    if loops:
        problems.append(f"symbolic links to a folder holding them (a loop): {_listing(loops)}; remove them")
    if nested:
        problems.append(f"images in folders inside a class folder: {_listing(nested)} (timm would read each as a "
                        f"class of its own name); move the images up into their class folder")
    if loose:
        problems.append(f"images outside a class folder: {_listing(loose)}; move them into their class folder")
    if problems:
        raise ValueError(f"{root!r} is not in the layout {_LAYOUT}: " + "; ".join(problems) + hint)


def _read_layout(root: str) -> Reader:
    """timm's reader of ``root`` (an ImageFolder or a .tar of one), after checking the layout:
    class folders of images, at least two."""
    _check_root(root)
    if os.path.isdir(root):
        _check_folder_layout(root)
        reader = create_reader("", root=root)
    else:
        try:
            reader = create_reader("", root=root)
        except (tarfile.TarError, ValueError) as e:  # timm's reader fails on a tar without images with a ValueError
            raise ValueError(f"cannot read {root!r} as a tar of {_LAYOUT} with {', '.join(get_img_extensions())} "
                             f"images ({e})") from None
        _check_tar_layout(root, reader)
    classes = list(getattr(reader, "class_to_idx", None) or reader.class_name_to_idx)
    if len(classes) < 2:
        raise ValueError(f"{root!r} holds images of one class ({classes[0]!r}); a classifier needs at least 2: "
                         f"expected {_LAYOUT} with a folder per class")
    return reader


def _file_problem(file, decode: bool) -> Optional[Tuple[str, str]]:
    """What is wrong with one image file, as (kind, reason), or None: its header (and PNG
    checksums) or, with ``decode``, the whole image."""
    try:
        with file, Image.open(file) as image:
            if image.mode not in _EIGHT_BIT_MODES and not _is_sixteen_bit(image):
                return "mode", f"mode {image.mode!r}"
            if decode:
                image.load()
            else:
                image.verify()
    except Image.DecompressionBombError as e:
        return "too large", str(e)
    except UnidentifiedImageError:
        return "unreadable", "not an image PIL can identify"
    except Exception as e:  # noqa: BLE001  (whatever a broken file makes PIL raise: OSError, SyntaxError, ...)
        return "unreadable", str(e)
    return None


def _check_files(reader: Reader, root: str, decode: bool = False) -> None:
    """Every file of ``reader`` is readable, within PIL's size limit and in a mode
    :func:`open_image` converts; all offending files in one error."""
    found = {"unreadable": [], "too large": [], "mode": []}
    for index in range(len(reader)):
        problem = _file_problem(reader[index][0], decode)
        if problem is not None:
            found[problem[0]].append(f"{reader.filename(index)} ({problem[1]})")
    unreadable, too_large, modes = found.values()
    problems = []
    if unreadable:
        problems.append(f"cannot read image {_files(unreadable)} of {root!r}: {_listing(unreadable)}; replace or "
                        f"remove the {_files(unreadable)}")
    if too_large:
        problems.append(f"image {_files(too_large)} of {root!r} above PIL's size limit (a guard against "
                        f"decompression bombs): {_listing(too_large)}; if intended, raise PIL.Image.MAX_IMAGE_PIXELS "
                        f"(None lifts the limit) before the dataset is built, otherwise downscale the "
                        f"{_files(too_large)}")
    if modes:
        problems.append(f"image {_files(modes)} of {root!r} in a mode that cannot be converted: {_listing(modes)}; "
                        f"save the {_files(modes)} as 8-bit (L, RGB, RGBA, P) or 16-bit grayscale PNG")
    if problems:
        raise ValueError("\n".join(problems))


def _file_check_cache() -> str:
    """Where passed file checks are remembered: ``$TIMM_EXITS_CACHE``, else ``$XDG_CACHE_HOME/timm_exits``
    (``~/.cache/timm_exits``), under ``file-checks/``."""
    root = os.environ.get("TIMM_EXITS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "timm_exits")
    return os.path.join(root, "file-checks")


def _listing_key(reader: Reader, root: str, decode: bool) -> str:
    """The identity of a file check: the kind of check and what it depends on (PIL's version and
    size limit), and every file's path, size, modification and change times and inode (a tar's own)."""
    digest = hashlib.sha256(f"{decode}:{PIL.__version__}:{Image.MAX_IMAGE_PIXELS}\n".encode())
    paths = [root] if os.path.isfile(root) else (reader.filename(i, absolute=True) for i in range(len(reader)))
    for path in paths:
        info = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ctime_ns}\0"
                      f"{info.st_ino}\n".encode())
    return digest.hexdigest()


def _check_files_once(reader: Reader, root: str, decode: bool) -> None:
    """:func:`_check_files`, unless the same listing passed the same check before (see
    :func:`_file_check_cache`); a pass is remembered, a cache that cannot be written is left alone."""
    remembered = os.path.join(_file_check_cache(), _listing_key(reader, root, decode))
    if os.path.isfile(remembered):
        return
    _check_files(reader, root, decode)
    try:
        os.makedirs(os.path.dirname(remembered), exist_ok=True)
        write_json(remembered, {"root": os.path.abspath(root), "files": len(reader), "decode": decode})
    except OSError:
        pass


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
    """Images and class indices from timm's reader (a folder or a tar), decoded with
    :func:`open_image` and transformed under a per-sample seed (see the module docstring).

    The layout is checked when the dataset is built (class folders of images, at least two). All
    offending files are reported in one error, before any training; a file that fails later is an
    error naming it (timm's own dataset skips it silently). A check passed is remembered under the
    listing (every file's path, size and modification time) in ``$TIMM_EXITS_CACHE`` (default
    ``~/.cache/timm_exits``): the same files are not checked again.

    Args:
        root: an ImageFolder root (one folder per class) or a tar file.
        transform: applied to each decoded image; ``None``: the PIL image itself.
        img_mode: the mode images are decoded in, one of ``IMAGE_MODES`` (``"RGB"``, ``"L"``).
        seed: with the epoch and the index, seeds each sample's random augmentation.
        check_files: ``True`` checks every file's header (readable, within PIL's size limit, a mode
            we convert), ``"decode"`` decodes every image, ``False`` checks the layout only.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, img_mode: str = "RGB", seed: int = 0,
                 check_files: Union[bool, str] = True):
        if check_files not in (True, False, "decode"):
            raise ValueError(f"check_files must be True (headers), 'decode' or False, got {check_files!r}")
        if img_mode not in IMAGE_MODES:
            raise ValueError(f"img_mode must be one of {', '.join(map(repr, IMAGE_MODES))} (PIL's names of RGB and "
                             f"grey images), got {img_mode!r}")
        self.root, self.transform, self.img_mode, self.seed = root, transform, img_mode, seed
        self.reader = _read_layout(root)
        if check_files:
            _check_files_once(self.reader, root, decode=check_files == "decode")
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
            with file:
                image = open_image(file, self.img_mode)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # OSError: unidentified or truncated files
            name = self.reader.filename(index, absolute=True)
            raise ValueError(f"cannot read image {name!r} of {self.root!r} ({e}); replace or remove the file") from None
        if self.transform is None:
            return image, target
        with _seeded(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2 ** 63):
            return self.transform(image), target


class EpochSampler(Sampler):
    """A random order of ``size`` indices drawn from (``seed``, epoch): the same on every process
    and in a resumed run (set the epoch with :meth:`set_epoch`).

    Args:
        size: the number of indices.
        seed: the seed the order is drawn from, with the epoch.
        shuffle: ``False`` gives ``0 .. size-1`` in order.
    """

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
    """timm's transform for the data ``config``, or the MSDNet CIFAR pipeline.

    Args:
        config: timm's data config (``input_size``, ``mean``, ``std``, ``crop_pct``,
            ``interpolation``).
        train: the training transform (augmented), else the evaluation one.
        kind: ``"timm"``, or ``"pad_crop"``: the MSDNet CIFAR pipeline (pad 4 with zeros, random
            crop to the input size, horizontal flip for training; normalisation only for evaluation).
        **augment: timm's training options such as ``scale``, ``hflip``, ``auto_augment``,
            ``re_prob`` (``kind="timm"``, training only).

    Returns:
        The transform, from a PIL image to a normalised tensor.
    """
    if kind == "timm":
        return create_transform(**config, is_training=train, **(augment if train else {}))
    if kind not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {kind!r}")
    size = tuple(config["input_size"][-2:])
    steps = [transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip()] if train else []
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])])


def image_dataset(root: str, model: Optional[nn.Module] = None, train: bool = False, config: Optional[dict] = None,
                  check_files: Union[bool, str] = True, **transform_kwargs) -> ImageFiles:
    """An ImageFolder (or tar) dataset with the model's preprocessing or the given data config.

    Args:
        root: an ImageFolder root or a tar file.
        model: the model whose preprocessing is used (timm's ``resolve_data_config``), when no
            ``config`` is given.
        train: the training transform (augmented), else the evaluation one.
        config: timm's data config (``input_size``, ``mean``, ``std``, ``crop_pct``,
            ``interpolation``); with neither, timm's defaults.
        check_files: as in :class:`ImageFiles`.
        **transform_kwargs: passed to :func:`image_transform` (``kind``, augmentation options).

    Returns:
        The dataset.
    """
    if config is None:
        config = resolve_data_config({}, model=model) if model is not None else {}
    return ImageFiles(root, image_transform(config, train, **transform_kwargs), check_files=check_files)


def class_map(dataset: Dataset) -> dict:
    """Class name -> index of a dataset read by timm (folder or tar reader)."""
    reader = getattr(dataset, "reader", None)
    mapping = getattr(reader, "class_to_idx", None) or getattr(reader, "class_name_to_idx", None)
    if not mapping:
        raise ValueError("cannot tell the classes of this dataset")
    return dict(mapping)


def class_names(dataset: Dataset) -> List[str]:
    """The class names of a dataset read by timm, in the order of their indices."""
    mapping = class_map(dataset)
    return sorted(mapping, key=mapping.get)


def num_classes_of(dataset: Dataset) -> int:
    return len(class_map(dataset))


def loader_workers(workers: Optional[int] = None) -> int:
    """Data-loader processes: ``workers``, or by default this process's share of the CPUs it may run
    on (``os.sched_getaffinity``, divided among the processes a launcher started on this machine), at
    most 8, so that a small machine is not oversubscribed and a large one keeps its GPUs fed."""
    if workers is not None:
        return workers
    return min(8, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def seeded_order(n: int, seed: int) -> List[int]:
    """A seeded random permutation of ``range(n)`` (the same on every machine and process).

    Args:
        n: the number of indices.
        seed: the permutation's seed.

    Returns:
        The permuted indices.
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def held_out_split(n: int, fractions: Dict[str, float], seed: int = 0) -> Dict[str, List[int]]:
    """Parts held out of ``n`` images, and the rest: one seeded order of ``range(n)``
    (:func:`seeded_order`) cut, in the order of ``fractions``, into ``round(n * fraction)`` indices
    per named part, the remaining indices last under ``"rest"``. A run's splits are
    ``{"test": ..., "validation": ...}`` of its training images, ``timm-exits evaluate --val-fraction``'s
    ``{"validation": ...}`` of its test images; the same seed and fractions always give the same images.

    Args:
        n: the number of images.
        fractions: the fraction of ``n`` each named part holds, in the order the parts are cut.
        seed: the order's seed.

    Returns:
        ``{name: indices}`` for each part, then ``"rest"`` (never empty).

    Raises:
        ValueError: the parts leave no rest.
    """
    order, start, parts = seeded_order(n, seed), 0, {}
    for name, fraction in fractions.items():
        parts[name] = order[start:start + round(n * fraction)]
        start += len(parts[name])
    if start >= n:
        counts = " and ".join(f"{len(parts[name])} {name} (fraction {fraction})" for name, fraction in fractions.items())
        raise ValueError(f"{n} images cannot give {counts} images and a rest: lower the fractions or add images")
    return {**parts, "rest": order[start:]}


def split_dataset(dataset: Dataset, fraction: float, seed: int = 0) -> Tuple[Subset, Subset]:
    """A seeded random split into (held-out ``fraction``, rest), by :func:`held_out_split`.

    Args:
        dataset: the dataset to split.
        fraction: the held-out fraction, in (0, 1).
        seed: the split's seed.

    Returns:
        ``(held_out, rest)``, two subsets of ``dataset``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    parts = held_out_split(len(dataset), {"held-out": fraction}, seed)
    if not parts["held-out"]:
        raise ValueError(f"{len(dataset)} images cannot be split with fraction {fraction}: it holds out none")
    return Subset(dataset, parts["held-out"]), Subset(dataset, parts["rest"])


def _digits_files(test_fraction: float, seed: int) -> Tuple[List[Tuple[str, str, int]], Any]:
    """scikit-learn's digits and where write_digits puts each: ``[(split, digit, index)]`` (a seeded split)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    n_test = round(len(order) * test_fraction)
    return [("val" if rank < n_test else "train", str(digits.target[index]), int(index))
            for rank, index in enumerate(order)], digits


def _is_our_digits(root: str, test_fraction: float, seed: int) -> bool:
    """Whether ``root`` was written by :func:`write_digits`: it holds the marker of a folder written
    whole (:func:`~timm_exits.files.atomic_folder`), or (an older version, unmarked, ``test/`` for
    ``val/``) exactly the files written here and nothing else."""
    if os.path.exists(os.path.join(root, MARKER)):
        return True
    if sorted(os.listdir(root)) != ["test", "train"] or not set(os.listdir(os.path.join(root, "test"))) <= set("0123456789"):
        return False
    placed, _ = _digits_files(test_fraction, seed)
    ours = sorted(os.path.join("test" if split == "val" else split, digit, f"{index:04d}.png")
                  for split, digit, index in placed)
    found = sorted(os.path.relpath(os.path.join(parent, f), root) for parent, _, files in os.walk(root) for f in files)
    return found == ours


def write_digits(root: str, size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> str:
    """Write scikit-learn's embedded digits (1,797 8 x 8 images, 10 classes) as grayscale PNGs in
    ImageFolder layout: ``root/train/<digit>/`` and ``root/val/<digit>/`` (a seeded split), marked
    as ours (:func:`~timm_exits.files.atomic_folder`). Nothing is downloaded; an existing folder is
    kept. Only a folder of ours is ever changed: one of an older version (no marker, ``test/`` for
    ``val/``, recognised by holding exactly the files written here) is updated; any other, such as a
    user's own ``train/`` and ``test/``, is never renamed.

    Args:
        root: the folder to write.
        size: the images' side, in pixels.
        test_fraction: the fraction of the images in ``val/``.
        seed: the split's seed.

    Returns:
        ``root``.
    """
    old, new = os.path.join(root, "test"), os.path.join(root, "val")
    if os.path.isdir(old) and not os.path.exists(new) and _is_our_digits(root, test_fraction, seed):
        os.replace(old, new)
    if os.path.isdir(root):
        return root
    placed, digits = _digits_files(test_fraction, seed)
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    with atomic_folder(root, kind="digits") as tmp:
        for split, digit, index in placed:
            folder = os.path.join(tmp, split, digit)
            os.makedirs(folder, exist_ok=True)
            image = Image.fromarray(images[index]).resize((size, size), Image.BILINEAR)
            image.save(os.path.join(folder, f"{index:04d}.png"))
    return root
