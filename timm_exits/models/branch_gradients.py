"""The backward-only switches of the multi-exit forward graph, acting at its branch points (the
state after a stage, read by the exit head and by the next stage):

* Gradient Equilibrium (IMTA, ICCV 2019) scales the gradient of each branch: :func:`scale_grad`;
* branch-level gradient deconfliction (Wang & Li, ICIP 2020) projects a gradient that conflicts with
  the other branch's (negative dot product) onto the normal plane of it, the PCGrad operator
  ``g_i <- g_i - (g_i . g_j / |g_j|^2) g_j`` (:func:`project_conflicts`), before the two are added:
  :func:`deconflict_branch`;
* Deep Feature Surgery (Gong et al., ECCV 2024) stops the next stage's gradient at the last channels of
  the state, which then learn from the exit alone: :func:`detach_channels`.

All are identities in the forward pass. :class:`~timm_exits.models.multi_exit.MultiExitModel`
applies them (``gradient_equilibrium``, ``gradient_deconfliction``, ``feature_surgery``); the
parameter-level PCGrad of :mod:`timm_exits.train.deconfliction` uses the same operator.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["scale_grad", "project_conflicts", "deconflict_branch", "detach_channels"]

_EPS = 1e-12


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged, with its gradient multiplied by ``factor`` in the backward pass.

    Args:
        x: any tensor.
        factor: the constant the gradient is multiplied by.

    Returns:
        A view of ``x``.
    """
    return _ScaleGrad.apply(x, factor)


def project_conflicts(grads: List[torch.Tensor], order: Sequence[Sequence[int]],
                      protected: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """Sum of the PCGrad-projected gradients.

    Args:
        grads: the gradients, each a flat tensor of the same size; they are not modified.
        order: ``order[i]`` lists the indices of the other gradients g_i is projected against, in turn.
        protected: ``protected[i]`` lists those g_i is never projected against, even on a conflict;
            ``None``: none.

    Returns:
        The sum of the projected gradients, a flat tensor.
    """
    total = torch.zeros_like(grads[0])
    for i, g in enumerate(grads):
        g = g.clone()
        for j in order[i]:
            if protected is not None and j in protected[i]:
                continue
            dot = torch.dot(g, grads[j])
            if dot < 0:
                g -= dot / (grads[j].pow(2).sum() + _EPS) * grads[j]
        total += g
    return total


class _Branch(torch.autograd.Function):
    """Two identical outputs; the backward deconflicts the two incoming gradients, then adds them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, protect_trunk: bool):
        ctx.protect_trunk = protect_trunk
        return x.view_as(x), x.view_as(x)

    @staticmethod
    def backward(ctx, g_head: torch.Tensor, g_trunk: torch.Tensor):
        if g_head is None or g_trunk is None:
            return (g_trunk if g_head is None else g_head), None
        h, t = g_head.reshape(-1), g_trunk.reshape(-1)
        combined = project_conflicts([h, t], [[1], [0]], [[], [0]] if ctx.protect_trunk else None)
        return combined.view_as(g_head), None


def deconflict_branch(x: torch.Tensor, protect_deeper: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x_head, x_trunk)``: both ``x``; in the backward their gradients are deconflicted.

    Args:
        x: the state at a branch point.
        protect_deeper: project only the head's gradient (the trunk's is never projected).

    Returns:
        ``(x_head, x_trunk)``, two views of ``x``: the exit head reads the first, the next stage the
        second.
    """
    return _Branch.apply(x, protect_deeper)


class _DetachChannels(torch.autograd.Function):
    """Identity forward; the backward zeroes the gradient of the channels from ``start`` on."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, start: int) -> torch.Tensor:
        ctx.dim, ctx.start = dim, start
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        grad.narrow(ctx.dim, ctx.start, grad.shape[ctx.dim] - ctx.start).zero_()
        return grad, None, None


def detach_channels(x: torch.Tensor, keep: float, dim: int = 1) -> torch.Tensor:
    """``x`` unchanged, with the gradient of its last channels stopped: ``[x_a | sg(x_b)]`` along
    ``dim``, where ``x_a`` is the first ``round(keep * C)`` of the ``C`` channels (Python's rounding,
    half to even, as the Deep Feature Surgery reference).

    Args:
        x: a state tensor at a branch point.
        keep: the fraction of the channels whose gradient passes, in (0, 1).
        dim: the channel dimension (1 for NCHW maps, -1 for tokens and NHWC maps).

    Returns:
        A view of ``x``.
    """
    if not 0.0 < keep < 1.0:
        raise ValueError(f"feature_surgery (the fraction of the channels whose gradient passes) must be in (0, 1), "
                         f"got {keep!r}")
    return _DetachChannels.apply(x, dim, round(x.shape[dim] * keep))
