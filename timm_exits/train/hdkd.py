"""Harmonized Dense Knowledge Distillation (HDKD; Wang & Li, AAAI 2021).

Every exit learns from the labels and from every later exit (dense distillation); the weights of
the K cross-entropy terms and the K(K-1)/2 distillation terms are learned by gradient descent on a
validation batch (bilevel optimisation, one-step unrolled as in DARTS). Only the abstract and a
third-party summary of the paper are public: where they leave a choice open, the choice marked
(ours) below is this package's, not the paper's.

    L_train = alpha * sum_k g_k CE_k + (1 - alpha) * sum_{i<j} h_ij T^2 KL(sg(p_j^T) || p_i^T)

* (ours) weights: g = K softmax(a_ce) (uniform init: deep supervision); for each student i,
  h_i. = softmax over its teachers j > i (uniform init: averaging, "NaiveDKD"); alpha = 0.5.
* hypergradient: with theta' = theta - xi grad_theta L_train and v = grad L_val(theta'),
  d L_val / d w_m = -xi c_m <grad_theta L_m, v> for each term m (c_m = alpha or 1 - alpha), the inner
  products by central finite differences at theta +- eps v (eps = 0.01 / |v|), then chained through
  the softmaxes to the logits a.
* (ours) balanced validation objective: sum_k l_k + lambda sum_k softplus(l_k / sg(m_k) - 1) with m_k
  an exponential moving average of exit k's validation loss (``ratio_reg=False``: sum_k l_k).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .deconfliction import average_over_processes
from .virtual_step import call_forward_exits

__all__ = ["HarmonizedWeights", "loss_terms", "harmonized_loss", "BalancedValidationLoss", "hdkd_weight_step"]


class HarmonizedWeights(nn.Module):
    """The learnable loss weights of K exits: ``ce`` (K,) and ``kd`` (K, K), upper triangular.

    Args:
        num_exits: K.
        init: ``'uniform'`` (every teacher of a student alike) or ``'dbt'`` (every student learns
            almost only from the last exit).
    """

    def __init__(self, num_exits: int, init: str = "uniform"):
        super().__init__()
        if init not in ("uniform", "dbt"):
            raise ValueError(f"init must be 'uniform' or 'dbt', got {init!r}")
        self.num_exits = num_exits
        self.ce_logits = nn.Parameter(torch.zeros(num_exits))
        kd = torch.zeros(num_exits, num_exits)
        if init == "dbt":  # every student learns (almost) only from the last exit
            kd[:, -1] = 5.0
        self.kd_logits = nn.Parameter(kd)
        self.register_buffer("mask", torch.ones(num_exits, num_exits).triu(1).bool(), persistent=False)

    def forward(self) -> Tuple[torch.Tensor, torch.Tensor]:
        ce = self.num_exits * self.ce_logits.softmax(0)
        kd = self.kd_logits.masked_fill(~self.mask, float("-inf")).softmax(1).nan_to_num(0.0)
        return ce, kd


def loss_terms(logits: List[torch.Tensor], target: torch.Tensor, temperature: float = 4.0,
               teachers: Optional[List[torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-exit cross-entropies and dense distillation terms.

    Args:
        logits: the K exits' logits, each (B, C).
        target: the class indices, (B,).
        temperature: the distillation's softmax temperature T.
        teachers: other teacher logits (default: ``logits``), e.g. kept fixed while the student's
            parameters are perturbed.

    Returns:
        The cross-entropies (K,) and the distillation terms (K, K): entry (i, j), i < j, is
        T^2 KL(p_j || p_i) averaged over the batch, teacher j detached; other entries are 0.
    """
    k = len(logits)
    ce = torch.stack([F.cross_entropy(z, target) for z in logits])
    log_p = [F.log_softmax(z / temperature, -1) for z in logits]
    q = [F.softmax(z.detach() / temperature, -1) for z in (teachers or logits)]
    zero = ce.new_zeros(())
    kd = torch.stack([torch.stack([temperature ** 2 * F.kl_div(log_p[i], q[j], reduction="batchmean") if j > i else zero
                                   for j in range(k)]) for i in range(k)])
    return ce, kd


def harmonized_loss(ce: torch.Tensor, kd: torch.Tensor, weights: Tuple[torch.Tensor, torch.Tensor],
                    alpha: float = 0.5) -> torch.Tensor:
    """alpha * sum_k g_k CE_k + (1 - alpha) * sum_{i<j} h_ij KD_ij.

    Args:
        ce, kd: the terms of :func:`loss_terms`, (K,) and (K, K).
        weights: ``(g, h)``, the output of :class:`HarmonizedWeights`.
        alpha: the weight of the CE terms, in [0, 1]; the KD terms get 1 - alpha.

    Returns:
        The loss, a scalar.
    """
    g, h = weights
    return alpha * (g * ce).sum() + (1 - alpha) * (h * kd).sum()


class BalancedValidationLoss:
    """(Ours, not the paper's) sum_k l_k + lambda sum_k softplus(l_k / m_k - 1), m_k an EMA of exit k's loss.

    Args:
        num_exits: K (the EMA takes its shape from the first call's losses).
        momentum: the EMA's momentum (the weight of the old value).
        ratio_weight: lambda.
        ratio_reg: False: sum_k l_k only.
    """

    def __init__(self, num_exits: int, momentum: float = 0.9, ratio_weight: float = 1.0, ratio_reg: bool = True):
        self.momentum, self.ratio_weight, self.ratio_reg = momentum, ratio_weight, ratio_reg
        self.expected: Optional[torch.Tensor] = None

    def __call__(self, logits: List[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        losses = torch.stack([F.cross_entropy(z, target) for z in logits])
        if not self.ratio_reg:
            return losses.sum()
        current = losses.detach()
        self.expected = current if self.expected is None else \
            self.momentum * self.expected + (1 - self.momentum) * current
        return losses.sum() + self.ratio_weight * F.softplus(losses / self.expected - 1).sum()

    def state_dict(self) -> Dict[str, Optional[torch.Tensor]]:
        return {"expected": self.expected}

    def load_state_dict(self, state: Dict[str, Optional[torch.Tensor]]) -> None:
        self.expected = state["expected"]


def hdkd_weight_step(
        model: nn.Module,
        weights: HarmonizedWeights,
        weight_optimizer: torch.optim.Optimizer,
        train_batch: Tuple[torch.Tensor, torch.Tensor],
        val_batch: Tuple[torch.Tensor, torch.Tensor],
        val_loss: BalancedValidationLoss,
        xi: float,
        alpha: float = 0.5,
        temperature: float = 4.0,
        weight_decay: float = 0.0,
) -> Dict[str, float]:
    """One update of the harmonized weights (the upper level of the bilevel problem).

    Batch norm runs on copies of its buffers, so the running statistics of the model do not move.
    The caller then trains the network on ``harmonized_loss`` with the new weights (the lower
    level). In a distributed run the gradients and inner products are averaged over the processes
    (each with its own batches), so every process makes the same update.

    Args:
        model: the multi-exit network (not changed).
        weights: the weights to update.
        weight_optimizer: the optimizer of ``weights``' parameters.
        train_batch: ``(images, target)`` of the virtual step.
        val_batch: ``(images, target)`` the weights are fitted on.
        val_loss: the validation objective (its EMA moves).
        xi: the virtual step size (DARTS: the network's current learning rate).
        alpha, temperature: as in :func:`harmonized_loss` and :func:`loss_terms`.
        weight_decay: the network optimizer's weight decay, added to the virtual step.

    Returns:
        ``{'val_objective': ..., 'v_norm': ...}``: the validation objective after the virtual step
        and the norm of its gradient v.
    """
    images, target = train_batch
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    buffers = lambda: {n: b.clone() for n, b in model.named_buffers()}  # noqa: E731
    gamma = tuple(w.detach() for w in weights())
    logits = call_forward_exits(model, {**params, **buffers()}, images)
    ce, kd = loss_terms(logits, target, temperature)
    grads = list(torch.autograd.grad(harmonized_loss(ce, kd, gamma, alpha), list(params.values()), allow_unused=True))
    average_over_processes(grads)  # every process takes the same virtual step
    teachers = [z.detach() for z in logits]  # the KD terms' gradients treat their teachers as constants
    virtual = {n: (p - xi * ((g if g is not None else 0) + weight_decay * p)).detach().requires_grad_(True)
               for (n, p), g in zip(params.items(), grads)}
    objective = val_loss(call_forward_exits(model, {**virtual, **buffers()}, val_batch[0]), val_batch[1])
    v = torch.autograd.grad(objective, list(virtual.values()), allow_unused=True)
    v = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), v)]
    average_over_processes(v)
    norm = torch.sqrt(sum((g ** 2).sum() for g in v))
    eps = 0.01 / (norm + 1e-12)
    with torch.no_grad():
        terms = []
        for sign in (1.0, -1.0):
            shifted = {n: p + sign * eps * g for (n, p), g in zip(params.items(), v)}
            terms.append(loss_terms(call_forward_exits(model, {**shifted, **buffers()}, images), target, temperature,
                                    teachers))
        dot_ce = (terms[0][0] - terms[1][0]) / (2 * eps)  # <grad_theta CE_k, v>
        dot_kd = (terms[0][1] - terms[1][1]) / (2 * eps)
        average_over_processes([dot_ce, dot_kd])  # so the weights stay the same on every process
    # d L_val / d weight_m = -xi c_m <grad L_m, v>, then through the softmaxes to the logits
    g, h = weights()
    weight_optimizer.zero_grad()
    torch.autograd.backward([g, h], [-xi * alpha * dot_ce, -xi * (1 - alpha) * dot_kd * weights.mask])
    weight_optimizer.step()
    return {"val_objective": float(objective.detach()), "v_norm": float(norm)}
