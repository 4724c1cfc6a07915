"""Gradient deconfliction between exits (Wang & Li, ICIP 2020): a gradient that conflicts with
another exit's (negative dot product) is projected onto the normal plane of it (the PCGrad
operator: g_i <- g_i - (g_i . g_j / |g_j|^2) g_j, always against the unmodified g_j).

Only the paper's abstract is public, so both places the operator can act are offered:

* :func:`pcgrad_backward` (parameter level, PCGrad proper): one gradient per exit on the shared
  parameters, projected pairwise, summed. Options: ``scope`` (``global``: one vector of all shared
  parameters; ``segment``: per parameter group, e.g. per stage; ``tensor``: per parameter),
  ``order`` (``random`` or ``deep_first``), ``protect_deeper`` (only shallower exits' gradients are
  projected). Needs one backward per exit. Under DDP the per-exit gradients are averaged over the
  processes before the projection, so every process takes the same step.
* ``model.gradient_deconfliction = "symmetric"`` (or ``"protect_deeper"``: only the exit's gradient is
  projected) (branch level, one backward): at every branch point of the
  multi-exit contract, the gradient coming from the exit head and the one coming from the deeper
  network are deconflicted the same way before they are added. Its cost is a few dot products; it
  composes with Gradient Equilibrium, which acts at the same points. Being part of the forward
  graph, it lives with the models: :mod:`timm_exits.models.branch_gradients`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..models.branch_gradients import project_conflicts

__all__ = ["pcgrad_gradients", "pcgrad_backward", "average_over_processes"]


def average_over_processes(tensors: List[Optional[torch.Tensor]]) -> None:
    """In place: the mean over the processes of a distributed run (gradients from
    ``torch.autograd.grad`` are not all-reduced by DDP); a no-op in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            if t is not None:
                dist.all_reduce(t)
                t.div_(dist.get_world_size())


def _orders(n: int, order: str, generator: Optional[torch.Generator]) -> List[List[int]]:
    if order == "deep_first":
        return [[j for j in reversed(range(n)) if j != i] for i in range(n)]
    if order == "random":
        return [[j for j in torch.randperm(n, generator=generator).tolist() if j != i] for i in range(n)]
    raise ValueError(f"order must be 'random' or 'deep_first', got {order!r}")


def pcgrad_gradients(
        losses: Sequence[torch.Tensor],
        params: Sequence[torch.nn.Parameter],
        scope: str = "global",
        groups: Optional[Sequence[Sequence[torch.nn.Parameter]]] = None,
        order: str = "random",
        protect_deeper: bool = False,
        generator: Optional[torch.Generator] = None,
) -> Tuple[List[Optional[torch.Tensor]], int]:
    """The deconflicted sum of the exits' gradients (``losses`` in exit order), one per parameter of
    ``params`` that requires grad (None where no loss reaches it), each exit's gradient averaged over
    the processes first. Parameters that at most one exit reaches (its head) get their plain gradient.

    Args:
        losses: the exits' losses, in exit order.
        params: the parameters (those that do not require grad are left out).
        scope: ``'global'`` (one projection over all shared parameters), ``'segment'`` (one per group
            of ``groups``, e.g. one per stage) or ``'tensor'`` (one per parameter).
        groups: the segments, for ``scope='segment'``.
        order: ``'random'`` (from ``generator``: seed it alike on every process) or ``'deep_first'``.
        protect_deeper: a deeper exit's gradient is never projected against a shallower one's.
        generator: the random order's generator.

    Returns:
        The gradients, in the order of the parameters that require grad, and the number of
        projections made (conflicts found).
    """
    if scope not in ("global", "segment", "tensor"):
        raise ValueError(f"scope must be 'global', 'segment' or 'tensor', got {scope!r}")
    if scope == "segment" and not groups:
        raise ValueError("scope='segment' needs the parameter groups (e.g. one per stage)")
    params = [p for p in params if p.requires_grad]
    per_exit = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
    for grads in per_exit:
        average_over_processes(list(grads))
    index = {id(p): k for k, p in enumerate(params)}
    shared = [k for k in range(len(params)) if sum(g[k] is not None for g in per_exit) > 1]
    if scope == "global":
        blocks = [shared]
    elif scope == "tensor":
        blocks = [[k] for k in shared]
    else:
        blocks = [[index[id(p)] for p in group if id(p) in index and index[id(p)] in shared] for group in groups]
        covered = {k for block in blocks for k in block}
        blocks += [[k] for k in shared if k not in covered]
    own = [k for k in range(len(params)) if k not in set(shared)]  # a head's parameters: no surgery
    blocks += [[k] for k in own]
    out: List[Optional[torch.Tensor]] = [None] * len(params)
    projections = 0
    for block in filter(None, blocks):
        exits = [i for i in range(len(losses)) if any(per_exit[i][k] is not None for k in block)]
        flat = [torch.cat([(per_exit[i][k] if per_exit[i][k] is not None else torch.zeros_like(params[k])).reshape(-1)
                           for k in block]) for i in exits]
        if len(exits) > 1:
            orders = _orders(len(exits), order, generator)
            # a deeper exit's gradient is never projected against a shallower one's
            protected = [[j for j in range(len(exits)) if exits[j] < exits[i]] for i in range(len(exits))] \
                if protect_deeper else None
            projections += sum(int(torch.dot(flat[i], flat[j]) < 0) for i in range(len(exits)) for j in orders[i]
                               if protected is None or j not in protected[i])
            combined = project_conflicts(flat, orders, protected)
        else:
            combined = flat[0] if flat else None
        if combined is None:
            continue
        offset = 0
        for k in block:
            out[k] = combined[offset:offset + params[k].numel()].view_as(params[k])
            offset += params[k].numel()
    return out, projections


def pcgrad_backward(losses: Sequence[torch.Tensor], params: Sequence[torch.nn.Parameter], **options) -> Dict[str, int]:
    """Accumulate :func:`pcgrad_gradients` into the parameters' ``.grad``.

    Args:
        losses: the exits' losses, in exit order.
        params: the parameters (those that do not require grad are left out).
        **options: :func:`pcgrad_gradients`'s ``scope``, ``groups``, ``order``, ``protect_deeper``,
            ``generator``.

    Returns:
        ``{'projections': n}``, the number of projections made.
    """
    params = [p for p in params if p.requires_grad]
    grads, projections = pcgrad_gradients(losses, params, **options)
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g.clone() if p.grad is None else p.grad + g
    return {"projections": projections}
