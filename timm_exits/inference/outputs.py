"""Every exit's logits over a dataset, and anytime accuracy.

Budgeted evaluation and threshold search work on these cached outputs, as the references do; the
:class:`~timm_exits.inference.executor.EarlyExitExecutor` then applies the thresholds for real.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..models.multi_exit import exit_logits

__all__ = ["PREDICTORS", "predictor_of", "ExitOutputs", "collect_outputs", "anytime_accuracy"]

PREDICTORS = ("exits", "product_anytime")  # what answers at the exits (Thresholds.predictor)


def predictor_of(model: nn.Module) -> str:
    """What answers at ``model``'s exits: its ``predictor`` attribute (``'product_anytime'`` for a
    ProductAnytimeModel or an export of one), ``'exits'`` for every other model."""
    return getattr(model, "predictor", "exits")


@dataclass
class ExitOutputs:
    """Raw logits of every exit (``exits x samples x classes``, float32 as collected) and labels;
    the softmax probabilities are derived from them (:attr:`probs`, computed once). ``raw_logits``
    is False for outputs known only as probabilities (:meth:`from_probs`): their logits are
    log-probabilities, which what needs the model's own logits (product anytime) refuses."""

    logits: torch.Tensor
    labels: torch.Tensor
    raw_logits: bool = True

    def __post_init__(self):
        if self.logits.dim() != 3 or self.labels.shape != self.logits.shape[1:2]:
            raise ValueError(f"expected logits of shape (exits, samples, classes) and labels of shape (samples,), "
                             f"got {tuple(self.logits.shape)} and {tuple(self.labels.shape)}")

    @classmethod
    def from_probs(cls, probs: torch.Tensor, labels: torch.Tensor) -> "ExitOutputs":
        """Outputs known only as probabilities (e.g. a reference's cached softmax): their logarithms
        serve as logits, whose softmax gives the probabilities back."""
        return cls(probs.log(), labels, raw_logits=False)

    @cached_property
    def probs(self) -> torch.Tensor:
        """Softmax probabilities (``exits x samples x classes``)."""
        return self.logits.float().softmax(-1)

    @property
    def preds(self) -> torch.Tensor:
        """Every exit's prediction (``exits x samples``): the argmax of the softmax, as the references
        and the executor take it."""
        return self.probs.argmax(-1)

    @property
    def num_exits(self) -> int:
        return self.logits.shape[0]

    @property
    def num_samples(self) -> int:
        return self.logits.shape[1]

    def subset(self, index: torch.Tensor) -> "ExitOutputs":
        return ExitOutputs(self.logits[:, index], self.labels[index], self.raw_logits)


@torch.no_grad()
def collect_outputs(
        model: nn.Module,
        loader: Iterable,
        device: Optional[torch.device] = None,
        gather: Optional[Callable] = None,
        progress: bool = True,
) -> ExitOutputs:
    """Run ``model.forward_exits`` in eval mode over ``loader`` (batches of ``(images, labels)``); a
    plain model counts as one exit.

    ``gather`` (e.g. ``accelerator.gather_for_metrics``) collects the batches of every process.
    """
    model.eval()
    device = device or next(model.parameters()).device
    logits: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    for images, target in tqdm(loader, desc="evaluating", disable=not progress, leave=False):
        z = torch.stack([out.float() for out in exit_logits(model, images.to(device))])
        target = target.to(device)
        if gather is not None:
            z, target = gather((z.transpose(0, 1).contiguous(), target))
            z = z.transpose(0, 1)
        logits.append(z.cpu())
        labels.append(target.cpu())
    if not logits:
        raise ValueError("the loader gave no batches: is the dataset empty?")
    # product anytime answers with log-probabilities, not the logits product anytime is computed from
    return ExitOutputs(torch.cat(logits, 1), torch.cat(labels), raw_logits=predictor_of(model) == "exits")


def anytime_accuracy(outputs: ExitOutputs, topk: Sequence[int] = (1, 5), ensemble: bool = False) -> Dict[str, List[float]]:
    """Top-k accuracy (%) of every exit: ``{"top1": [...], "top5": [...]}``. With ``ensemble``, exit
    k's prediction is the running average of the softmaxes of exits 1..k (the Lua MSDNet's)."""
    probs = outputs.probs
    if ensemble:
        probs = probs.cumsum(0) / torch.arange(1, probs.shape[0] + 1, dtype=probs.dtype).view(-1, 1, 1)
    result = {}
    for k in topk:
        k_eff = min(k, probs.shape[-1])
        top = probs.topk(k_eff, dim=-1).indices
        hit = (top == outputs.labels.view(1, -1, 1)).any(-1).float()
        result[f"top{k}"] = (100 * hit.mean(1)).tolist()
    return result
