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

from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..quotas import exit_quotas, geometric_fractions
from .deconfliction import average_over_processes
from .techniques import Backward, Outputs, Technique
from .virtual_step import functional_exits, sgd_virtual_step

__all__ = ["L2W", "WeightNet", "CONSTRAINTS", "INPUT_TYPES", "sample_weights", "exit_terms", "weighted_loss",
           "budget_allocation", "allocated_loss", "split_halves", "l2w_meta_step"]

CONSTRAINTS = ("mat", "col", "row")
INPUT_TYPES = ("loss", "conf", "both")
Batch = Tuple[torch.Tensor, torch.Tensor]


class WeightNet(nn.Module):
    """The weight net: an MLP ``inputs -> hidden -> K`` (ReLU, tanh output); its input is the
    per-exit losses (``input_type='loss'``, K), confidences (``'conf'``, K) or both (2K)."""

    def __init__(self, num_exits: int, hidden_size: int = 500, input_type: str = "loss"):
        super().__init__()
        if input_type not in INPUT_TYPES:
            raise ValueError(f"l2w input_type must be one of {INPUT_TYPES}, got {input_type!r}")
        self.input_type = input_type
        self.hidden = nn.Linear(num_exits * (2 if input_type == "both" else 1), hidden_size)
        self.out = nn.Linear(hidden_size, num_exits)

    def forward(self, losses: torch.Tensor, confidences: torch.Tensor) -> torch.Tensor:
        x = {"loss": losses, "conf": confidences}.get(self.input_type)
        x = torch.cat([losses, confidences], 1) if x is None else x
        return torch.tanh(self.out(F.relu(self.hidden(x.detach()))))


def sample_weights(m: torch.Tensor, epsilon: float, constraint: str = "col") -> torch.Tensor:
    """``1 + epsilon (m - mean(m))`` for the weight net's output ``m`` (B x K); the mean is over
    everything (``'mat'``), per sample (``'col'``) or per exit (``'row'``)."""
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
    """Per-sample, per-exit cross-entropies and max-softmax confidences (both B x K); soft targets
    (mixup) are used as given."""
    smoothing = 0.0 if target.dim() > 1 else label_smoothing
    ce = torch.stack([F.cross_entropy(z, target, reduction="none", label_smoothing=smoothing) for z in logits], 1)
    confidence = torch.stack([z.softmax(-1).amax(-1) for z in logits], 1)
    return ce, confidence


def weighted_loss(ce: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k mean_i(w_ik CE_ik)``."""
    return (weights * ce).mean(0).sum()


def budget_allocation(confidences: torch.Tensor, fractions: Sequence[float]) -> List[torch.Tensor]:
    """The samples each exit takes (indices into the B rows of ``confidences``, B x K): exit k < K
    takes the ``floor(B fractions[k])`` samples of highest confidence at exit k that no earlier
    exit took (ties: the lower index first), the last exit the rest."""
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
    (:func:`budget_allocation` on the detached confidences); an exit that takes none adds nothing."""
    smoothing = 0.0 if target.dim() > 1 else label_smoothing
    confidences = torch.stack([z.detach().softmax(-1).amax(-1) for z in logits], 1)
    total = logits[0].new_zeros(())
    for z, index in zip(logits, budget_allocation(confidences, fractions)):
        if len(index):
            total = total + F.cross_entropy(z[index], target[index], label_smoothing=smoothing)
    return total


def split_halves(images: torch.Tensor, target: torch.Tensor) -> Tuple[Batch, Batch]:
    """The two halves of a batch (``chunk(2)``: an odd batch's first half has the extra sample)."""
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
    Returns the pseudo weights (B x K), the meta loss and the weight net's gradients."""
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


class L2W(Technique):
    """``l2w``: L2W-DEN's learnt sample weights (see the module doc).

    Options (``technique.l2w``): ``epsilon`` (0.8 CIFAR, 0.3 ImageNet), ``constraint_dimension``
    (``'col'`` CIFAR, ``'mat'`` ImageNet, ``'row'``), ``input_type`` (``'loss'``, ``'conf'``,
    ``'both'``), ``hidden_size`` (500), ``meta_interval`` (a meta step on every such batch of an
    epoch: 1 CIFAR, 100 ImageNet), ``lr`` and ``weight_decay`` (the weight net's Adam, 1e-4 each),
    ``lr_follows_schedule`` (the Adam lr scaled as the network's lr is by its schedule, as the
    reference's cosine does), ``target_p`` (the budget's ratio: exit k's share of the meta
    samples is proportional to ``target_p ** k``; 0.75). The weight net is initialised from
    ``seed`` (the same on every process).

    A trainer calls :meth:`step` with the optimizer (SGD: the virtual step follows it) and the
    batch's index in its epoch; it takes the first half's optimizer step through ``update`` and
    back-propagates the second half's loss, whose optimizer step is the trainer's.
    """

    loss: ClassVar[str] = "l2w"
    OPTIONS: ClassVar[Tuple[str, ...]] = ("epsilon", "constraint_dimension", "input_type", "hidden_size",
                                          "meta_interval", "lr", "weight_decay", "lr_follows_schedule", "target_p")

    def __init__(self, epsilon: float = 0.8, constraint_dimension: str = "col", input_type: str = "loss",
                 hidden_size: int = 500, meta_interval: int = 1, lr: float = 1e-4, weight_decay: float = 1e-4,
                 lr_follows_schedule: bool = True, target_p: float = 0.75, label_smoothing: float = 0.0,
                 seed: int = 0, gradient_equilibrium: bool = False, deconfliction: Optional[str] = None):
        if gradient_equilibrium or deconfliction is not None:
            raise ValueError("l2w differentiates through a step of the network (second order): it does not combine "
                             "with gradient_equilibrium or deconfliction")
        super().__init__()
        if constraint_dimension not in CONSTRAINTS:
            raise ValueError(f"l2w constraint_dimension must be one of {CONSTRAINTS}, got {constraint_dimension!r}")
        if input_type not in INPUT_TYPES:
            raise ValueError(f"l2w input_type must be one of {INPUT_TYPES}, got {input_type!r}")
        if not epsilon > 0:
            raise ValueError(f"l2w epsilon must be > 0 (weights 1 + epsilon (m - mean m)), got {epsilon!r}")
        if not (isinstance(meta_interval, int) and meta_interval >= 1):
            raise ValueError(f"l2w meta_interval must be an integer >= 1, got {meta_interval!r}")
        if not (isinstance(hidden_size, int) and hidden_size >= 1):
            raise ValueError(f"l2w hidden_size must be an integer >= 1, got {hidden_size!r}")
        if not 0 < target_p:
            raise ValueError(f"l2w target_p must be > 0 (exit k's share of the budget ~ target_p ** k), got {target_p!r}")
        self.epsilon, self.constraint_dimension, self.input_type = epsilon, constraint_dimension, input_type
        self.hidden_size, self.meta_interval, self.lr, self.weight_decay = hidden_size, meta_interval, lr, weight_decay
        self.lr_follows_schedule, self.target_p = lr_follows_schedule, target_p
        self.label_smoothing, self.seed = label_smoothing, seed
        self.weight_net: Optional[WeightNet] = None
        self.last_meta: Optional[Dict[str, Any]] = None  # the last meta step's pseudo weights, meta loss, gradients

    def prepare(self, model: nn.Module) -> nn.Module:
        """Check the model; build the weight net (from ``seed``, on the model's device and dtype) and its Adam."""
        model = super().prepare(model)
        p = next(model.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = WeightNet(model.num_exits, self.hidden_size, self.input_type)
        self.weight_net = net.to(device=p.device, dtype=p.dtype)
        self.weight_optimizer = torch.optim.Adam(self.weight_net.parameters(), lr=self.lr,
                                                 weight_decay=self.weight_decay)
        self.fractions = geometric_fractions(self.target_p, model.num_exits)
        return model

    def _check_prepared(self) -> None:
        if self.weight_net is None:
            raise RuntimeError("L2W's weight net is built by prepare(model): call it first")

    def due(self, index: int) -> bool:
        """Whether the batch of this index (in its epoch) has a meta step."""
        return index % self.meta_interval == 0

    def weights(self, ce: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """The sample weights (B x K) of the current weight net, without gradient."""
        self._check_prepared()
        net = self.weight_net
        with torch.no_grad(), torch.autocast(ce.device.type, enabled=False):
            m = net(ce.to(next(net.parameters()).dtype), confidence.to(next(net.parameters()).dtype))
            return sample_weights(m, self.epsilon, self.constraint_dimension).to(ce.dtype)

    def losses(self, outputs: Outputs, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``l2w``: ``sum_k mean_i(w_ik CE_ik)`` with the current weights."""
        ce, confidence = exit_terms(outputs, target, self.label_smoothing)
        return {"l2w": weighted_loss(ce, self.weights(ce, confidence))}

    def batch_losses(self, model: nn.Module, forward: Callable[[torch.Tensor], Outputs], images: torch.Tensor,
                     target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The weighted loss of a batch with the current weight net (no meta step, no halves)."""
        return self.losses(forward(images), target)

    def update_weights(self, model: nn.Module, optimizer, train: Batch, meta: Batch) -> Dict[str, torch.Tensor]:
        """One meta step (:func:`l2w_meta_step`) with autocast off; the weight net's Adam lr follows
        the network's schedule (``lr_follows_schedule``: scaled by ``lr / initial_lr`` of the
        optimizer's first param group)."""
        self._check_prepared()
        group = optimizer.param_groups[0]
        scale = group["lr"] / group["initial_lr"] if self.lr_follows_schedule and group.get("initial_lr") else 1.0
        for g in self.weight_optimizer.param_groups:
            g["lr"] = self.lr * scale
        with torch.autocast(train[0].device.type, enabled=False):
            out = l2w_meta_step(model, self.weight_net, self.weight_optimizer, optimizer, train, meta, self.epsilon,
                                self.constraint_dimension, self.fractions, self.label_smoothing)
        self.last_meta = out
        return out

    def step(self, model: nn.Module, forward: Callable[[torch.Tensor], Outputs], images: torch.Tensor,
             target: torch.Tensor, backward: Backward = torch.Tensor.backward, optimizer=None,
             update: Optional[Callable[[Dict[str, torch.Tensor]], Any]] = None, index: int = 0) -> Dict[str, torch.Tensor]:
        """Both halves of a batch: for each, the meta step (if :meth:`due` at ``index``) and the
        weighted loss's backward; after the first half, ``update(terms)`` takes the optimizer step
        (default: ``optimizer.step()``, ``optimizer.zero_grad()``). The second half's step is the
        trainer's. Returns ``first_half`` and ``second_half``, the two weighted losses."""
        if optimizer is None:
            raise ValueError("l2w takes an optimizer step after each half of the batch and its virtual step follows "
                             "the optimizer: pass optimizer")
        update = update or (lambda _: (optimizer.step(), optimizer.zero_grad()))
        first, second = split_halves(images, target)
        terms: Dict[str, torch.Tensor] = {}
        for name, (train, meta) in (("first_half", (first, second)), ("second_half", (second, first))):
            if name == "second_half":
                update(dict(terms))
            if self.due(index):
                self.update_weights(model, optimizer, train, meta)
            loss = self.losses(forward(train[0]), train[1])["l2w"]
            backward(loss)
            terms[name] = loss.detach()
        return terms

    def state_dict(self) -> Dict[str, Any]:
        self._check_prepared()
        return {"l2w_weight_net": self.weight_net.state_dict(), "l2w_optimizer": self.weight_optimizer.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._check_prepared()
        self.weight_net.load_state_dict(state["l2w_weight_net"])
        self.weight_optimizer.load_state_dict(state["l2w_optimizer"])
