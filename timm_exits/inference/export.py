"""Export a multi-exit model for deployment: one ``torch.export`` program per stem, stage and exit.

The folder holds ``stem.pt2``, ``stage_<k>.pt2``, ``exit_<k>.pt2`` (dynamic batch size) and
``manifest.json``; :class:`ExportedModel` runs them, with or without early exit, without the
Python model code. It has the same ``forward_stem`` / ``forward_stage`` / ``forward_exit``
interface, so :class:`~timm_exits.inference.executor.EarlyExitExecutor` runs it too.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import List, Sequence

import torch
from torch import nn
from torch.export import Dim, export, load, save

from .executor import EarlyExitExecutor

__all__ = ["export_model", "ExportedModel"]

_BATCH = Dim("batch", min=1, max=1 << 20)


class _Piece(nn.Module):
    """One piece of the contract as a module with a single forward, for torch.export."""

    def __init__(self, model: nn.Module, kind: str, index: int = 0):
        super().__init__()
        self.model, self.kind, self.index = model, kind, index

    def forward(self, x):
        if self.kind == "stem":
            return self.model.forward_stem(x)
        if self.kind == "stage":
            return self.model.forward_stage(x, self.index)
        return self.model.forward_exit(x, self.index)


def _batch_dims(state):
    return {0: _BATCH} if isinstance(state, torch.Tensor) else [{0: _BATCH} for _ in state]


@torch.no_grad()
def export_model(model: nn.Module, example: torch.Tensor, folder: str, name: str = "") -> List[str]:
    """Export every piece of ``model`` (in eval mode) for inputs shaped like ``example``; the batch
    size stays dynamic. The folder is written completely or not at all. Returns the file names."""
    model.eval()
    if example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()  # batch 1 would be specialised
    tmp = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(os.path.abspath(folder)) or ".")
    try:
        def write(file: str, piece: _Piece, arg) -> None:
            save(export(piece, (arg,), dynamic_shapes=(_batch_dims(arg),)), os.path.join(tmp, file))
            files.append(file)

        files: List[str] = []
        write("stem.pt2", _Piece(model, "stem"), example)
        state = model.forward_stem(example)
        for k in range(model.num_exits):
            write(f"stage_{k}.pt2", _Piece(model, "stage", k), state)
            state = model.forward_stage(state, k)
            write(f"exit_{k}.pt2", _Piece(model, "exit", k), state)
        manifest = {"model": name, "num_exits": model.num_exits, "input_shape": list(example.shape[1:]), "files": files}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


class ExportedModel:
    """An exported multi-exit model loaded from its folder."""

    def __init__(self, folder: str):
        path = os.path.join(folder, "manifest.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder} has no manifest.json: not a folder written by export_model")
        with open(path) as f:
            manifest = json.load(f)
        self.name, self.num_exits = manifest["model"], manifest["num_exits"]
        self.input_shape = tuple(manifest["input_shape"])
        program = lambda file: load(os.path.join(folder, file)).module()  # noqa: E731
        self.stem = program("stem.pt2")
        self.stages = [program(f"stage_{k}.pt2") for k in range(self.num_exits)]
        self.exits = [program(f"exit_{k}.pt2") for k in range(self.num_exits)]

    def forward_stem(self, x: torch.Tensor):
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected inputs of shape (batch, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        return self.stem(x)

    def forward_stage(self, state, index: int):
        return self.stages[index](state)

    def forward_exit(self, state, index: int) -> torch.Tensor:
        return self.exits[index](state)

    def forward_exits(self, x: torch.Tensor) -> List[torch.Tensor]:
        state, out = self.forward_stem(x), []
        for k in range(self.num_exits):
            state = self.forward_stage(state, k)
            out.append(self.forward_exit(state, k))
        return out

    def early_exit(self, x: torch.Tensor, thresholds: Sequence[float], policy: str = "maxprob"):
        """Early-exit inference with the exported programs (see :class:`EarlyExitExecutor`)."""
        return EarlyExitExecutor(self, thresholds, policy)(x)
