"""What answers at a multi-exit model's exits: the *predictor*.

A plain multi-exit model answers with its own exits' logits: predictor ``'exits'``. A model class that
wraps a multi-exit network and answers with something else at its exits (product anytime, MIE, the
last-layer Laplace predictive, ...) declares a ``predictor`` name and registers with
:func:`register_predictor`. Thresholds record the predictor they were fitted on, an export its
manifest, a cached evaluation whether its outputs are raw logits: each asks this module, so a new
predictor is known everywhere once its class is registered.

Predictors compose: a registered predictor around another (MIE around the Laplace predictive) is
named by their names joined by ``'+'``, the outermost first (``'mie+laplace'``).
"""
from __future__ import annotations

from typing import Dict, Type, TypeVar

from torch import nn

__all__ = ["EXITS", "PREDICTORS", "register_predictor", "predictor_of", "known_predictor", "predictor_choices",
           "how_to_predict"]

EXITS = "exits"  # a model's own exits
PREDICTORS: Dict[str, Type[nn.Module]] = {}  # registered name -> the model class that answers with it

M = TypeVar("M", bound=Type[nn.Module])


def register_predictor(cls: M) -> M:
    """Class decorator: make ``cls.predictor`` a known predictor, answered by models of ``cls``.

    The class wraps a multi-exit network in its ``model`` attribute, and its exits answer with
    log-probabilities (not raw logits).

    Args:
        cls: the model class, with a class attribute ``predictor`` (a lower-case identifier).

    Returns:
        ``cls``, registered.
    """
    name = getattr(cls, "predictor", None)
    if not (isinstance(name, str) and name.isidentifier() and name == name.lower()) or name == EXITS:
        raise ValueError(f"{cls.__name__}.predictor must be a lower-case identifier other than {EXITS!r}, "
                         f"got {name!r}")
    if PREDICTORS.get(name, cls) is not cls:
        raise ValueError(f"predictor {name!r} is already answered by {PREDICTORS[name].__qualname__}")
    PREDICTORS[name] = cls
    return cls


def predictor_of(model: nn.Module) -> str:
    """What answers at ``model``'s exits.

    Args:
        model: a multi-exit model, a registered predictor model around one, or an object with a
            ``predictor`` attribute (an export records its model's).

    Returns:
        ``'exits'``, a registered name, or registered names joined by ``'+'`` (outermost first).
    """
    names = []
    while type(model) in PREDICTORS.values():
        names.append(type(model).predictor)
        model = model.model
    if names:
        return "+".join(names)
    return getattr(model, "predictor", EXITS)


def known_predictor(name: object) -> bool:
    """Whether ``name`` names a predictor: ``'exits'``, or registered names joined by ``'+'``.

    Args:
        name: the name to check (e.g. from a thresholds file or an export's manifest).

    Returns:
        True if it is known.
    """
    return isinstance(name, str) and (name == EXITS or all(part in PREDICTORS for part in name.split("+")))


def predictor_choices() -> str:
    """The known predictors, for error messages: ``"one of (...), or several joined by '+'"``."""
    return f"one of {(EXITS, *sorted(PREDICTORS))} (or registered predictors joined by '+', outermost first)"


def how_to_predict(name: str) -> str:
    """What gives the answers of predictor ``name``, for error messages.

    Args:
        name: a known predictor.

    Returns:
        E.g. ``"the plain multi-exit model"`` or ``"timm_exits.models.mie.MIEModel around ..."``.
    """
    if name == EXITS:
        return "the plain multi-exit model (no predictor wrapped around it)"
    classes = [PREDICTORS[part] for part in name.split("+")]
    return " around ".join(f"{cls.__module__}.{cls.__qualname__}" for cls in classes) + " around the network"
