"""Per-exit cost of multi-exit models: cumulative MACs and parameters.

Costs are **cumulative** and include every earlier exit head, as in the MSDNet / IMTA
references: exit k's cost is what a sample pays when it is evaluated by heads 1..k and leaves
at k. Counting uses ``torch.utils.flop_counter`` on a meta-device copy of the model (nothing is
computed, and attention is counted through its math decomposition). Three conventions:

``macs``    multiply-accumulates of convolutions, matmuls and attention (FLOPs / 2); the default.
``msdnet``  the MSDNet reference op counter: conv MACs (bias ignored), linear ``in*out + out``,
            one op per ReLU element and ``k*k`` per pooling output; batch norm is free.
``macs_norm`` the MACs above plus one per batch-norm element and five per layer-norm element: the
            convention the ADN paper's "GFLOPs" follow (its published numbers are reproduced). It is
            not fvcore's own count, which adds two per element of an affine batch norm in eval mode
            and counts the global pool; hence not named after it.

A model without the multi-exit contract (a plain timm model, an ADN network) counts as one exit.

Parameters of exit k are those read by the operations run up to it (the reference counts the
parameters of every executed layer, which is the same set).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from math import prod
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from .models.capabilities import is_multi_exit

__all__ = ["ExitCost", "CONVENTIONS", "profile_exits", "meta_copy"]

CONVENTIONS = ("macs", "msdnet", "macs_norm")


@dataclass(frozen=True)
class ExitCost:
    """Cumulative cost of leaving at ``exit`` (1-based).

    Args:
        exit: the exit, 1-based.
        macs: the cumulative MACs, in the convention it was profiled in.
        params: the parameters read up to that exit.
    """

    exit: int
    macs: int
    params: int

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


def _halved(formula: Callable) -> Callable:
    def count(*args, **kwargs) -> int:
        return formula(*args, **kwargs) // 2

    count._get_raw = True  # the registry's formulas already take raw arguments
    return count


def _linear_with_bias(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return a_shape[0] * a_shape[1] * b_shape[1] + a_shape[0] * b_shape[1]


def _elements(x_shape, *args, out_shape=None, **kwargs) -> int:
    return prod(x_shape)


def _layer_norm(x_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return prod(x_shape) * (5 if weight_shape is not None else 4)


def _pool(x_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    out = out_shape[0] if isinstance(out_shape[0], (tuple, list, torch.Size)) else out_shape
    k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
    return prod(out) * k * k  # the reference assumes square windows


def _counter_mapping(convention: str) -> dict:
    if convention == "fvcore":
        raise ValueError("convention 'fvcore' is now 'macs_norm': MACs + 1 per batch-norm and 5 per layer-norm "
                         "element (the ADN paper's numbers), which is not what fvcore itself counts")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    mapping = {op: _halved(formula) for op, formula in flop_registry.items()}
    if convention == "msdnet":
        aten = torch.ops.aten
        mapping.update({
            aten.addmm: _linear_with_bias,
            aten.relu: _elements, aten.relu_: _elements,
            aten.max_pool2d: _pool, aten.max_pool2d_with_indices: _pool, aten.avg_pool2d: _pool,
        })
    elif convention == "macs_norm":
        aten = torch.ops.aten
        mapping.update({
            aten.native_batch_norm: _elements, aten._native_batch_norm_legit_no_training: _elements,
            aten.native_layer_norm: _layer_norm,
        })
    return mapping


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device, without copying its storage."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


class _ParameterReads(TorchDispatchMode):
    """Records which of ``params`` the dispatched operations read."""

    def __init__(self, params: Sequence[torch.Tensor]):
        super().__init__()
        self.params = {id(p): p for p in params}
        self.read: Dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor) and id(a) in self.params:
                self.read[id(a)] = a
        return func(*args, **kwargs)

    def numel(self) -> int:
        return sum(p.numel() for p in self.read.values())


def profile_exits(
        model: nn.Module,
        input_size: Optional[Sequence[int]] = None,
        convention: str = "macs",
        heads: bool = True,
) -> List[ExitCost]:
    """Cumulative MACs (in ``convention``) and parameters of every exit, for one image.

    Args:
        model: a multi-exit model, or any model (one exit).
        input_size: (C, H, W) of the image; default: the model's ``pretrained_cfg``.
        convention: how operations are counted, one of ``CONVENTIONS`` (see the module docstring).
        heads: ``False``: the stages alone, no exit head run (the backbone's cost up to each exit,
            e.g. to place exits by cost).

    Returns:
        One :class:`ExitCost` per exit, in order.
    """
    mapping = _counter_mapping(convention)
    if input_size is None:
        input_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        if input_size is None:
            raise ValueError("the model has no pretrained_cfg['input_size']; pass input_size=(C, H, W)")
    meta = meta_copy(model).eval()
    x = torch.empty(1, *input_size, device="meta")
    costs = []
    reads = _ParameterReads(list(meta.parameters()))
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter, reads:
        for i in _run_exits(meta, x, heads):
            costs.append(ExitCost(i + 1, counter.get_total_flops(), reads.numel()))
    return costs


def _run_exits(model: nn.Module, x: torch.Tensor, heads: bool = True) -> Iterator[int]:
    """Run ``model`` exit by exit (``heads=False``: stage by stage), yielding each exit's index once it
    is computed."""
    if not is_multi_exit(model):
        model(x)
        yield 0
        return
    state = model.forward_stem(x)
    for i in range(model.num_exits):
        state = model.forward_stage(state, i)
        if heads:
            model.forward_exit(state, i)
        yield i
