"""What is checked of a phase before any data is read: the factories' arguments, the input size, the batch plan."""
from __future__ import annotations

import difflib
import math
from typing import Any, Dict, Optional, Sequence

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from ..config import ConfigError


def sized_model_kwargs(config: Dict[str, Any]) -> dict:
    """``model.kwargs`` with the input the data gives: 1 channel for ``img_mode='L'``, and the
    resolution of ``data.input_size`` for a model built for one (timm's ``fixed_input_size``: MSDNet,
    ViT, Swin take ``img_size``), so that one key sets it. A size in ``model.kwargs`` (``img_size``,
    or ``input_size`` of a wrapped backbone) that differs from ``data.input_size`` is refused."""
    name, kwargs, size = config["model"]["name"], dict(config["model"]["kwargs"]), config["data"]["input_size"]
    if config["data"]["img_mode"] == "L":
        kwargs.setdefault("in_chans", 1)
    if size is None:
        return kwargs
    given = {key: kwargs[key] for key in ("img_size", "input_size") if key in kwargs}
    for key, value in given.items():
        if (tuple(value[-2:]) if isinstance(value, (list, tuple)) else (value, value)) != tuple(size[1:]):
            raise ConfigError(f"model.kwargs.{key} is {value!r} but data.input_size is {tuple(size)}: set the "
                              f"resolution once, in data.input_size (a model built for a size follows it), and "
                              f"remove model.kwargs.{key}")
    if not given and getattr(timm.models.get_pretrained_cfg(name), "fixed_input_size", False):
        kwargs["img_size"] = tuple(size[1:])
    return kwargs


def model_kwargs(config: Dict[str, Any], num_classes: int) -> dict:
    """The ``timm.create_model`` arguments of a phase: :func:`sized_model_kwargs` with the data's
    number of classes.

    Args:
        config: a resolved phase config.
        num_classes: the data's number of classes.

    Returns:
        The keyword arguments.

    Raises:
        ValueError: ``model.kwargs.num_classes`` differs from ``num_classes``.
    """
    kwargs = sized_model_kwargs(config)
    kwargs.setdefault("num_classes", num_classes)
    if kwargs["num_classes"] != num_classes:
        raise ValueError(f"model.kwargs.num_classes is {kwargs['num_classes']} but the data has {num_classes} classes")
    return kwargs


def batch_plan(config: Dict[str, Any], num_processes: int) -> Dict[str, Any]:
    """How a phase's batch is shared: ``data.batch_size`` is the global batch of one step (all
    processes together; an update takes ``train.grad_accum_steps`` steps), so a recipe keeps its
    updates per epoch and learning-rate schedule on any number of processes.

    Args:
        config: a resolved phase config.
        num_processes: the processes of the run.

    Returns:
        ``global_batch`` (of an update), ``per_process_batch`` (each process's share of a step),
        ``processes``, ``grad_accum_steps`` and ``lr``.

    Raises:
        ValueError: ``data.batch_size`` does not divide over the processes.
    """
    batch, steps = config["data"]["batch_size"], config["train"]["grad_accum_steps"]
    if batch % num_processes:
        raise ValueError(f"data.batch_size is the global batch (all processes together): {batch} images do not "
                         f"divide over {num_processes} processes; set data.batch_size to a multiple of "
                         f"{num_processes}, or launch a number of processes that divides {batch}")
    return {"global_batch": batch * steps, "per_process_batch": batch // num_processes, "processes": num_processes,
            "grad_accum_steps": steps, "lr": config["optimizer"].get("lr")}


def check_factories(config: Dict[str, Any]) -> None:
    """Build the model (on the meta device: no memory, no weights), optimizer and scheduler of a
    phase before any data is read, so a misspelt name or argument is an error at once."""
    name = config["model"]["name"]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(f"model.name {name!r} is not a timm model" +
                          (f" (did you mean {' or '.join(map(repr, close))}?)" if close else
                           "; see `timm-exits models` or timm.list_models()"))
    steps = (("model.kwargs", lambda _: timm.create_model(name, **config["model"]["kwargs"])),
             ("optimizer", lambda model: create_optimizer_v2(model, **config["optimizer"])),
             ("scheduler", lambda optimizer: create_scheduler_v2(optimizer, num_epochs=config["train"]["epochs"],
                                                                 updates_per_epoch=1, **config["scheduler"])))
    built = None
    with torch.device("meta"):
        for section, build in steps:
            try:
                built = build(built)
            except (TypeError, ValueError, KeyError, AssertionError) as e:
                raise ConfigError(f"{section} {config[section] if section != 'model.kwargs' else config['model']['kwargs']!r} "
                                  f"does not work for {name}: {e}") from None
    _check_input_size(name, sized_model_kwargs(config), config["data"]["input_size"])


def _resized(kwargs: dict, side: int) -> dict:
    """``kwargs`` with a size the model is built for (``img_size``, ``input_size``) set to ``side`` x ``side``."""
    sizes = {"img_size": (side, side), "input_size": (kwargs.get("input_size") or (0,))[:1] + (side, side)}
    return {**kwargs, **{key: sizes[key] for key in sizes if key in kwargs}}


def _fails_on(name: str, kwargs: dict, shape: Sequence[int]) -> Optional[str]:
    """Why ``name`` built with ``kwargs`` on the meta device does not run on one image of ``shape``
    (the first line of the error), or None if it does."""
    try:
        with torch.device("meta"):
            timm.create_model(name, **kwargs).eval()(torch.empty(1, *shape))
    except (RuntimeError, ValueError, AssertionError, TypeError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _check_input_size(name: str, kwargs: dict, size: Optional[Sequence[int]]) -> None:
    """Build the model for ``data.input_size`` on the meta device and run it once on a dummy image of
    that shape, before any data is read. A size it does not take is refused with the smallest square
    size it takes (found by bisection up to its default size: the sizes a model takes form a range)
    and, for smaller images, the models of its family made for them (msdnet_cifar_* for MSDNet)."""
    if size is None or (problem := _fails_on(name, kwargs, size)) is None:
        return
    default = getattr(timm.models.get_pretrained_cfg(name), "input_size", None) or (size[0], 224, 224)
    low, high = 1, default[-1]
    if _fails_on(name, _resized(kwargs, high), (size[0], high, high)):
        return  # it does not run on the meta device at all: the first batch tells
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if _fails_on(name, _resized(kwargs, middle), (size[0], middle, middle)) is None \
            else (middle + 1, high)
    default_side = lambda model: max((getattr(timm.models.get_pretrained_cfg(model), "input_size", None)  # noqa: E731
                                      or (0, math.inf))[1:])
    family = [m for m in timm.list_models(name.split("_")[0] + "_*") if default_side(m) <= max(size[1:])]
    raise ConfigError(f"{name} does not run on data.input_size {tuple(size)} ({problem}): the smallest input it takes "
                      f"is {low}x{low} pixels (its default: {default[-2]}x{default[-1]}); resize the images to that "
                      f"(data.input_size)" + (f", or for images this small take a model made for them: "
                                              f"{', '.join(family)}" if family else ""))
