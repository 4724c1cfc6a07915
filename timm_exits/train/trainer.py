"""The trainer interface: what a technique's training step may ask of the loop that runs it.

Every trainer (the accelerate engine, the mmengine model, timm's training task) implements
:class:`Trainer` once; a technique's :meth:`~timm_exits.train.techniques.Technique.train_step` is
written against it and never against a trainer. What only some trainers can give is a
:class:`Need`: a technique declares the ones it has (``Technique.needs``), and
:func:`check_trainer`, the one place where this is decided, refuses a technique whose needs the
trainer does not provide, naming the trainers that do.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, FrozenSet, Iterable, Iterator, List, Optional,
                    Tuple, Union)

import torch
from torch import nn

if TYPE_CHECKING:
    from .techniques import Technique

__all__ = ["cycle", "Need", "HELD_OUT", "OPTIMIZER", "UPDATES_IN_BATCH", "EPOCH", "Trainer", "TrainerError", "check_trainer",
           "Batch", "Outputs"]

Batch = Tuple[torch.Tensor, torch.Tensor]
Outputs = Union[List[torch.Tensor], Tuple[List[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class Need:
    """Something a technique's step needs that not every trainer gives.

    Args:
        what: what it is ("the epoch").
        how: how each trainer that gives it is told to, for the error of one that does not.
    """

    what: str
    how: str


HELD_OUT = Need("batches of a held-out split",
                "the accelerate engine (data.val_fraction > 0), mmengine (custom_hooks=[dict(type='HeldOutBatchesHook', "
                "dataloader=...)]) or timm's task (MultiExitTask(..., held_out=loader))")
OPTIMIZER = Need("the network's optimizer",
                 "the accelerate engine, mmengine, or timm's task after task.attach_optimizer(optimizer)")
UPDATES_IN_BATCH = Need("optimizer updates inside a batch, without gradient accumulation",
                        "the accelerate engine (train.grad_accum_steps=1) or mmengine (accumulative_counts=1)")
EPOCH = Need("the epoch", "the accelerate engine, mmengine (an epoch-based train loop) or timm's task (call "
                          "task.set_epoch(epoch, epochs) at each epoch's start)")


class TrainerError(ValueError):
    """A technique that the trainer asked to run it cannot run."""


class Trainer(abc.ABC):
    """What a trainer gives a technique's step. ``name`` says which trainer it is, ``provides`` the
    :class:`Need` s it meets as it is set up (the rest it always gives: the training forward, the
    update counters, gradient-sync control)."""

    name: ClassVar[str] = ""

    @property
    def provides(self) -> FrozenSet[Need]:
        """The needs this trainer meets as it is set up (none by default)."""
        return frozenset()

    @property
    @abc.abstractmethod
    def model(self) -> nn.Module:
        """The network being trained, unwrapped (the one the technique prepared)."""

    @abc.abstractmethod
    def forward(self, images: torch.Tensor) -> Outputs:
        """The training forward of the model (through the distributed wrapper, if any)."""

    @property
    @abc.abstractmethod
    def updates(self) -> int:
        """Optimizer updates taken before this batch, over the whole run."""

    @property
    @abc.abstractmethod
    def ends_update(self) -> bool:
        """Whether the optimizer steps after this batch (the last one of an accumulation)."""

    @property
    def accumulation(self) -> int:
        """Batches whose gradients one optimizer update sums."""
        return 1

    def no_sync(self) -> ContextManager:
        """A context whose forward passes the distributed wrapper does not synchronise: a technique
        that averages its gradients over the processes itself runs its forward in it."""
        return contextlib.nullcontext()

    @property
    def lr(self) -> float:
        """The network's learning rate now (the first parameter group's)."""
        return self.optimizer.param_groups[0]["lr"]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The network's optimizer (:data:`OPTIMIZER`)."""
        raise self._lacks(OPTIMIZER)

    @property
    def epoch(self) -> int:
        """The 0-based epoch (:data:`EPOCH`)."""
        raise self._lacks(EPOCH)

    @property
    def epochs(self) -> int:
        """The number of epochs of the run (:data:`EPOCH`)."""
        raise self._lacks(EPOCH)

    def held_out_batch(self, like: torch.Tensor) -> Batch:
        """A batch of the held-out split, on ``like``'s device (:data:`HELD_OUT`)."""
        raise self._lacks(HELD_OUT)

    def update(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` and take an optimizer update now, inside the batch (:data:`UPDATES_IN_BATCH`)."""
        raise self._lacks(UPDATES_IN_BATCH)

    def _lacks(self, need: Need) -> TrainerError:
        return TrainerError(f"{self.name} cannot give {need.what}; {need.how} can")


def check_trainer(technique: "Technique", trainer: Trainer) -> None:
    """Refuse, before training, a technique whose needs ``trainer`` does not meet.

    Args:
        technique: the technique to run (its :attr:`~timm_exits.train.techniques.Technique.needs`).
        trainer: the trainer to run it (its :attr:`Trainer.provides`).

    Raises:
        TrainerError: a need is not met; it names the technique, what it needs, the trainer and
            the trainers that meet the need.
    """
    for need in sorted(technique.needs - trainer.provides, key=lambda n: n.what):
        raise TrainerError(f"{type(technique).__name__} needs {need.what}, which {trainer.name} does not give here; "
                           f"run it with {need.how}")


def cycle(batches: Iterable[Any]) -> Callable[[], Any]:
    """A function that returns the next of ``batches`` (e.g. a held-out ``DataLoader``), starting
    over at its end (without keeping the batches, as ``itertools.cycle`` would); an iterable that
    gives no batch is a ValueError."""
    iterator: Optional[Iterator] = None

    def next_batch() -> Any:
        nonlocal iterator
        for attempt in range(2):
            if iterator is None or attempt:
                iterator = iter(batches)
            try:
                return next(iterator)
            except StopIteration:
                continue
        raise ValueError("the held-out batches are empty: the iterable gives no batch")

    return next_batch
