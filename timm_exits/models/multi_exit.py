"""The multi-exit contract shared by every model of the package.

A multi-exit model is a stem followed by N (stage, exit) pairs. Subclasses provide three
primitives, and everything else (``forward``, ``forward_exits``, stopping at exit k, the
early-exit executor, cost profiling) is built on them:

* ``forward_stem(x) -> state``
* ``forward_stage(state, index) -> state``
* ``forward_exit(state, index, pre_logits=False) -> Tensor``

A *state* is a tensor or a list of tensors (MSDNet keeps one tensor per scale) whose first
dimension is the batch, so it can be sliced by sample with :func:`slice_state`. A model with a faster
way through all its stages at once overrides ``forward_exits`` and ``forward`` itself (the fused MSDNet).
"""

import abc
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .branch_gradients import deconflict_branch, detach_channels, scale_grad
from .capabilities import is_multi_exit
from .training_outputs import TrainingOutputs


State = Union[torch.Tensor, List[torch.Tensor]]

__all__ = ["MultiExitModel", "State", "slice_state", "exit_logits"]


def slice_state(state: State, index: Union[torch.Tensor, slice, Sequence[int]]) -> State:
    """Select samples (first dimension) of a state.

    Args:
        state: a tensor or nested lists of tensors, the batch first in each.
        index: the samples to keep: a boolean mask, indices or a slice, as tensor indexing takes.

    Returns:
        The state of the selected samples, of the same structure.
    """
    if isinstance(state, torch.Tensor):
        return state[index]
    return [slice_state(s, index) for s in state]


def exit_logits(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """Every exit's logits of a multi-exit model; a plain model's one output (at an ADN network's
    selected depth, whatever the training mode), as a list.

    Args:
        model: a multi-exit model, or a timm model (``forward_features`` and ``forward_head``).
        x: the input batch.

    Returns:
        One ``(batch, classes)`` logits tensor per exit, in order.
    """
    if is_multi_exit(model):
        return model.forward_exits(x)
    return [model.forward_head(model.forward_features(x))]


class MultiExitModel(nn.Module, metaclass=abc.ABCMeta):
    """Base class: a stem, then ``num_exits`` (stage, exit) pairs.

    ``model(x)`` returns the logits of one exit (the last by default, see :meth:`set_exit`)
    and computes only the stages that exit needs; :meth:`forward_exits` returns all of them.
    In training mode ``model(x)`` returns the tuple of every exit up to the active one (see
    :meth:`set_multi_exit_training`), so that a training forward uses every parameter; created with
    ``multi_exit_training=False`` it returns the active exit's logits, as in evaluation.
    """

    num_exits: int
    exit_index: int  # 0-based exit used by forward(); set with set_exit()
    gradient_equilibrium: bool = False  # see forward_exits
    gradient_deconfliction: Optional[str] = None  # None, "symmetric" or "protect_deeper"; see forward_exits
    feature_surgery: Optional[float] = None  # None or the fraction of channels passing the next stage's gradient
    multi_exit_training: bool = True  # see set_multi_exit_training

    @abc.abstractmethod
    def forward_stem(self, x: torch.Tensor) -> State:
        """Check the input and compute the state that stage 0 reads."""

    @abc.abstractmethod
    def forward_stage(self, state: State, index: int) -> State:
        """Run stage ``index`` on a state.

        Args:
            state: the state after stage ``index - 1`` (the stem's for stage 0).
            index: the stage (0-based).

        Returns:
            The state after stage ``index``, which exit ``index`` and stage ``index + 1`` read.
        """

    @abc.abstractmethod
    def forward_exit(self, state: State, index: int, pre_logits: bool = False) -> torch.Tensor:
        """Logits of exit ``index``.

        Args:
            state: the state after stage ``index``.
            index: the exit (0-based).
            pre_logits: return the pooled features the classifier reads instead of the logits.

        Returns:
            The logits ``(batch, classes)``, or the pooled features.
        """

    def set_exit(self, index: Optional[int] = None) -> None:
        """Make ``forward`` stop at exit ``index`` (0-based; negative counts from the end;
        ``None`` means the last exit)."""
        if index is None:
            index = self.num_exits - 1
        if not -self.num_exits <= index < self.num_exits:
            raise ValueError(f"exit index must be in [{-self.num_exits}, {self.num_exits - 1}], got {index}")
        self.exit_index = index % self.num_exits

    def scale_state_grad(self, state: State, factor: float) -> State:
        """The state with its gradient scaled where Gradient Equilibrium acts (here: every tensor;
        MSDNet: the coarsest scale only, as the IMTA reference).

        Args:
            state: a state at a branch point.
            factor: the factor its gradient is multiplied by in the backward pass.

        Returns:
            The state, unchanged in the forward pass.
        """
        if isinstance(state, torch.Tensor):
            return scale_grad(state, factor)
        return [self.scale_state_grad(s, factor) for s in state]

    def split_state_grad(self, state: State, keep: float) -> State:
        """The state the next stage reads under Deep Feature Surgery: its values, with the gradient of
        the last channels stopped (:func:`~.branch_gradients.detach_channels`). Here: every tensor along
        dimension 1; MSDNet: the coarsest scale only, as the reference; a backbone with exits: the
        channels of its layout (dimension 1 of NCHW maps, the last of tokens and NHWC maps).

        Args:
            state: a state at a branch point.
            keep: the fraction of the channels (the first ones) whose gradient passes, in (0, 1).

        Returns:
            The state, unchanged in the forward pass.
        """
        if isinstance(state, torch.Tensor):
            return detach_channels(state, keep, 1)
        return [self.split_state_grad(s, keep) for s in state]

    def forward_exits(self, x: torch.Tensor, last: Optional[int] = None) -> List[torch.Tensor]:
        """Logits of every exit, in order: every stage first, then the heads, so that a traced graph
        (torch.fx) ends with the exits' outputs.

        The switches change only the backward pass, at the branch points (the state after stage i,
        0-based, of the N exits computed, read by exit i and by stage i+1):

        * ``gradient_equilibrium`` (IMTA, ICCV 2019): exit i's gradient is scaled by 1/(N-i), the deeper
          network's by (N-i-1)/(N-i), so every stage receives the mean instead of the sum of the
          gradients of the exits that depend on it.
        * ``gradient_deconfliction`` (ICIP 2020, branch level): where exit i's gradient and the deeper
          network's conflict, each is projected onto the normal plane of the other (``"protect_deeper"``:
          only exit i's) before they are added; see :mod:`timm_exits.models.branch_gradients`.
        * ``feature_surgery`` (Deep Feature Surgery, ECCV 2024), a fraction beta in (0, 1): stage i+1
          reads ``[x_a | sg(x_b)]``, its gradient reaching only the first beta of the channels
          (:meth:`split_state_grad`); exit i reads the state with its gradient through all of them.

        Together, at a branch point, the deeper network's gradient is first cut to the kept channels,
        then scaled by Gradient Equilibrium (masking and scaling commute), then deconflicted against
        exit i's (itself scaled): deconfliction compares the gradients the two branches actually send.
        The stopped channels receive exit i's gradient alone (scaled by 1/(N-i) under GE).

        Args:
            x: the input batch.
            last: compute exits 0..``last`` only (0-based); ``None``: every exit.

        Returns:
            One ``(batch, classes)`` logits tensor per exit computed.
        """
        n = self.num_exits if last is None else last + 1
        state = self.forward_stem(x)
        head_inputs = []
        for i in range(n):
            state = self.forward_stage(state, i)
            head_in = state
            if i < n - 1 and torch.is_grad_enabled():
                if self.gradient_deconfliction:
                    head_in, state = self._deconflict(state)
                if self.gradient_equilibrium:
                    head_in = self.scale_state_grad(head_in, 1.0 / (n - i))
                    state = self.scale_state_grad(state, (n - i - 1) / (n - i))
                if self.feature_surgery is not None:
                    state = self.split_state_grad(state, self.feature_surgery)
            head_inputs.append(head_in)
        return [self.forward_exit(h, i) for i, h in enumerate(head_inputs)]

    def _deconflict(self, state: State):
        if self.gradient_deconfliction not in ("symmetric", "protect_deeper"):
            raise ValueError(f"gradient_deconfliction must be None, 'symmetric' or 'protect_deeper', "
                             f"got {self.gradient_deconfliction!r}")
        protect = self.gradient_deconfliction == "protect_deeper"
        if isinstance(state, torch.Tensor):
            return deconflict_branch(state, protect)
        pairs = [deconflict_branch(s, protect) for s in state]
        return [h for h, _ in pairs], [t for _, t in pairs]

    def forward_until(self, x: torch.Tensor, index: int):  # -> State: left to TorchScript to infer per family
        """The state after stage ``index``, running no exit head.

        Args:
            x: the input batch.
            index: the last stage to run (0-based).

        Returns:
            The state after that stage.
        """
        state = self.forward_stem(x)
        for i in range(index + 1):
            state = self.forward_stage(state, i)
        return state

    def set_multi_exit_training(self, enable: bool = True) -> None:
        """In training mode, ``model(x)`` returns the tuple of the logits of exits 1..k (k the active
        exit) when enabled (the default), one tensor (exit k) when not.

        The tuple (a :class:`TrainingOutputs`) is what training a multi-exit network needs: every parameter
        gets a gradient (timm's premise, and DDP's without ``find_unused_parameters``), and a loss
        written for one tensor fails with a message that says what to do instead of silently training
        the last exit alone. Disabled (``multi_exit_training=False`` at creation, which timm's
        ``--model-kwargs`` reaches), timm's own training loop trains exit k alone. Evaluation mode
        always returns one tensor. (The same switch as DeiT's ``set_distilled_training``.)
        """
        self.multi_exit_training = enable

    @torch.jit.unused
    def forward_train_outputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The logits of exits 1..k (k the active exit), computing each stage once, with the training
        switches of :meth:`forward_exits` (over those k exits)."""
        return TrainingOutputs(self.forward_exits(x, self.exit_index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # a scripted model returns one tensor
            if self.training and self.multi_exit_training:
                return self.forward_train_outputs(x)
        k = self.exit_index
        return self.forward_exit(self.forward_until(x, k), k)
