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
    """T^2 KL(teacher || student) averaged over the batch.

    Args:
        student: the student's logits, (B, C).
        teacher: the teacher's logits, (B, C); detached here.
        temperature: the softmax temperature T.
        topk: restrict both distributions to the teacher's top k classes (the official ImageNet
            code uses 500); None: all classes.

    Returns:
        The loss, a scalar.
    """
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

    Args:
        model: an ADN network or a multi-exit model around one.
        images: the batch's images.
        target: the class indices (or what ``criterion`` takes).
        alpha: the weight of the super-net's CE, in [0, 1]; the base-net's KD gets 1 - alpha.
        temperature, topk: the distillation's, as in :func:`adn_distillation`.
        criterion: the super-net's label loss, ``criterion(logits, target)``.
        backward: if given, the super-net loss is back-propagated with it before the base-net pass
            (the reference's two backward passes, which free the first graph early); without, one
            backward on the sum gives the same gradients.
        forward: runs a pass, e.g. through a DDP wrapper (default: every exit's logits of ``model``).

    Returns:
        ``{'super': ..., 'base': ...}``, the two scalar losses (not detached).

    Raises:
        TypeError: ``model`` has no skippable sub-paths.
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
    """One ADN training step's two forward / backward passes (the optimizer step is the caller's).

    Args:
        model, images, target, alpha, temperature, topk, criterion: as in :func:`adn_losses`.
        backward: back-propagates a loss, e.g. ``accelerator.backward``.
        forward: runs a pass, e.g. a DDP wrapper's (default: every exit's logits of ``model``).

    Returns:
        ``{'super': ..., 'base': ...}``, the two losses detached.
    """
    losses = adn_losses(model, images, target, alpha, temperature, topk, criterion, backward, forward)
    backward(losses["base"])
    return {name: loss.detach() for name, loss in losses.items()}
