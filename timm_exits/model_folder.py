"""A trained model as a timm model folder: ``model.safetensors`` beside timm's ``config.json``.

The folder says what it holds: the architecture and the arguments it was built with
(``num_classes``, ``in_chans``, ``img_size``, ...), the preprocessing the weights expect (input
size, mean, std, crop, interpolation), the class names in the order of the outputs (timm's
``label_names``, if known) and, in a ``timm_exits`` section, how it was made (technique, phase, the
run config). A model that wraps a network (IMTA phase II, BoostNet, ZTW, product anytime) is a timm
architecture of its own (:mod:`timm_exits.models.wrappers`), its arguments naming the network's. timm
itself rebuilds it::

    model = timm.create_model("local-dir:FOLDER", pretrained=True)
    data_config = timm.data.resolve_data_config({}, model=model)

:func:`load_model_folder` does the same from a folder or from a weights file with ``config.json``
beside it, takes overrides, and refuses what does not fit with a message that says why;
:func:`export_model_folder` exports it for deployment.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from timm.models import resolve_model_input_args
from timm.models._hub import save_config_for_hf
from torch import nn

from .config import check_preprocessing, resolve_preprocessing
from .files import atomic_file, read_json, read_weights, write_weights
from .inference.budgeted import Thresholds
from .inference.export import export_model
from .models.exits import BackboneWithExits

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "DATA_KEYS", "save_model_folder", "load_model_folder", "model_folder_files",
           "read_model_config", "export_model_folder"]

CONFIG_FILE, WEIGHTS_FILE, SECTION = "config.json", "model.safetensors", "timm_exits"
DATA_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")
# an earlier version saved a wrapper as its network's architecture, with the wrapper's settings in a
# section of ours named after the registered wrapper
EARLIER_WRAPPERS = ("imta", "boostnet", "ztw")


def save_model_folder(model: nn.Module, folder: str, data_config: Optional[Dict[str, Any]] = None,
                      label_names: Optional[Sequence[str]] = None, **info: Any) -> str:
    """Write ``model`` to ``folder`` as ``model.safetensors`` and timm's ``config.json``, both or
    neither: everything is checked and written to temporary files first, then each is renamed into
    place. A model that wraps a network (IMTA phase II, BoostNet, ZTW, product anytime) is stored as
    its own architecture, with the network's name and arguments and its settings as ``model_args``.

    Args:
        model: a model made by ``timm.create_model`` (or a wrapper of one).
        folder: the folder to write (created if needed).
        data_config: the preprocessing the model expects (timm's ``resolve_data_config`` keys,
            finite, in range, a channel count that fits the model).
        label_names: the class names in the order of the outputs (timm's ``label_names``; default:
            the model's pretrained cfg's, if any).
        **info: JSON values (e.g. ``technique``, ``phase``, ``config``) for the config's
            ``timm_exits`` section.

    Returns:
        ``folder``.
    """
    if not (getattr(model, "pretrained_cfg", None) or {}).get("architecture"):
        raise ValueError(f"{type(model).__name__} was not made by timm.create_model (nor wraps a network that was): "
                         f"a model folder needs its architecture name and pretrained cfg")
    for part in model.modules():
        arch = part.pretrained_cfg.get("architecture") if isinstance(part, BackboneWithExits) else None
        if arch is not None and arch not in timm.list_models("*_exits"):
            raise ValueError(f"this model was built by add_exits({arch!r}, ...): no timm architecture name rebuilds it "
                             f"with its exits, so a model folder would hold a plain {arch}. Build it with "
                             f"timm.create_model and a registered variant (timm.list_models('*_exits'), e.g. "
                             f"'resnet18_exits', with exits=..., head=... as arguments), or save its state_dict")
    data = {k: v for k, v in (data_config or {}).items() if k in DATA_KEYS and v is not None}
    data = check_preprocessing(data, lambda key: f"data_config[{key!r}]")
    if label_names is not None and (len(label_names) != model.num_classes or
                                    not all(isinstance(n, str) for n in label_names)):
        raise ValueError(f"label_names must be {model.num_classes} class names (one per output), got {label_names!r}")
    os.makedirs(folder, exist_ok=True)
    with atomic_file(os.path.join(folder, WEIGHTS_FILE)) as weights, atomic_file(os.path.join(folder, CONFIG_FILE)) as tmp:
        save_config_for_hf(model, tmp, data_config=data,
                           model_config={"label_names": list(label_names)} if label_names is not None else None)
        with open(tmp) as f:
            config = json.load(f)
        config[SECTION] = json.loads(json.dumps(info, default=str))
        text = json.dumps(config, indent=2, allow_nan=False)  # strict JSON: a NaN or infinity is refused, not written
        with open(tmp, "w") as f:
            f.write(text)
        write_weights({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, weights,
                  metadata={"format": "pt"})
    return folder


def build_model(name: str, kwargs: Dict[str, Any], source: str) -> nn.Module:
    """``timm.create_model(name, **kwargs)``.

    Args:
        name: a registered timm model name.
        kwargs: its arguments.
        source: where the arguments came from, for the error.

    Returns:
        The model.

    Raises:
        ValueError: the architecture does not take an argument; it names ``source``.
    """
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        raise ValueError(f"{name} cannot be built with {source} ({e}); fix those arguments (--model-kwargs)") from None


def model_folder_files(path: str) -> Tuple[str, str]:
    """``(config.json, weights file)`` of a model folder, or of a weights file with ``config.json``
    beside it."""
    if os.path.isdir(path):
        folder, weights, where = path, os.path.join(path, WEIGHTS_FILE), "in it"
    elif os.path.isfile(path):
        folder, weights, where = os.path.dirname(path) or ".", path, "beside it"
    else:
        raise FileNotFoundError(f"model folder or weights file not found: {path!r}")
    config = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config):
        raise ValueError(f"{path!r} is not a model folder: no {CONFIG_FILE} {where} (a folder written by "
                         f"timm_exits.model_folder.save_model_folder or timm's save_for_hf)")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"model folder {path!r} has no {WEIGHTS_FILE} file")
    return config, weights


def read_model_config(path: str) -> Dict[str, Any]:
    """The ``config.json`` of a model folder (or beside a weights file), checked to name a registered
    timm architecture."""
    config_file, _ = model_folder_files(path)
    config = read_json(config_file)
    arch = config.get("architecture") if isinstance(config, dict) else None
    if not arch or not isinstance(arch, str):
        raise ValueError(f"{config_file} names no 'architecture' (got {arch!r}); expected timm's config.json of a "
                         f"model folder")
    if not isinstance(config.get("model_args", {}), dict):
        raise ValueError(f"{config_file}: model_args must be a mapping of timm.create_model arguments, got "
                         f"{config['model_args']!r}")
    if not timm.is_model(arch):
        raise ValueError(f"{config_file} is for architecture {arch!r}, which is not a registered timm model (import "
                         f"the package that registers it)")
    saved = config.get("pretrained_cfg")
    if not isinstance(saved, dict):
        raise ValueError(f"{config_file} has no 'pretrained_cfg' mapping; expected timm's config.json of a model folder")
    check_preprocessing({k: saved.get(k) for k in DATA_KEYS if k != "crop_mode"},
                        lambda key: f"{config_file}: pretrained_cfg.{key}")
    names = config.get("label_names")
    if names is not None and not (isinstance(names, list) and len(names) == config.get("num_classes")
                                  and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{config_file}: label_names must be a list of {config.get('num_classes')} class names (one "
                         f"per output), got {names!r}")
    return config


def load_model_folder(
        path: str,
        data_config: Optional[Dict[str, Any]] = None,
        **model_kwargs: Any,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model of a model folder (or of a weights file with ``config.json`` beside it). Weights
    that do not fit the model so built are refused.

    Args:
        path: the model folder, or a weights file with ``config.json`` beside it.
        data_config: overrides of the saved preprocessing (``input_size``'s channels and, for
            fixed-size models, its height and width also rebuild the model); one mean or std value
            serves every channel.
        **model_kwargs: overrides of the saved ``timm.create_model`` arguments.

    Returns:
        The model in eval mode, and its data config.
    """
    config = read_model_config(path)
    config_file, weights = model_folder_files(path)
    given = {k: v for k, v in (data_config or {}).items() if k in DATA_KEYS and v is not None}
    folder = os.path.dirname(config_file)
    kwargs = resolve_model_input_args(f"local-dir:{os.path.abspath(folder)}", {"input_size": given.get("input_size")},
                                      **model_kwargs)
    name = kwargs.pop("model_name")
    earlier = [w for w in EARLIER_WRAPPERS if (config.get(SECTION) or {}).get(w)]
    if earlier:  # the network's architecture, rebuilt inside the wrapper its section names
        cfg = {**kwargs.pop("pretrained_cfg"), "architecture": earlier[0]}
        kwargs.pop("pretrained_model_args", None)
        kwargs = {"model": name, "model_args": kwargs, "pretrained_cfg": cfg, **config[SECTION][earlier[0]]}
        name = earlier[0]
    model = build_model(name, kwargs, f"the arguments of {config_file} and the ones given")
    try:
        model.load_state_dict(read_weights(weights))
    except RuntimeError as e:  # missing / unexpected keys, size mismatches
        raise ValueError(f"{weights} does not fit {config['architecture']} built with "
                         f"{ {**config.get('model_args', {}), **model_kwargs} }: {e}") from None
    return model.eval(), resolve_preprocessing(model, given, lambda key: f"data_config[{key!r}]")


def export_model_folder(path: str, folder: str, thresholds: Optional[Thresholds] = None,
                        extra_operators: Sequence[str] = ()) -> List[str]:
    """Export the model of a timm model folder with what its config says: the architecture as the
    name, its preprocessing (the input size the export takes) and its class names (``label_names``,
    if recorded).

    Args:
        path: the model folder, or a weights file with ``config.json`` beside it.
        folder: the export folder to write.
        thresholds, extra_operators: as in :func:`~timm_exits.inference.export.export_model`.

    Returns:
        What :func:`~timm_exits.inference.export.export_model` returns: the file names, besides
        the manifest.
    """
    model, data_config = load_model_folder(path)
    config = read_model_config(path)
    return export_model(model, torch.zeros(1, *data_config["input_size"]), folder, name=config["architecture"],
                        extra_operators=extra_operators, data_config=data_config,
                        label_names=config.get("label_names"), thresholds=thresholds)
