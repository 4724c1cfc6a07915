"""A differentiable look-ahead step of a model's own optimizer (meta-learning of loss weights:
L2W-DEN, :mod:`.l2w`).

:func:`sgd_virtual_step` computes the parameters one step of the model's ``torch.optim.SGD`` would
give, from gradients that may carry a graph (``create_graph=True``), with the optimizer's current
learning rate, weight decay and momentum buffers, without changing the parameters or the
optimizer's state. :func:`call_forward_exits` runs the exits with given parameters and buffers (HDKD's
look-ahead uses it too); :func:`functional_exits` runs the model's exits on such parameters, with copies
of its buffers, so a look-ahead forward in training mode leaves the batch-norm statistics alone,
on the model's plain (twice differentiable) training path.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["sgd_of", "sgd_virtual_step", "call_forward_exits", "functional_exits", "plain_training_path"]


class _ForwardExits(nn.Module):
    """``forward`` is the wrapped model's ``forward_exits`` (functional_call runs ``forward``)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.inner.forward_exits(x)


def call_forward_exits(model: nn.Module, tensors: Dict[str, torch.Tensor], images: torch.Tensor) -> List[torch.Tensor]:
    """``model.forward_exits(images)`` with parameters and buffers replaced by ``tensors``.

    Args:
        model: a multi-exit model.
        tensors: ``{name: tensor}`` by the names of ``model.named_parameters()`` / ``named_buffers()``;
            the others stay.
        images: the batch.

    Returns:
        Every exit's logits, in order.
    """
    return functional_call(_ForwardExits(model), {f"inner.{k}": v for k, v in tensors.items()}, (images,))


def sgd_of(optimizer) -> torch.optim.SGD:
    """The ``torch.optim.SGD`` inside ``optimizer`` (an accelerate or mmengine wrapper, or itself);
    a clear error for any other optimizer."""
    inner = optimizer
    while not isinstance(inner, torch.optim.SGD) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.SGD):
        raise ValueError(f"the virtual step follows torch.optim.SGD (timm opt 'sgd', 'momentum' or 'nesterov'), "
                         f"the model's optimizer is {type(inner).__name__}")
    return inner


def sgd_virtual_step(params: Dict[str, torch.Tensor], grads: Sequence[Optional[torch.Tensor]],
                     optimizer) -> Dict[str, torch.Tensor]:
    """The parameters one step of the model's SGD would give, by the update of
    ``torch.optim.SGD`` with its param group's ``lr``, ``weight_decay``, ``momentum``,
    ``dampening``, ``nesterov`` and ``maximize`` and the momentum buffer in its state (none yet:
    the buffer starts as the gradient, as in SGD's first step)::

        d = (-g if maximize else g) + weight_decay * theta
        b = momentum * buffer + (1 - dampening) * d      (b = d without a buffer)
        d = d + momentum * b if nesterov else b          (momentum != 0)
        theta' = sg(theta) - lr * d

    Args:
        params: ``{name: theta}``, parameters of ``optimizer``.
        grads: their gradients, in the same order (``None``: no gradient, the parameter keeps its
            value, as SGD skips it); may carry a graph.
        optimizer: a ``torch.optim.SGD``, or an accelerate or mmengine wrapper of one.

    Returns:
        ``{name: theta'}``, differentiable in ``grads`` only (theta is a constant of the step).

    Raises:
        ValueError: the optimizer is not SGD, or a parameter is not one of its.
    """
    sgd = sgd_of(optimizer)
    groups = {id(p): group for group in sgd.param_groups for p in group["params"]}
    stepped = {}
    for (name, p), g in zip(params.items(), grads):
        group = groups.get(id(p))
        if group is None:
            raise ValueError(f"parameter {name!r} is not one of the optimizer's")
        theta = p.detach()
        if g is None:
            stepped[name] = theta
            continue
        d = -g if group["maximize"] else g
        if group["weight_decay"] != 0:
            d = d + group["weight_decay"] * theta
        momentum = group["momentum"]
        if momentum != 0:
            buffer = sgd.state.get(p, {}).get("momentum_buffer")
            b = d if buffer is None else momentum * buffer + (1 - group["dampening"]) * d
            d = d + momentum * b if group["nesterov"] else b
        stepped[name] = theta - group["lr"] * d
    return stepped


def functional_exits(model: nn.Module, params: Dict[str, torch.Tensor], images: torch.Tensor,
                     buffers: Optional[Dict[str, torch.Tensor]] = None) -> List[torch.Tensor]:
    """``model.forward_exits(images)`` on other parameters and buffers, on the model's plain
    training path: batch norm in training mode updates the copies, never the model's running
    statistics.

    Args:
        model: a multi-exit model.
        params: ``{name: tensor}`` in place of its parameters (the others stay).
        images: the batch.
        buffers: ``{name: tensor}`` in place of its buffers (default: fresh copies of its own).

    Returns:
        Every exit's logits, in order.
    """
    if buffers is None:
        buffers = {n: b.clone() for n, b in model.named_buffers()}
    with plain_training_path(model):
        return call_forward_exits(model, {**params, **buffers}, images)


@contextmanager
def plain_training_path(model: nn.Module):
    """Inside, a model with a fused CPU training path whose backward is not twice differentiable
    (MSDNet's ``channels_last_training``) takes its plain path: the same function."""
    fused = getattr(model, "channels_last_training", False)
    if fused:
        model.channels_last_training = False
    try:
        yield model
    finally:
        if fused:
            model.channels_last_training = True
