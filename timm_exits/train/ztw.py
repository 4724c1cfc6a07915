"""Zero Time Waste's phase B as the original code fits it: the geometric ensembles of a
:class:`~timm_exits.models.ztw.ZTWModel` fitted offline on the heads' cached log-probabilities."""
from __future__ import annotations

from typing import Iterable, List

import torch
import torch.nn.functional as F

from ..models.ztw import ZTWModel

__all__ = ["fit_ensembles_offline"]


def fit_ensembles_offline(model: ZTWModel, loader: Iterable, epochs: int = 501, lr: float = 1e-3,
                          batch_size: int = 512, seed: int = 0) -> List[float]:
    """Phase B as ZTW's original code fits it: the heads' log-probabilities of every batch computed
    once (the model in eval mode, nothing else trained), then each ensemble fitted on them alone with
    Adam (its own cross-entropy). The defaults are the original's (on ImageNet it uses 10 epochs), on
    the training set. Leaves the model in eval mode answering with its ensembles.

    Args:
        model: the ZTW model whose ensembles to fit.
        loader: ``(images, labels)`` batches.
        epochs: passes over the cached log-probabilities, at least 1.
        lr: Adam's learning rate, > 0.
        batch_size: the fitting batches' size (reshuffled every epoch), at least 1.
        seed: the reshuffling's seed.

    Returns:
        Each epoch's mean loss (the ensembles' cross-entropies averaged).
    """
    if not isinstance(model, ZTWModel):
        raise ValueError(f"fit_ensembles_offline fits the ensembles of a ZTWModel, got {type(model).__name__}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    model.train_part("ensembles").eval()
    stacks, labels = [], []
    with torch.no_grad():
        for images, targets in loader:
            state = model.forward_until(images, model.num_exits - 2)  # through the last ensembled head
            stacks.append(state[2][1])  # the heads' log-probabilities (B, heads, C)
            labels.append(torch.as_tensor(targets))
    if not stacks:
        raise ValueError("fit_ensembles_offline needs a loader with at least one batch")
    stacked, labels = torch.cat(stacks), torch.cat(labels).to(stacks[0].device)
    optimizer = torch.optim.Adam(model.ensembles.parameters(), lr=lr)
    generator, losses = torch.Generator().manual_seed(seed), []
    for _ in range(epochs):
        total = 0.0
        for index in torch.randperm(len(labels), generator=generator).split(batch_size):
            x, y = stacked[index], labels[index]
            terms = torch.stack([F.cross_entropy(ensemble(x[:, :i + 1]), y)
                                 for i, ensemble in enumerate(model.ensembles)])
            optimizer.zero_grad()
            terms.sum().backward()  # the ensembles share no parameter: each is fitted on its own loss
            optimizer.step()
            total += terms.mean().item() * len(index)
        losses.append(total / len(labels))
    return losses
