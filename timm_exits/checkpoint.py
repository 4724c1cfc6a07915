"""Checkpoints that load without unpickling code, written completely or not at all.

A checkpoint is a folder:

* ``model.safetensors``: the model's weights;
* ``training.pt``: optimizer, scheduler and RNG states and whatever else the trainer keeps (tensors
  and plain Python data only, loaded with ``torch.load(weights_only=True)``), if given;
* ``state.json``: the model name and whatever the caller records (epoch, step, metrics).

The folder is written whole or not at all (:func:`timm_exits.files.atomic_folder`): a crash never
leaves a half-written checkpoint where a complete one is expected, and the previous checkpoint
survives until the new one is complete.
"""
from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch
import timm
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models import load_state_dict as timm_load_state_dict
from torch import nn

from .files import atomic_folder

__all__ = ["save_checkpoint", "load_checkpoint", "training_state", "rng_state", "set_rng_state", "pretrained_file",
           "keep_file_classifiers"]


def pretrained_file(pretrained: bool, pretrained_cfg_overlay: Optional[dict]) -> Optional[str]:
    """The weights file a ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``
    call will load, checked to exist (timm's own error does not name it); None if no file is asked for."""
    file = (pretrained_cfg_overlay or {}).get("file") if pretrained else None
    if file and not os.path.isfile(file):
        raise FileNotFoundError(f"pretrained weights file not found: {file!r} (pretrained_cfg_overlay['file'])")
    return file


def _tensor_shapes(file: str) -> Dict[str, tuple]:
    """Name -> shape of every tensor in a weights file (safetensors: read from the header only)."""
    if file.endswith(".safetensors"):
        with safe_open(file, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in timm_load_state_dict(file).items()}


def keep_file_classifiers(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``timm.create_model`` kwargs under which a weights file whose classifiers already have the
    requested ``num_classes`` keeps them: timm drops every classifier when ``num_classes`` differs from
    the cfg's (e.g. a 10-class run of a 100-class variant), which would silently re-initialise them."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    file = pretrained_file(pretrained, overlay)
    if not file or "num_classes" not in kwargs or "num_classes" in overlay:
        return kwargs
    names = timm.models.get_pretrained_cfg(variant).classifier
    shapes = _tensor_shapes(file)
    found = {shapes[f"{n}.weight"][0] for n in ((names,) if isinstance(names, str) else names) if f"{n}.weight" in shapes}
    if found != {kwargs["num_classes"]}:
        return kwargs  # another class count (or another layout): timm's behaviour, new classifiers
    return {**kwargs, "pretrained_cfg_overlay": {**overlay, "num_classes": kwargs["num_classes"]}}


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


def save_checkpoint(
        folder: str,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scheduler: Optional[Any] = None,
        model_name: str = "",
        training: Optional[Dict[str, Any]] = None,
        **state: Any,
) -> str:
    """Write ``model`` (and the training state, if an optimizer is given: its state, the scheduler's,
    this process's RNG states, and ``training``, e.g. per-process RNG states or an EMA model's
    weights) to ``folder``; extra keyword arguments (JSON-serialisable) go to ``state.json``.
    Replaces an existing checkpoint atomically."""
    with atomic_folder(folder) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, os.path.join(tmp, "model.safetensors"))
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
) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and the optimizer,
    scheduler and RNG states); returns ``state.json``. A checkpoint of another model is refused."""
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise FileNotFoundError(f"{folder!r} is not a checkpoint: expected model.safetensors and state.json in it")
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    if model_name is not None and state.get("model") not in ("", model_name):
        raise ValueError(f"{folder!r} is a checkpoint of {state['model']!r}, not of {model_name!r}")
    weights = load_file(os.path.join(folder, "model.safetensors"))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{folder!r} does not fit this model: {e}") from None
    if optimizer is not None:
        training = training_state(folder)
        optimizer.load_state_dict(training["optimizer"])
        if scheduler is not None and "scheduler" in training:
            scheduler.load_state_dict(training["scheduler"])
        if restore_rng:
            set_rng_state(training["rng"])
    return state


def training_state(folder: str) -> Dict[str, Any]:
    """The training state of a checkpoint (``training.pt``), loaded without unpickling code."""
    path = os.path.join(folder, "training.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} holds weights only; resuming needs its training.pt")
    return torch.load(path, map_location="cpu", weights_only=True)
