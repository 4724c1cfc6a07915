"""The accelerate engine as a technique's trainer (:class:`~timm_exits.train.trainer.Trainer`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, ContextManager, FrozenSet

import torch
from torch import nn

from ..train.trainer import EPOCH, HELD_OUT, OPTIMIZER, UPDATES_IN_BATCH, Batch, Need, Outputs, Trainer

if TYPE_CHECKING:
    from .phase import TrainingPhase

__all__ = ["EngineTrainer"]


class EngineTrainer(Trainer):
    """What a phase of the engine gives its technique: the prepared (DDP) training forward,
    accelerate's gradient sync and accumulation, the optimizer, the epoch, batches of the held-out
    split (``data.val_fraction > 0``) and updates inside a batch (``train.grad_accum_steps=1``)."""

    name = "the accelerate engine"

    def __init__(self, phase: "TrainingPhase"):
        self.phase = phase

    @property
    def provides(self) -> FrozenSet[Need]:
        given = {OPTIMIZER, EPOCH}
        if self.phase.data.val is not None:
            given.add(HELD_OUT)
        if self.accumulation == 1:
            given.add(UPDATES_IN_BATCH)
        return frozenset(given)

    @property
    def model(self) -> nn.Module:
        return self.phase.model

    def forward(self, images: torch.Tensor) -> Outputs:
        return self.phase.forward(images)

    @property
    def updates(self) -> int:
        return self.phase.state["updates"]

    @property
    def ends_update(self) -> bool:
        return self.phase.accelerator.sync_gradients

    @property
    def accumulation(self) -> int:
        return self.phase.accelerator.gradient_accumulation_steps

    def no_sync(self) -> ContextManager:
        return self.phase.accelerator.no_sync(self.phase.forward)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.phase.optimizer

    @property
    def epoch(self) -> int:
        return self.phase.state["epoch"]

    @property
    def epochs(self) -> int:
        return self.phase.epochs

    def held_out_batch(self, like: torch.Tensor) -> Batch:
        """A batch of the held-out split as large as ``like``'s, drawn from (seed, update, process):
        the same after a resume."""
        phase = self.phase
        seed = (phase.config["train"]["seed"] * 1_000_003 + self.updates) * 101 + phase.accelerator.process_index
        index = torch.randperm(len(phase.data.val), generator=torch.Generator().manual_seed(seed))[:len(like)]
        images, target = zip(*(phase.data.val[i] for i in index.tolist()))
        return torch.stack(images).to(like.device), torch.tensor(target, device=like.device)

    def update(self, loss: torch.Tensor) -> None:
        self.phase.update(loss, {"loss": loss})
