"""Checkpoints that load without unpickling code, written completely or not at all.

A checkpoint is a folder:

* ``model.safetensors``: the model's weights;
* ``training.pt``: optimizer, scheduler and RNG states and whatever else the trainer keeps (tensors
  and plain Python data only, loaded with ``torch.load(weights_only=True)``), if given;
* ``state.json``: the model name and whatever the caller records (epoch, step, metrics).

The folder is written whole or not at all (:func:`timm_exits.files.atomic_folder`): a crash never
leaves a half-written checkpoint where a complete one is expected, and the previous checkpoint
survives until the new one is complete. Only a checkpoint folder (or an empty one) is replaced. A
file that cannot be read, or is not what a checkpoint holds, is a ValueError naming it.
"""
from __future__ import annotations

import json
import os
import pickle
import random
from typing import Any, Dict, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .files import atomic_folder, write_weights

__all__ = ["save_checkpoint", "load_checkpoint", "training_state", "rng_state", "set_rng_state"]


def rng_state() -> Dict[str, Any]:
    """The RNG states of Python, NumPy and torch (CPU, and CUDA if present), as tensors and plain data."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _older_checkpoint(folder: str) -> bool:
    """Whether ``folder`` is a checkpoint an older version wrote (no marker): exactly a checkpoint's files."""
    names = set(os.listdir(folder))
    return {"model.safetensors", "state.json"} <= names <= {"model.safetensors", "state.json", "training.pt"} and all(
        os.path.isfile(os.path.join(folder, name)) for name in names)


def _damaged(path: str, problem: str) -> ValueError:
    return ValueError(f"{path!r} {problem}: the checkpoint is damaged or was not written by timm-exits; restore it "
                      f"from a copy, or remove the checkpoint folder to start afresh")


def save_checkpoint(
        folder: str,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scheduler: Optional[Any] = None,
        model_name: str = "",
        training: Optional[Dict[str, Any]] = None,
        **state: Any,
) -> str:
    """Write ``model`` and, if an optimizer is given, the training state to ``folder``. Replaces an
    existing checkpoint atomically.

    Args:
        folder: the checkpoint folder.
        model: the model whose weights are saved (``model.safetensors``).
        optimizer: its state is saved (``training.pt``, with this process's RNG states); None:
            weights only.
        scheduler: its state is saved too (with an optimizer).
        model_name: recorded in ``state.json``, checked on load.
        training: more of the training state for ``training.pt`` (e.g. per-process RNG states or
            an EMA model's weights).
        **state: JSON-serialisable values for ``state.json``.

    Returns:
        ``folder``.

    Raises:
        FileExistsError: ``folder`` holds anything but a checkpoint; it is left untouched.
    """
    with atomic_folder(folder, "checkpoint", _older_checkpoint) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        write_weights(weights, os.path.join(tmp, "model.safetensors"))
        if optimizer is not None:
            everything = {"optimizer": optimizer.state_dict(), "rng": rng_state(), **(training or {})}
            if scheduler is not None:
                everything["scheduler"] = scheduler.state_dict()
            torch.save(everything, os.path.join(tmp, "training.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"model": model_name, **state}, f, indent=2)
    return folder


def load_checkpoint(
        folder: str,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scheduler: Optional[Any] = None,
        model_name: Optional[str] = None,
        restore_rng: bool = True,
        run_id: Optional[str] = None,
) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and the optimizer,
    scheduler and RNG states).

    Args:
        folder: the checkpoint folder.
        model: loads its weights.
        optimizer: loads the training state; None: the weights only.
        scheduler: loads its state too (with an optimizer).
        model_name: a checkpoint of another model is refused; None: not checked.
        restore_rng: restore the RNG states (with an optimizer).
        run_id: a checkpoint recording another run id (another run's checkpoint copied here) is
            refused; None: not checked.

    Returns:
        The contents of ``state.json``.

    Raises:
        FileNotFoundError: ``folder`` is not a checkpoint.
        ValueError: the checkpoint is damaged, of another model or run, or does not fit.
    """
    names = ("model.safetensors", "state.json")
    if not os.path.isdir(folder) or not any(os.path.lexists(os.path.join(folder, n)) for n in names):
        raise FileNotFoundError(f"{folder!r} is not a checkpoint: expected model.safetensors and state.json in it")
    path = os.path.join(folder, "state.json")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise _damaged(path, f"cannot be read as JSON ({e})") from None
    if not isinstance(state, dict):
        raise _damaged(path, f"holds a {type(state).__name__}, not a mapping")
    if run_id is not None and state.get("run_id", run_id) != run_id:
        raise ValueError(f"{folder!r} belongs to another run (run id {state['run_id']!r}, this run's is {run_id!r}): "
                         f"it was copied from another run's folder; resume that run in its own folder, or remove "
                         f"this checkpoint to start afresh")
    if model_name is not None and state.get("model") not in ("", model_name):
        raise ValueError(f"{folder!r} is a checkpoint of {state['model']!r}, not of {model_name!r}")
    path = os.path.join(folder, "model.safetensors")
    try:
        weights = load_file(path)
    except (OSError, SafetensorError) as e:
        raise _damaged(path, f"cannot be read as safetensors weights ({e})") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{folder!r} does not fit this model: {e}") from None
    if optimizer is not None:
        training = training_state(folder)
        try:
            optimizer.load_state_dict(training["optimizer"])
            if scheduler is not None and "scheduler" in training:
                scheduler.load_state_dict(training["scheduler"])
            if restore_rng:
                set_rng_state(training["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise _damaged(os.path.join(folder, "training.pt"), f"does not fit this optimizer and scheduler "
                                                                 f"({type(e).__name__}: {e})") from None
    return state


def training_state(folder: str) -> Dict[str, Any]:
    """The training state of a checkpoint (``training.pt``), loaded without unpickling code."""
    path = os.path.join(folder, "training.pt")
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{folder!r} holds weights only; resuming needs its training.pt")
    try:
        training = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # PyTorch's own message is a page of advice on allowing unsafe globals
        raise _damaged(path, "is not a timm-exits training state (not a weights-only PyTorch file: it holds "
                             "pickled Python objects, which are never loaded, or is no PyTorch file at all)") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _damaged(path, f"cannot be read as a PyTorch file ({first})") from None
    if not isinstance(training, dict) or not {"optimizer", "rng"} <= training.keys():
        raise _damaged(path, "is not a timm-exits training state (expected a mapping with 'optimizer' and 'rng')")
    return training
