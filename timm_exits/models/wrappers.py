"""Models around a multi-exit network as timm architectures: IMTA's phase II, BoostNet, ZTW and
product anytime each wrap a trained network, and each is registered with timm under its own name
(``imta``, ``boostnet``, ``ztw``, ``product_anytime``). Their arguments are the wrapped network's
architecture name and ``timm.create_model`` arguments, and the wrapper's own settings::

    model = timm.create_model("imta", model="msdnet_cifar_5exit", model_args=dict(num_classes=10), isc="detach")

A wrapper built around a network (``IMTAModel(network)``) records the same arguments and the
network's pretrained cfg under its own name, so timm's ``config.json`` (``save_config_for_hf``,
:func:`~timm_exits.model_folder.save_model_folder`) describes it and
``timm.create_model("local-dir:FOLDER", pretrained=True)`` rebuilds it with its weights.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import timm
from timm.models import get_model_args, get_model_traits, load_pretrained, resolve_pretrained_cfg
from torch import nn

__all__ = ["NETWORK_ARGS", "record_wrapper_args", "create_wrapper", "wrapper_cfg"]

NETWORK_ARGS = ("num_classes", "in_chans", "img_size")  # a wrapper's create_model arguments that are its network's


def record_wrapper_args(wrapper: nn.Module, network: nn.Module, architecture: str, **settings: Any) -> None:
    """Give a wrapper the pretrained cfg and input traits (channels, size) of its network under the
    wrapper's architecture name, and the ``timm.create_model`` arguments that rebuild it: the network's
    architecture and arguments, and the wrapper's settings. A network not made by ``timm.create_model``
    has no architecture to record: neither has the wrapper, which cannot be saved as a model folder.

    Args:
        wrapper: the wrapper being built.
        network: the multi-exit network it wraps.
        architecture: the wrapper's registered name (e.g. ``"ztw"``).
        **settings: the wrapper's own ``timm.create_model`` arguments (a setting changed later is
            recorded again in ``wrapper._model_args``).
    """
    cfg = dict(getattr(network, "pretrained_cfg", None) or {})
    wrapper.pretrained_cfg = wrapper.default_cfg = {**cfg, "architecture": architecture} if cfg.get("architecture") \
        else cfg
    wrapper._traits = {k: v for k, v in get_model_traits(network).items() if k != "num_classes"}
    wrapper._model_args = {"model": cfg.get("architecture"), "model_args": get_model_args(network), **settings}


def create_wrapper(
        cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool = False,
        model: Optional[str] = None,
        model_args: Optional[Dict[str, Any]] = None,
        pretrained_cfg: Optional[Any] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
        pretrained_model_args: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> nn.Module:
    """``cls`` around ``timm.create_model(model, **model_args)``: a wrapper's timm entrypoint.

    Args:
        cls: the wrapper class, which takes the network and then its settings.
        variant: the wrapper's registered name (e.g. ``"ztw"``).
        pretrained: load the weights its pretrained cfg names (``file``, a model folder's own) into
            the whole wrapper.
        model: the registered name of the multi-exit network.
        model_args: the network's ``timm.create_model`` arguments.
        pretrained_cfg: the cfg timm gives (e.g. from a model folder's ``config.json``); ``None``: the
            network's.
        pretrained_cfg_overlay: entries that override the pretrained cfg.
        cache_dir: where timm caches downloaded weights.
        pretrained_model_args: what timm records of the checkpoint's arguments, kept on the wrapper.
        **kwargs: ``num_classes``, ``in_chans`` and ``img_size`` go to the network, the rest to ``cls``.

    Returns:
        The wrapper.
    """
    if not isinstance(model, str) or not timm.is_model(model):
        raise ValueError(f"{variant} wraps a registered multi-exit timm model: give its architecture name, e.g. "
                         f"timm.create_model({variant!r}, model='msdnet_cifar_5exit', model_args=dict(...)); "
                         f"got model={model!r}")
    if not isinstance(model_args, (dict, type(None))):
        raise ValueError(f"{variant}: model_args must be a mapping of timm.create_model arguments for {model}, got "
                         f"{model_args!r}")
    network_args = {**(model_args or {}), **{k: kwargs.pop(k) for k in NETWORK_ARGS if k in kwargs}}
    wrapper = cls(timm.create_model(model, **network_args), **kwargs)
    cfg = wrapper.pretrained_cfg if not pretrained_cfg else resolve_pretrained_cfg(variant, pretrained_cfg).to_dict()
    wrapper.pretrained_cfg = wrapper.default_cfg = {**cfg, **(pretrained_cfg_overlay or {})}
    wrapper.pretrained_model_args = pretrained_model_args or {}
    if pretrained:
        load_pretrained(wrapper, wrapper.pretrained_cfg, num_classes=wrapper.num_classes,
                        in_chans=wrapper.pretrained_cfg.get("input_size", (3,))[0], cache_dir=cache_dir)
    return wrapper


def wrapper_cfg(description: str) -> Dict[str, Any]:
    """A wrapper's default cfg: no weights of its own (a model folder's ``config.json`` names them);
    its input and preprocessing are its network's (see :func:`create_wrapper`)."""
    return {"url": "", "description": description, "license": "apache-2.0"}
