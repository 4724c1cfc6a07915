"""The multi-exit contract (``timm_exits.models.multi_exit``): a family that defines the three primitives
gets ``forward_until``, ``forward`` and ``forward_exits`` from the base class, eager and under TorchScript,
whatever its state (a tensor, or a list of tensors as MSDNet's)."""
import warnings
from typing import List

import pytest
import torch
from torch import nn

from timm_exits.models.multi_exit import MultiExitModel


class TensorState(MultiExitModel):
    """Three (stage, exit) pairs on one tensor."""

    def __init__(self):
        super().__init__()
        self.num_exits, self.exit_index = 3, 2
        self.stages = nn.ModuleList(nn.Conv2d(2, 2, 3, padding=1) for _ in range(3))
        self.exits = nn.ModuleList(nn.Linear(2, 4) for _ in range(3))

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def forward_stage(self, state: torch.Tensor, index: int) -> torch.Tensor:
        for i, stage in enumerate(self.stages):
            if i == index:
                return stage(state).relu()
        raise IndexError(index)

    def forward_exit(self, state: torch.Tensor, index: int, pre_logits: bool = False) -> torch.Tensor:
        for i, head in enumerate(self.exits):
            if i == index:
                return head(state.mean((2, 3)))
        raise IndexError(index)


class ListState(TensorState):
    """The same on a list of two tensors (a fine and a coarse scale)."""

    def forward_stem(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [x, nn.functional.avg_pool2d(x, 2)]

    def forward_stage(self, state: List[torch.Tensor], index: int) -> List[torch.Tensor]:
        for i, stage in enumerate(self.stages):
            if i == index:
                return [state[0], stage(state[1]).relu() + nn.functional.avg_pool2d(state[0], 2)]
        raise IndexError(index)

    def forward_exit(self, state: List[torch.Tensor], index: int, pre_logits: bool = False) -> torch.Tensor:
        for i, head in enumerate(self.exits):
            if i == index:
                return head(state[-1].mean((2, 3)))
        raise IndexError(index)


@pytest.mark.parametrize("family", [TensorState, ListState])
def test_the_three_primitives_make_a_model_eager_and_scripted(family):
    torch.manual_seed(0)
    model = family().eval()
    x = torch.randn(2, 2, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(model)
    with torch.no_grad():
        logits = model.forward_exits(x)
        assert len(logits) == 3
        for k in range(3):
            state = model.forward_stem(x)
            for i in range(k + 1):
                state = model.forward_stage(state, i)
            until = model.forward_until(x, k)
            assert all(torch.equal(a, b) for a, b in zip(until, state)) if isinstance(state, list) \
                else torch.equal(until, state)
            assert torch.equal(model.forward_exit(until, k), logits[k])
            model.set_exit(k)
            scripted.exit_index = k
            assert torch.equal(model(x), logits[k])
            torch.testing.assert_close(scripted(x), logits[k])
