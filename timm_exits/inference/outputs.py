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
from ..models.predictors import EXITS, PREDICTORS, predictor_of

__all__ = ["PREDICTORS", "predictor_of", "ExitOutputs", "collect_outputs", "anytime_accuracy"]


@dataclass
class ExitOutputs:
    """Every exit's outputs over a dataset (``exits x samples x classes``) and the labels, kept as given:
    raw logits (float32 as collected; :attr:`probs` is their softmax, computed once), or probabilities
    (:meth:`from_probs`, ``logits`` None), which :attr:`probs` returns unchanged, so every consumer
    reads exactly them.

    Args:
        logits: every exit's logits, ``(exits, samples, classes)``; None for outputs given as
            probabilities.
        labels: the class index of each sample, ``(samples,)``.
        raw_logits: False for outputs that are not a model's raw logits (probabilities, or the
            log-probabilities a registered predictor such as product anytime answers with): what needs
            raw logits (product anytime) refuses them.
        given_probs: the probabilities, set by :meth:`from_probs` (exactly one of ``logits`` and
            ``given_probs`` is given).
    """

    logits: Optional[torch.Tensor]
    labels: torch.Tensor
    raw_logits: bool = True
    given_probs: Optional[torch.Tensor] = None

    def __post_init__(self):
        if (self.logits is None) == (self.given_probs is None):
            raise ValueError("give the logits or (with ExitOutputs.from_probs) the probabilities, not both or neither")
        if self._values.dim() != 3 or self.labels.shape != self._values.shape[1:2]:
            what = "logits" if self.logits is not None else "probabilities"
            raise ValueError(f"expected {what} of shape (exits, samples, classes) and labels of shape (samples,), "
                             f"got {tuple(self._values.shape)} and {tuple(self.labels.shape)}")

    @classmethod
    def from_probs(cls, probs: torch.Tensor, labels: torch.Tensor) -> "ExitOutputs":
        """Outputs known only as probabilities (e.g. a reference's cached softmax), kept bit for bit: no
        logarithm and softmax round trip, no renormalisation of rows that do not sum to one (rounded
        outputs).

        Args:
            probs: every exit's probabilities, ``(exits, samples, classes)``, each in [0, 1] (logits
                go to ``ExitOutputs(logits, labels)``).
            labels: the class index of each sample, ``(samples,)``.

        Returns:
            Outputs whose :attr:`probs` is ``probs`` itself and whose ``logits`` is None.
        """
        if not ((probs >= 0) & (probs <= 1)).all():
            raise ValueError("expected probabilities in [0, 1] (for logits use ExitOutputs(logits, labels))")
        return cls(None, labels, raw_logits=False, given_probs=probs)

    @cached_property
    def probs(self) -> torch.Tensor:
        """The probabilities (``exits x samples x classes``): those given, else the float32 softmax of the logits."""
        return self.given_probs if self.given_probs is not None else self.logits.float().softmax(-1)

    @property
    def preds(self) -> torch.Tensor:
        """Every exit's prediction (``exits x samples``): the argmax of :attr:`probs`, as the references
        and the executor take it."""
        return self.probs.argmax(-1)

    @property
    def num_exits(self) -> int:
        return self._values.shape[0]

    @property
    def num_samples(self) -> int:
        return self._values.shape[1]

    @property
    def _values(self) -> torch.Tensor:
        """What was given: the logits or the probabilities."""
        return self.logits if self.logits is not None else self.given_probs

    def subset(self, index: torch.Tensor) -> "ExitOutputs":
        """The outputs of some samples, kept as given."""
        def pick(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[:, index]

        return ExitOutputs(pick(self.logits), self.labels[index], self.raw_logits, pick(self.given_probs))


@torch.no_grad()
def collect_outputs(
        model: nn.Module,
        loader: Iterable,
        device: Optional[torch.device] = None,
        gather: Optional[Callable] = None,
        progress: bool = True,
) -> ExitOutputs:
    """Run ``model.forward_exits`` in eval mode over ``loader``; a plain model counts as one exit.

    Args:
        model: the model, set to eval mode here.
        loader: batches of ``(images, labels)``.
        device: where the images go (default: the model's device).
        gather: collects the batches of every process (e.g. ``accelerator.gather_for_metrics``).
        progress: show a progress bar.

    Returns:
        Every exit's float32 logits and the labels, on the CPU.
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
    # a registered predictor (product anytime, MIE, ...) answers with log-probabilities, not raw logits
    return ExitOutputs(torch.cat(logits, 1), torch.cat(labels), raw_logits=predictor_of(model) == EXITS)


def anytime_accuracy(outputs: ExitOutputs, topk: Sequence[int] = (1, 5), ensemble: bool = False) -> Dict[str, List[float]]:
    """Top-k accuracy (%) of every exit: ``{"top1": [...], "top5": [...]}``.

    Args:
        outputs: every exit's outputs and the labels.
        topk: the k values; a k above the number of classes counts as all classes.
        ensemble: exit k's prediction is the running average of the probabilities of exits 1..k (the
            Lua MSDNet's).

    Returns:
        ``{"top<k>": [accuracy of each exit]}`` for each k.
    """
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
