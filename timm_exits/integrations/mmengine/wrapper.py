"""``MultiExitDistributedDataParallel``: mmengine's DDP wrapper for a ``MultiExitClassifier``."""
from __future__ import annotations

from typing import Dict, Union

import torch
from mmengine.model import MMDistributedDataParallel
from mmengine.optim import OptimWrapper
from mmengine.registry import MODEL_WRAPPERS

__all__ = ["MultiExitDistributedDataParallel"]


@MODEL_WRAPPERS.register_module()
class MultiExitDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's DDP wrapper whose training step is the model's own (its technique's), each forward
    of it through this wrapper so that DDP averages the gradients; a technique that averages its own
    gradients (PCGrad, L2W's meta step) runs its forward in this wrapper's ``no_sync``."""

    def train_step(self, data: Union[dict, tuple, list], optim_wrapper: OptimWrapper) -> Dict[str, torch.Tensor]:
        """The model's :meth:`~timm_exits.integrations.mmengine.MultiExitClassifier.train_step`, its
        forwards through this wrapper.

        Args:
            data: the data loader's batch.
            optim_wrapper: mmengine's optimizer wrapper.

        Returns:
            The loss terms to log.
        """
        return self.module.train_step(data, optim_wrapper, forward=lambda images: self(images, mode="exits"), ddp=self)
