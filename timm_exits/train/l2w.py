"""L2W-DEN: learning to weight samples for dynamic early-exiting networks (Han et al., ECCV 2022).

A weight net maps each training sample's per-exit losses to per-exit loss weights; it is learnt
so that one step of the network on the weighted loss lowers the loss that adaptive inference
will see: on a meta batch, every exit is scored on the samples a budgeted inference would let
it classify. Every batch is split in halves (p1, p2):

1. meta step (every ``meta_interval``-th batch), on p1 with p2 as meta data:
   ``w = 1 + epsilon (m - mean(m))``, ``m = weight_net(sg(CE))`` (CE: B x K per-sample, per-exit
   losses); ``L_p = sum_k mean_i(w_ik CE_ik)``; ``theta' = `` one differentiable step of the
   network's SGD on ``L_p`` (its current lr, momentum buffers, weight decay; batch norm on copies
   of its statistics); the meta loss is ``sum_k mean CE_k(theta')`` over the p2 samples exit k
   takes in a budgeted assignment (exit k < K takes the ``floor(n q_k)`` most confident samples
   not yet taken, the last exit the rest; ``q_k`` proportional to ``target_p ** k``); its gradient
   updates the weight net (Adam);
2. real step on p1: the weights of the updated net (no gradient), ``L = sum_k mean_i(w_ik CE_ik)``,
   an optimizer step;
3. the same with the halves swapped: two optimizer steps per batch.

Under DDP every process takes the meta step on its own halves; the weight net's gradients are
averaged over the processes by hand (they come from ``torch.autograd.grad``, which DDP does not
reduce), so the weight nets stay identical.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..quotas import exit_quotas
from .deconfliction import average_over_processes
from .virtual_step import functional_exits, sgd_virtual_step

__all__ = ["WeightNet", "CONSTRAINTS", "INPUT_TYPES", "sample_weights", "exit_terms", "weighted_loss",
           "budget_allocation", "allocated_loss", "split_halves", "l2w_meta_step"]

CONSTRAINTS = ("mat", "col", "row")
INPUT_TYPES = ("loss", "conf", "both")
Batch = Tuple[torch.Tensor, torch.Tensor]


class WeightNet(nn.Module):
    """The weight net: an MLP ``inputs -> hidden -> K`` (ReLU, tanh output).

    Args:
        num_exits: K.
        hidden_size: the width of the hidden layer.
        input_type: what the net reads of each sample: the per-exit losses (``'loss'``, K inputs),
            confidences (``'conf'``, K) or both (``'both'``, 2K).
    """

    def __init__(self, num_exits: int, hidden_size: int = 500, input_type: str = "loss"):
        super().__init__()
        if input_type not in INPUT_TYPES:
            raise ValueError(f"l2w input_type must be one of {INPUT_TYPES}, got {input_type!r}")
        self.input_type = input_type
        self.hidden = nn.Linear(num_exits * (2 if input_type == "both" else 1), hidden_size)
        self.out = nn.Linear(hidden_size, num_exits)

    def forward(self, losses: torch.Tensor, confidences: torch.Tensor) -> torch.Tensor:
        """The net's output for a batch (no gradient flows into its inputs).

        Args:
            losses, confidences: the per-sample, per-exit losses and confidences, each (B, K).

        Returns:
            The weights' raw output ``m``, (B, K), in (-1, 1).
        """
        x = {"loss": losses, "conf": confidences}.get(self.input_type)
        x = torch.cat([losses, confidences], 1) if x is None else x
        return torch.tanh(self.out(F.relu(self.hidden(x.detach()))))


def sample_weights(m: torch.Tensor, epsilon: float, constraint: str = "col") -> torch.Tensor:
    """The per-sample, per-exit loss weights ``1 + epsilon (m - mean(m))``.

    Args:
        m: the weight net's output, (B, K).
        epsilon: how far a weight may move from 1.
        constraint: where the mean is taken: over everything (``'mat'``), per sample (``'col'``)
            or per exit (``'row'``).

    Returns:
        The weights, (B, K).
    """
    if constraint == "mat":
        centre = m.mean()
    elif constraint == "col":
        centre = m.mean(1, keepdim=True)
    elif constraint == "row":
        centre = m.mean(0, keepdim=True)
    else:
        raise ValueError(f"l2w constraint_dimension must be one of {CONSTRAINTS}, got {constraint!r}")
    return 1 + epsilon * (m - centre)


def exit_terms(logits: Sequence[torch.Tensor], target: torch.Tensor,
               label_smoothing: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-exit cross-entropies and max-softmax confidences.

    Args:
        logits: the K exits' logits, each (B, C).
        target: class indices (B,), or soft targets (B, C) (mixup), which are used as given.
        label_smoothing: for class-index targets.

    Returns:
        The cross-entropies and the confidences, both (B, K).
    """
    smoothing = 0.0 if target.dim() > 1 else label_smoothing
    ce = torch.stack([F.cross_entropy(z, target, reduction="none", label_smoothing=smoothing) for z in logits], 1)
    confidence = torch.stack([z.softmax(-1).amax(-1) for z in logits], 1)
    return ce, confidence


def weighted_loss(ce: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k mean_i(w_ik CE_ik)``.

    Args:
        ce: the cross-entropies, (B, K).
        weights: their weights, (B, K).

    Returns:
        The loss, a scalar.
    """
    return (weights * ce).mean(0).sum()


def budget_allocation(confidences: torch.Tensor, fractions: Sequence[float]) -> List[torch.Tensor]:
    """The samples each exit takes: exit k < K takes the ``floor(B fractions[k])`` samples of
    highest confidence at exit k that no earlier exit took (ties: the lower index first), the last
    exit the rest.

    Args:
        confidences: each sample's confidence at each exit, (B, K).
        fractions: each exit's share of the batch (:func:`~timm_exits.quotas.exit_quotas`).

    Returns:
        One index tensor per exit, into the B rows of ``confidences``.
    """
    n, num_exits = confidences.shape
    quotas = exit_quotas(n, fractions)
    taken = torch.zeros(n, dtype=torch.bool, device=confidences.device)
    chosen = []
    for k in range(num_exits):
        order = confidences[:, k].argsort(descending=True, stable=True)
        free = order[~taken[order]]
        picked = free if k == num_exits - 1 else free[:quotas[k]]
        taken[picked] = True
        chosen.append(picked)
    return chosen


def allocated_loss(logits: Sequence[torch.Tensor], target: torch.Tensor, fractions: Sequence[float],
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """The meta loss: the sum over exits of the mean cross-entropy over the samples each exit takes
    (:func:`budget_allocation` on the detached confidences); an exit that takes none adds nothing.

    Args:
        logits: the K exits' logits, each (B, C).
        target: class indices (B,) or soft targets (B, C).
        fractions: each exit's share of the batch.
        label_smoothing: for class-index targets.

    Returns:
        The loss, a scalar.
    """
    smoothing = 0.0 if target.dim() > 1 else label_smoothing
    confidences = torch.stack([z.detach().softmax(-1).amax(-1) for z in logits], 1)
    total = logits[0].new_zeros(())
    for z, index in zip(logits, budget_allocation(confidences, fractions)):
        if len(index):
            total = total + F.cross_entropy(z[index], target[index], label_smoothing=smoothing)
    return total


def split_halves(images: torch.Tensor, target: torch.Tensor) -> Tuple[Batch, Batch]:
    """The two halves of a batch (``chunk(2)``: an odd batch's first half has the extra sample).

    Args:
        images, target: the batch, at least 2 samples.

    Returns:
        ``((images, target), (images, target))``, the two halves.

    Raises:
        ValueError: the batch has fewer than 2 samples.
    """
    if len(images) < 2:
        raise ValueError(f"l2w splits every batch into two halves (one trains, one is the meta data): the batch "
                         f"size must be at least 2, got {len(images)}")
    (x1, x2), (y1, y2) = images.chunk(2), target.chunk(2)
    return (x1, y1), (x2, y2)


def l2w_meta_step(model: nn.Module, weight_net: WeightNet, weight_optimizer: torch.optim.Optimizer, optimizer,
                  train: Batch, meta: Batch, epsilon: float, constraint: str, fractions: Sequence[float],
                  label_smoothing: float = 0.0) -> Dict[str, torch.Tensor]:
    """One update of the weight net: the pseudo loss on ``train``, a differentiable step of the
    network's SGD ``optimizer`` (:func:`~timm_exits.train.virtual_step.sgd_virtual_step`), the
    allocated meta loss on ``meta``, its gradient averaged over the processes, a step of
    ``weight_optimizer``. The model, its buffers and ``optimizer``'s state are unchanged.

    Args:
        model: the multi-exit network.
        weight_net: the weight net to update.
        weight_optimizer: its optimizer.
        optimizer: the network's ``torch.optim.SGD`` (its lr, momentum buffers and weight decay).
        train, meta: ``(images, target)``: the pseudo step's batch and the meta batch.
        epsilon, constraint: as in :func:`sample_weights`.
        fractions: each exit's share of the meta batch (:func:`budget_allocation`).
        label_smoothing: for class-index targets.

    Returns:
        ``{'weights': ..., 'meta_loss': ..., 'grads': ...}``: the pseudo weights (B, K) and the
        meta loss, detached, and the weight net's gradients (a list, one per parameter).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    ce, confidence = exit_terms(functional_exits(model, params, train[0], buffers), train[1], label_smoothing)
    weights = sample_weights(weight_net(ce, confidence), epsilon, constraint)
    grads = torch.autograd.grad(weighted_loss(ce, weights), list(params.values()), create_graph=True,
                                allow_unused=True)
    stepped = sgd_virtual_step(params, grads, optimizer)
    del grads
    meta_loss = allocated_loss(functional_exits(model, stepped, meta[0], buffers), meta[1], fractions,
                               label_smoothing)
    net_params = list(weight_net.parameters())
    net_grads = list(torch.autograd.grad(meta_loss, net_params))
    average_over_processes(net_grads)  # the same update on every process
    for p, g in zip(net_params, net_grads):
        p.grad = g
    weight_optimizer.step()
    return {"weights": weights.detach(), "meta_loss": meta_loss.detach(), "grads": net_grads}
