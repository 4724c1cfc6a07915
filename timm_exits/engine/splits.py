"""The splits of a run: training (augmented), held-out validation and test, from one seeded order."""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import Subset

from ..config import PREPROCESSING, resolve_preprocessing
from ..errors import AnotherProcessStopped, is_user_error
from ..data import (ImageFiles, class_map, held_out_split, image_transform, num_classes_of, write_digits)


EMBEDDED = {"digits": write_digits}
MIN_VAL_IMAGES = 100  # held-out images below which the budgeted thresholds are warned to be noisy


class Splits:
    """The splits of one run: training (augmented), held-out validation and test (both not).

    Args:
        config: the run's resolved config (its ``data`` section and ``train.seed``).
        accelerator: the run's accelerator: the main process checks the files first.
    """

    def __init__(self, config: Dict[str, Any], accelerator: Accelerator):
        data = config["data"]
        if data["dir"] is None:
            raise ValueError("no data: pass --data-dir (an ImageFolder root with train/ and val/ folders, or tars)")
        if data["embedded"] is not None:
            if data["embedded"] not in EMBEDDED:
                raise ValueError(f"data.embedded must be one of {list(EMBEDDED)} or None, got {data['embedded']!r}")
            with accelerator.main_process_first():
                EMBEDDED[data["embedded"]](data["dir"])
        seed, mode, check = config["train"]["seed"], data["img_mode"], data["check_files"]
        files = lambda split: _main_first(accelerator, lambda: ImageFiles(  # noqa: E731
            self._split(data["dir"], split), img_mode=mode, seed=seed, check_files=check))
        self.train_files = files(data["train_split"])
        self.held_out_files = self.train_files.with_transform(None)  # the same files, not augmented
        self.num_classes = num_classes_of(self.train_files)
        # one seeded order of the training split: [test (if held out)] [validation] [training]
        n = len(self.train_files)
        parts = held_out_split(n, {"test": data["test_fraction"] if data["test_split"] is None else 0.0,
                                   "validation": data["val_fraction"]}, data["split_seed"])
        n_val = len(parts["validation"])
        if data["test_split"] is None and not parts["test"]:
            raise ValueError("data.test_split is None: set data.test_fraction > 0 to hold out a test set")
        self.few_held_out = None if not 0 < n_val < MIN_VAL_IMAGES else (
            f"the budgeted thresholds are fitted on {n_val} held-out images (data.val_fraction={data['val_fraction']} "
            f"of {n}), fewer than {MIN_VAL_IMAGES}: they will be noisy; " +
            (f"set data.val_fraction to at least {math.ceil(MIN_VAL_IMAGES / n * 1000) / 1000}"
             if 2 * MIN_VAL_IMAGES <= n else "use more training images"))
        self.train = Subset(self.train_files, parts["rest"])
        self.val = Subset(self.held_out_files, parts["validation"]) if n_val else None
        if data["test_split"] is None:
            self.test = Subset(self.held_out_files, parts["test"])
        else:
            self.test = files(data["test_split"])
            if class_map(self.test) != class_map(self.train_files):
                raise ValueError(f"the class folders of {self.test.root!r} differ from those of {self.train_files.root!r}")

    @staticmethod
    def _split(root: str, split: str) -> str:
        path = os.path.join(root, split)
        return path + ".tar" if not os.path.exists(path) and os.path.isfile(path + ".tar") else path

    def set_transforms(self, config: Dict[str, Any], model: nn.Module) -> dict:
        """Give every split its transform: augmented for training, not for validation and test.

        Args:
            config: the run's resolved config (its ``data`` section).
            model: the model, whose pretrained config fills the preprocessing the config leaves unset.

        Returns:
            The resolved preprocessing (timm's data config).
        """
        data = config["data"]
        data_config = resolve_preprocessing(model, {k: data[k] for k in PREPROCESSING}, lambda key: f"data.{key}")
        self.train_files.transform = image_transform(data_config, True, data["transform"], **data["augment"])
        evaluation = image_transform(data_config, False, data["transform"])
        self.held_out_files.transform = evaluation
        if isinstance(self.test, ImageFiles):
            self.test.transform = evaluation
        return data_config


def _main_first(accelerator: Accelerator, build: Callable[[], Any]) -> Any:
    """``build()`` on the main process, then on the others: a dataset's file check runs once per
    machine (the others find it remembered); a data error on the main process stops the others quietly."""
    if accelerator.num_processes == 1:
        return build()
    if accelerator.is_main_process:
        try:
            built = build()
        except Exception as e:
            if is_user_error(e):
                broadcast_object_list([False])
            raise
        broadcast_object_list([True])
        return built
    if not broadcast_object_list([None])[0]:
        raise AnotherProcessStopped("the main process refused the data")
    return build()
