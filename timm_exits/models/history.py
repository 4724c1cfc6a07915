"""The exit-history state: a multi-exit model whose exit i answers from its own logits and from what
exits 0..i-1 produced.

Some methods combine an exit's logits with what the earlier exits gave: BoostNet adds a running sum of
the earlier exits' logits, ZTW's cascade reads the previous exit's logits and its ensembles the stacked
log-probabilities of every earlier exit. :class:`ExitHistoryModel` wraps any multi-exit model (MSDNet,
a backbone with exits, ...) and keeps that history in its state::

    state = [wrapped model's state, this exit's output, history]

where ``history`` is a list of per-sample tensors (``[]`` before exit 0: previous logits (B, C), a
running sum (B, C), stacked log-probabilities (B, i, C), ...). Every part has the batch first, so
:func:`~timm_exits.models.multi_exit.slice_state` slices it: the early-exit executor, batch compaction,
profiling and ``forward_exits`` work unchanged. A subclass defines one method, :meth:`combine`.
"""
from __future__ import annotations

import abc
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from .capabilities import is_multi_exit
from .multi_exit import MultiExitModel

__all__ = ["ExitHistoryModel"]


def _wrapped_switch(name: str) -> property:
    """The wrapped model's training switch ``name``, read and set through the wrapper."""

    def get(self: "ExitHistoryModel") -> Any:
        return getattr(self.model, name)

    def set_(self: "ExitHistoryModel", value: Any) -> None:
        setattr(self.model, name, value)

    return property(get, set_)


class ExitHistoryModel(MultiExitModel):
    """A multi-exit model around another whose exits' outputs are :meth:`combine` of the wrapped
    exits' logits and the history of the exits before.

    The training switches of the wrapped model (``gradient_equilibrium``, ``gradient_deconfliction``,
    ``feature_surgery``) are this model's: :meth:`forward_exits` runs the wrapped model's, so they act at its branch points.

    Args:
        model: the multi-exit model wrapped.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not is_multi_exit(model):
            raise ValueError(f"{type(self).__name__} wraps a multi-exit model (see timm_exits.add_exits), "
                             f"got {type(model).__name__}")
        self.model = model
        self.num_exits = model.num_exits
        self.exit_index = self.num_exits - 1
        self.num_classes = model.num_classes
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        self.num_features = getattr(model, "num_features", 0)
        self.exit_widths = list(getattr(model, "exit_widths", []))

    @abc.abstractmethod
    def combine(self, logits: torch.Tensor, history: List[torch.Tensor],
                index: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Exit ``index``'s output from the wrapped exit's logits and the history of the exits before it.

        Args:
            logits: the wrapped model's logits at exit ``index``, ``(B, C)``.
            history: the per-sample tensors left by the exits before it (``[]`` at exit 0).
            index: the exit (0-based).

        Returns:
            ``(output, history)``: the exit's output, and the history after this exit.
        """

    # the wrapped model's training switches (see MultiExitModel.forward_exits)
    gradient_equilibrium = _wrapped_switch("gradient_equilibrium")
    gradient_deconfliction = _wrapped_switch("gradient_deconfliction")
    feature_surgery = _wrapped_switch("feature_surgery")

    def forward_stem(self, x: torch.Tensor) -> list:
        return [self.model.forward_stem(x), x.new_zeros(x.shape[0], 0), []]

    def forward_stage(self, state: list, index: int) -> list:
        inner = self.model.forward_stage(state[0], index)
        output, history = self.combine(self.model.forward_exit(inner, index), state[2], index)
        return [inner, output, history]

    def forward_exit(self, state: list, index: int, pre_logits: bool = False) -> torch.Tensor:
        """The combined output of exit ``index``; ``pre_logits``: the wrapped exit's pooled features."""
        if pre_logits:
            return self.model.forward_exit(state[0], index, pre_logits=True)
        return state[1]

    def forward_exits(self, x: torch.Tensor, last: Optional[int] = None) -> List[torch.Tensor]:
        """Every exit's combined output (or those of exits 0..``last``), from the wrapped model's
        ``forward_exits`` (with its training switches)."""
        outputs, history = [], []
        for i, logits in enumerate(self.model.forward_exits(x, last)):
            output, history = self.combine(logits, history, i)
            outputs.append(output)
        return outputs
