"""A plain PyTorch training loop as a trainer: the shortest way to run a technique by hand (and what
the benchmarks and tests use)::

    technique = HDKD(interval=4)
    model = technique.prepare(timm.create_model("msdnet_cifar_5exit"))
    loop = PlainTrainer(model, technique, torch.optim.SGD(model.parameters(), lr=0.1), held_out=val_loader)
    for images, target in loader:
        losses = loop.step(images, target)
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Iterable, Optional

import torch
from torch import nn

from .techniques import Technique, TrainingForward
from .trainer import EPOCH, HELD_OUT, OPTIMIZER, UPDATES_IN_BATCH, Batch, Need, Outputs, Trainer, check_trainer, cycle

__all__ = ["PlainTrainer"]


class PlainTrainer(Trainer):
    """One process, no gradient accumulation: every batch is one optimizer update.

    Args:
        model: the model ``technique`` prepared.
        technique: the technique to run.
        optimizer: the network's optimizer.
        held_out: batches of a held-out split, cycled (for HDKD).
        epochs: the run's number of epochs (for per-epoch loss weights; set :attr:`current_epoch`).
    """

    name = "a plain loop (PlainTrainer)"

    def __init__(self, model: nn.Module, technique: Technique, optimizer: torch.optim.Optimizer,
                 held_out: Optional[Iterable[Batch]] = None, epochs: int = 1):
        self.technique, self._optimizer, self._epochs = technique, optimizer, epochs
        self.training_forward = TrainingForward(model, technique)
        self.next_held_out = cycle(held_out) if held_out is not None else None
        self.steps, self.current_epoch = 0, 0
        check_trainer(technique, self)

    @property
    def provides(self) -> FrozenSet[Need]:
        return frozenset({OPTIMIZER, EPOCH, UPDATES_IN_BATCH} | ({HELD_OUT} if self.next_held_out else set()))

    @property
    def model(self) -> nn.Module:
        return self.training_forward.model

    def forward(self, images: torch.Tensor) -> Outputs:
        return self.training_forward(images)

    @property
    def updates(self) -> int:
        return self.steps

    @property
    def ends_update(self) -> bool:
        return True

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    @property
    def epoch(self) -> int:
        return self.current_epoch

    @property
    def epochs(self) -> int:
        return self._epochs

    def held_out_batch(self, like: torch.Tensor) -> Batch:
        images, target = self.next_held_out()
        return images.to(like.device), target.to(like.device)

    def update(self, loss: torch.Tensor) -> None:
        loss.backward()
        self._optimizer.step()
        self._optimizer.zero_grad()

    def step(self, images: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        """One batch: the technique's step, the backward and the optimizer update.

        Args:
            images: the batch's images.
            target: class indices, or soft targets (mixup).

        Returns:
            The step's loss terms, as floats.
        """
        result = self.technique.train_step(self, images, target)
        self.update(result.loss)
        self.steps += 1
        return {name: float(term.detach()) for name, term in result.terms.items()}
