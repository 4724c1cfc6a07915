"""ADN self-distillation (Kang & Lee, NeurIPS 2024): each step trains the super-net on the labels
and the base-net to imitate the super-net, with two passes and one optimizer step.

    loss = alpha * CE(super, y) + (1 - alpha) * T^2 * KL(softmax(super / T) || softmax(base / T))

The teacher is detached, so the base-net gets no label loss; the mandatory sub-paths learn from
both passes (through their two norm sets), the skippable ones from the super-net only. With exits,
every exit of the base-net distils from the same exit of the super-net.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models.adaptive_depth import adaptive_depth_of
from ..models.multi_exit import exit_logits

__all__ = ["adn_distillation", "adn_losses", "adn_step"]


def adn_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                     topk: Optional[int] = None) -> torch.Tensor:
    """T^2 KL(teacher || student) averaged over the batch, with both distributions restricted to
    the teacher's ``topk`` classes if given (the official ImageNet code uses 500)."""
    teacher = teacher.detach()
    if topk is not None:
        index = teacher.topk(topk, dim=-1).indices
        teacher, student = teacher.gather(-1, index), student.gather(-1, index)
    log_p = F.log_softmax(student / temperature, -1)
    return temperature ** 2 * F.kl_div(log_p, F.softmax(teacher / temperature, -1), reduction="batchmean")


def adn_losses(
        model: nn.Module,
        images: torch.Tensor,
        target: torch.Tensor,
        alpha: float = 0.5,
        temperature: float = 1.0,
        topk: Optional[int] = None,
        criterion: Callable = F.cross_entropy,
        backward: Optional[Callable[[torch.Tensor], None]] = None,
        forward: Optional[Callable[[torch.Tensor], List[torch.Tensor]]] = None,
) -> Dict[str, torch.Tensor]:
    """The super-net loss (``alpha`` x CE) and the base-net loss ((1 - alpha) x KD) of one batch.

    ``model`` is an ADN network or a multi-exit model around one. With ``backward``, the super-net
    loss is back-propagated before the base-net pass (the reference's two backward passes, which free
    the first graph early); without, one backward on the sum gives the same gradients. ``forward``
    (default: every exit's logits of ``model``) runs a pass, e.g. through a DDP wrapper.
    """
    forward = forward or (lambda x: exit_logits(model, x))
    adaptive = adaptive_depth_of(model)
    if adaptive is None:
        raise TypeError(f"{type(model).__name__} has no skippable sub-paths (see make_adaptive_depth)")
    with adaptive.depth(None):  # super-net
        super_logits = forward(images)
        super_loss = alpha * sum(criterion(z, target) for z in super_logits)
    if backward is not None:
        backward(super_loss)
    with adaptive.depth([True] * adaptive.num_depth_stages):  # base-net
        base_logits = forward(images)
        base_loss = (1 - alpha) * sum(adn_distillation(b, s, temperature, topk)
                                      for b, s in zip(base_logits, super_logits))
    return {"super": super_loss, "base": base_loss}


def adn_step(
        model: nn.Module,
        images: torch.Tensor,
        target: torch.Tensor,
        alpha: float = 0.5,
        temperature: float = 1.0,
        topk: Optional[int] = None,
        criterion: Callable = F.cross_entropy,
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
        forward: Optional[Callable[[torch.Tensor], List[torch.Tensor]]] = None,
) -> Dict[str, torch.Tensor]:
    """One ADN training step's two forward / backward passes (the optimizer step is the caller's);
    ``backward`` may be ``accelerator.backward``, ``forward`` a DDP wrapper's. Returns the detached
    losses."""
    losses = adn_losses(model, images, target, alpha, temperature, topk, criterion, backward, forward)
    backward(losses["base"])
    return {name: loss.detach() for name, loss in losses.items()}
