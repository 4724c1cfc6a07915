"""What every technique is: a registered type with typed options, that prepares the model it
trains and takes one training step through a :class:`~timm_exits.train.trainer.Trainer`."""
from __future__ import annotations

import abc
import dataclasses
import difflib
from typing import Any, ClassVar, Dict, FrozenSet, Mapping, NamedTuple, Optional, Type, Union

import timm
import torch
from torch import nn

from ...models.capabilities import is_multi_exit
from ...models.imta import IMTAModel
from ...models.multi_exit import exit_logits
from ...values import Number, OneOf, require
from ..trainer import Need, Outputs, Trainer

__all__ = ["Technique", "OutputsTechnique", "Options", "option", "StepResult", "TrainingForward", "TECHNIQUES", "register_technique",
           "build_technique", "technique_type", "technique_config", "apply_switches", "BRANCH_DECONFLICTION"]

BRANCH_DECONFLICTION = (None, "symmetric", "protect_deeper")
TECHNIQUES: Dict[str, Type["Technique"]] = {}


def option(default: Any, valid: Any = None) -> Any:
    """A field of an options dataclass.

    Args:
        default: the field's one default.
        valid: the values it admits (a :class:`~timm_exits.values.Number` or
            :class:`~timm_exits.values.OneOf`), checked on construction; None: not checked.

    Returns:
        The ``dataclasses.field``.
    """
    return dataclasses.field(default=default, metadata={"valid": valid})


@dataclasses.dataclass(frozen=True)
class Options:
    """The options every technique has: the forward-graph switches of a multi-exit network whose
    branch points train. Each technique's options subclass this; every field's default is its one
    default, and its declared values are checked on construction.

    Args:
        gradient_equilibrium: Gradient Equilibrium at the branch points.
        deconfliction: branch-level deconfliction, ``'symmetric'`` or ``'protect_deeper'``; None: off.
        feature_surgery: Deep Feature Surgery: the fraction in (0, 1) of the channels at a branch point
            whose gradient the next stage passes back (the rest learn from the exit alone; the
            reference's default is 0.5); None: off.
    """

    gradient_equilibrium: bool = option(False, OneOf((False, True)))
    deconfliction: Optional[str] = option(None, OneOf(BRANCH_DECONFLICTION))
    feature_surgery: Optional[float] = option(None, Number(float, 0.0, 1.0, low_open=True, high_open=True,
                                                           optional=True))

    def __post_init__(self):
        if self.deconfliction == "pcgrad":
            raise ValueError("deconfliction='pcgrad' is a technique of its own: technique=dict(type='PCGrad', ...)")
        for field in dataclasses.fields(self):
            if field.metadata.get("valid") is not None:
                require(field.metadata["valid"], getattr(self, field.name), field.name)

    @property
    def switches(self) -> bool:
        """Whether a switch of the forward graph is on."""
        return self.gradient_equilibrium or self.deconfliction is not None or self.feature_surgery is not None


class StepResult(NamedTuple):
    """One training step of a technique: the ``loss`` the trainer back-propagates, its named
    ``terms`` (logged; their sum is the loss's value) and the ``output`` an accuracy metric reads."""

    loss: torch.Tensor
    terms: Dict[str, torch.Tensor]
    output: torch.Tensor


def apply_switches(model: nn.Module, options: Options) -> None:
    """Switch Gradient Equilibrium, branch-level deconfliction and Deep Feature Surgery on in ``model``'s
    forward graph.

    Args:
        model: a multi-exit network whose branch points train (changed in place).
        options: the technique's options (their switches).

    Raises:
        ValueError: a switch is on and ``model`` has no branch points that train.
    """
    if not options.switches:
        return
    if isinstance(model, IMTAModel) or not is_multi_exit(model):  # IMTA phase II: new heads on a frozen network
        raise ValueError(f"Gradient Equilibrium, branch-level deconfliction and Deep Feature Surgery act at the "
                         f"branch points of a multi-exit network; {type(model).__name__} has none that train")
    if options.gradient_equilibrium:
        model.gradient_equilibrium = True
    if options.deconfliction is not None:
        model.gradient_deconfliction = options.deconfliction
    if options.feature_surgery is not None:
        model.feature_surgery = options.feature_surgery


class TrainingForward(nn.Module):
    """The model's training forward as a module (what a distributed wrapper wraps): ``forward``
    returns the technique's loss inputs (:meth:`Technique.training_outputs`).

    Args:
        model: the model the technique prepared.
        technique: the technique whose training forward this is.
    """

    def __init__(self, model: nn.Module, technique: "Technique"):
        super().__init__()
        self.model = model
        self.technique = technique

    def forward(self, images: torch.Tensor) -> Outputs:
        return self.technique.training_outputs(self.model, images)


class Technique(abc.ABC):
    """What a training step optimises. A subclass declares ``Options`` (a dataclass of
    :class:`Options`), the :class:`~timm_exits.train.trainer.Need` s of its step (:attr:`needs`), and
    writes :meth:`train_step` (or, for a loss of one forward's outputs, subclasses
    :class:`OutputsTechnique` and writes its ``losses``).

    Args:
        **options: the fields of ``Options``; the rest keep their defaults.
    """

    Options: ClassVar[Type[Options]] = Options
    unused_parameters: ClassVar[bool] = False  # a step leaves parameters out (DDP must look for them)

    def __init__(self, **options: Any):
        known = [f.name for f in dataclasses.fields(self.Options)]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                raise ValueError(f"{type(self).__name__} has no option {key!r}" +
                                 (f" (did you mean {close[0]!r}?)" if close else "") + f"; its options: {', '.join(known)}")
        try:
            self.options = self.Options(**options)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__} option {e}") from None

    @property
    def needs(self) -> FrozenSet[Need]:
        """What this technique's step needs from a trainer beyond the basics (none by default)."""
        return frozenset()

    def config(self) -> Dict[str, Any]:
        """``dict(type=..., **options)``: the technique as a config section, every option set."""
        return {"type": type(self).__name__, **dataclasses.asdict(self.options)}

    # --- the model -------------------------------------------------------------------------------

    def check(self, model: nn.Module) -> nn.Module:
        """The model to train: ``model`` checked (and wrapped, for a technique that trains a wrapper
        around a network); idempotent."""
        if not is_multi_exit(model):
            raise ValueError(f"{type(self).__name__} needs a multi-exit model (see timm_exits.add_exits), "
                             f"got {type(model).__name__}")
        return model

    def prepare(self, model: nn.Module) -> nn.Module:
        """Check the model, set the forward-graph switches, build the technique's own state on the
        model's device; returns the model to train."""
        model = self.check(model)
        apply_switches(model, self.options)
        return model

    def create_model(self, name: str, model_kwargs: Optional[dict] = None, previous: Optional[str] = None) -> nn.Module:
        """``timm.create_model(name, **model_kwargs)`` checked for this technique (not prepared),
        starting from the weights file ``previous`` if given: the phase before (IMTA phase I, a
        phase-wise regime's earlier phase), or a file of the wrapper's own weights (ZTW's phase A
        before its phase B), which loads into the wrapper.

        Args:
            name: a registered timm model name.
            model_kwargs: its ``timm.create_model`` arguments.
            previous: a weights file (safetensors or a state-dict ``.pth``).

        Returns:
            The model to :meth:`prepare`.
        """
        kwargs = dict(model_kwargs or {})
        if previous is None:
            return self.check(timm.create_model(name, **kwargs))
        plain = {k: v for k, v in kwargs.items() if k != "pretrained"}
        with torch.device("meta"), torch.random.fork_rng(devices=[]):  # a probe: no memory, no random draws
            wrapper_keys = set(self.check(timm.create_model(name, **plain)).state_dict())
        weights = timm.models.load_state_dict(previous)
        if set(weights) == wrapper_keys:  # the wrapper's own weights (ZTW's phase B after phase A)
            wrapped = self.check(timm.create_model(name, **plain))
            wrapped.load_state_dict(weights)
            return wrapped
        return self.check(timm.create_model(name, **{**kwargs, "pretrained": True,
                                                    "pretrained_cfg_overlay": dict(file=previous)}))

    # --- the step --------------------------------------------------------------------------------

    def training_outputs(self, model: nn.Module, images: torch.Tensor) -> Outputs:
        """The loss inputs of one forward.

        Args:
            model: the prepared model.
            images: the batch's images.

        Returns:
            Every exit's logits (a plain network: its one output, as a list).
        """
        return exit_logits(model, images)

    @abc.abstractmethod
    def train_step(self, trainer: Trainer, images: torch.Tensor, target: torch.Tensor) -> StepResult:
        """One batch: the forward(s) through ``trainer`` and the loss to back-propagate (the
        backward and the optimizer update are the trainer's).

        Args:
            trainer: the loop running this step (:class:`~timm_exits.train.trainer.Trainer`).
            images: the batch's images.
            target: class indices, or soft targets (mixup).

        Returns:
            The loss, its terms and the output for an accuracy metric.
        """

    def output(self, outputs: Outputs) -> torch.Tensor:
        """The last exit's logits of the training outputs (for an accuracy metric)."""
        return outputs[-1]

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps of the technique beyond the model (nothing by default)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def to(self, device: torch.device) -> "Technique":
        """Move the technique's own state to ``device`` (a trainer that moves the model after
        :meth:`prepare` calls it); returns ``self``."""
        return self


class OutputsTechnique(Technique):
    """A technique whose loss is a function of one forward's outputs: it writes :meth:`losses`, and
    its step is that forward and their sum (a technique that needs more overrides :meth:`train_step`)."""

    @abc.abstractmethod
    def losses(self, outputs: Outputs, target: torch.Tensor, trainer: Optional[Trainer] = None) -> Dict[str, torch.Tensor]:
        """Named loss terms of one forward.

        Args:
            outputs: what :meth:`training_outputs` returned.
            target: class indices, or soft targets (mixup).
            trainer: for what the terms may read of it (the epoch).

        Returns:
            ``{name: scalar loss}``; their sum is the loss.
        """

    def train_step(self, trainer: Trainer, images: torch.Tensor, target: torch.Tensor) -> StepResult:
        """One forward through ``trainer``; the loss is the sum of :meth:`losses`."""
        outputs = trainer.forward(images)
        terms = self.losses(outputs, target, trainer)
        return StepResult(sum(terms.values()), terms, self.output(outputs))


def register_technique(cls: Type[Technique]) -> Type[Technique]:
    """Register a technique type under its class name (``technique=dict(type='HDKD', ...)``)."""
    if cls.__name__ in TECHNIQUES and TECHNIQUES[cls.__name__] is not cls:
        raise ValueError(f"a technique named {cls.__name__!r} is registered already")
    TECHNIQUES[cls.__name__] = cls
    return cls


def build_technique(spec: Union[Technique, Mapping[str, Any]]) -> Technique:
    """The technique of a config section ``dict(type='HDKD', interval=4, ...)`` (a technique is
    returned as it is).

    Args:
        spec: ``type`` (a registered technique's name, :data:`TECHNIQUES`) and its options.

    Returns:
        The technique.
    """
    if isinstance(spec, Technique):
        return spec
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"a technique is dict(type=<name>, **options) with a type of {sorted(TECHNIQUES)}, "
                         f"got {spec!r}")
    options = dict(spec)
    return technique_type(options.pop("type"))(**options)


def technique_type(name: str) -> Type[Technique]:
    """The registered technique type ``name``; an unknown name is a ValueError with the closest type
    (case aside: ``'hdkd'`` suggests ``'HDKD'``) and the list of types."""
    if name in TECHNIQUES:
        return TECHNIQUES[name]
    by_lower = {key.lower(): key for key in TECHNIQUES}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1)
    raise ValueError(f"unknown technique type {name!r}" + (f" (did you mean {by_lower[close[0]]!r}?)" if close else "")
                     + f"; the types: {', '.join(sorted(TECHNIQUES))}")


def technique_config(spec: Union[Technique, Mapping[str, Any]]) -> Dict[str, Any]:
    """A technique config section checked and completed with every default (what a run records)."""
    return build_technique(spec).config()
