"""Pretrained weights from a file (``pretrained=True, pretrained_cfg_overlay=dict(file=...)``), as
the model files' ``_create_*`` helpers take them: the file checked to exist, and a file whose
classifiers already fit the requested ``num_classes`` kept whole."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import timm
from safetensors import safe_open
from timm.models import load_state_dict as timm_load_state_dict

__all__ = ["pretrained_file", "keep_file_classifiers"]


def pretrained_file(pretrained: bool, pretrained_cfg_overlay: Optional[dict]) -> Optional[str]:
    """The weights file a ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``
    call will load, checked to exist (timm's own error does not name it).

    Args:
        pretrained: the call's ``pretrained``.
        pretrained_cfg_overlay: the call's ``pretrained_cfg_overlay`` (``None``: none).

    Returns:
        The file's path, or ``None`` if no file is asked for.

    Raises:
        FileNotFoundError: the file asked for does not exist.
    """
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


def keep_file_classifiers(variant: str, pretrained: bool, kwargs: Dict[str, Any],
                          classifiers: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``timm.create_model`` kwargs under which a weights file whose classifiers already have the
    requested ``num_classes`` keeps them: timm drops every classifier when ``num_classes`` differs from
    the cfg's (e.g. a 10-class run of a 100-class variant), which would silently re-initialise them.

    Args:
        variant: the registered architecture name (its cfg names the classifiers).
        pretrained: the call's ``pretrained``.
        kwargs: the call's other keyword arguments; not modified.
        classifiers: the layers whose output count is the file's class count, under any name a file
            may give them (a model whose cfg also lists layers that read the logits); None: the
            cfg's classifiers.

    Returns:
        ``kwargs``, with ``num_classes`` added to the ``pretrained_cfg_overlay`` when the file's
        classifiers have that many outputs.
    """
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    file = pretrained_file(pretrained, overlay)
    if not file or "num_classes" not in kwargs or "num_classes" in overlay:
        return kwargs
    names = classifiers if classifiers is not None else timm.models.get_pretrained_cfg(variant).classifier
    shapes = _tensor_shapes(file)
    found = {shapes[f"{n}.weight"][0] for n in ((names,) if isinstance(names, str) else names) if f"{n}.weight" in shapes}
    if found != {kwargs["num_classes"]}:
        return kwargs  # another class count (or another layout): timm's behaviour, new classifiers
    return {**kwargs, "pretrained_cfg_overlay": {**overlay, "num_classes": kwargs["num_classes"]}}
