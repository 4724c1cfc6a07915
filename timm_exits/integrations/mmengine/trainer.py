"""mmengine as a technique's trainer (:class:`~timm_exits.train.trainer.Trainer`)."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, ContextManager, FrozenSet, Optional

import torch
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper
from torch import nn

from ...train.trainer import EPOCH, HELD_OUT, OPTIMIZER, UPDATES_IN_BATCH, Batch, Need, Outputs, Trainer

if TYPE_CHECKING:
    from .model import MultiExitClassifier

__all__ = ["MMEngineTrainer"]


class MMEngineTrainer(Trainer):
    """What an mmengine run gives a :class:`~.model.MultiExitClassifier`'s technique in one
    ``train_step``: the optimizer wrapper's backward, step, accumulation and gradient sync (public
    API only), the runner's epoch (from the message hub; an iteration-based loop is one epoch), the
    held-out batches of ``HeldOutBatchesHook`` and, through ``MultiExitDistributedDataParallel``, the
    forward through DDP.

    Args:
        classifier: the model whose ``train_step`` this is.
        optim_wrapper: mmengine's optimizer wrapper.
        forward: the training forward (default: the classifier's own; under DDP, the wrapper's).
        ddp: the DDP wrapper, for ``no_sync``; None: no DDP.
    """

    name = "mmengine"

    def __init__(self, classifier: "MultiExitClassifier", optim_wrapper: OptimWrapper,
                 forward: Optional[Callable[[torch.Tensor], Outputs]] = None, ddp: Optional[nn.Module] = None):
        self.classifier, self.optim_wrapper, self.ddp = classifier, optim_wrapper, ddp
        self._forward = forward or classifier.training_forward
        self._ends_update = optim_wrapper.should_sync()  # read before this batch's backward

    @property
    def provides(self) -> FrozenSet[Need]:
        given = {OPTIMIZER, EPOCH}
        if self.classifier.held_out is not None:
            given.add(HELD_OUT)
        if self._ends_update:  # every batch ends an update: no accumulation
            given.add(UPDATES_IN_BATCH)
        return frozenset(given)

    @property
    def model(self) -> nn.Module:
        return self.classifier.model

    def forward(self, images: torch.Tensor) -> Outputs:
        return self._forward(images)

    @property
    def updates(self) -> int:
        return self.classifier.updates

    @property
    def ends_update(self) -> bool:
        return self._ends_update

    def no_sync(self) -> ContextManager:
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optim_wrapper.optimizer

    @property
    def lr(self) -> float:
        return self.optim_wrapper.get_lr()["lr"][0]

    @property
    def epoch(self) -> int:
        return MessageHub.get_current_instance().get_info("epoch", 0)

    @property
    def epochs(self) -> int:
        return MessageHub.get_current_instance().get_info("max_epochs", 1)

    def held_out_batch(self, like: torch.Tensor) -> Batch:
        batch = self.classifier.data_preprocessor(self.classifier.held_out(), True)
        return batch["inputs"].to(like.device), batch["data_samples"].to(like.device)

    def update(self, loss: torch.Tensor) -> None:
        self.optim_wrapper.update_params(loss)
