"""The valid values of an option: a number in a range, one of some names, a name matching a
pattern; and those of the preprocessing a model is fed with. Config keys (:data:`timm_exits.config.VALID`) and technique options
(:mod:`timm_exits.train.techniques`) are declared with them, and their errors say what was expected."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["Number", "OneOf", "Matches", "ConfigError", "require", "PREPROCESSING", "PREPROCESSING_VALUES", "check_preprocessing"]


@dataclass(frozen=True)
class Number:
    """The values of a numeric key.

    Args:
        kind: ``int`` (an integer) or ``float`` (a finite number; integers too).
        low, high: the bounds (None: unbounded).
        low_open, high_open: the bound is excluded (default: included).
        optional: None is admitted too.
        length: a list of that many such numbers (0: one or more); None: one number.
        or_list: one such number or a list of them.
    """

    kind: type = float
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    length: Optional[int] = None
    or_list: bool = False

    def admits(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.or_list and isinstance(value, (list, tuple)):
            return Number(self.kind, self.low, self.high, self.low_open, self.high_open, length=0).admits(value)
        if self.length is not None:
            return isinstance(value, (list, tuple)) and len(value) >= 1 and len(value) == (self.length or len(value)) \
                and all(self._admits_one(v) for v in value)
        return self._admits_one(value)

    def _admits_one(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return False
        return math.isfinite(value) and (self.low is None or value > self.low or (not self.low_open and value == self.low)) \
            and (self.high is None or value < self.high or (not self.high_open and value == self.high))

    def __str__(self) -> str:
        bounds = [f"{'>' if self.low_open else '>='} {self.low}"] if self.low is not None else []
        bounds += [f"{'<' if self.high_open else '<='} {self.high}"] if self.high is not None else []
        noun = "integer" if self.kind is int else "number" if bounds else "finite number"
        if self.length is None:
            text = f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
        else:
            text = f"{self.length} {noun}s" if self.length else f"a list of {noun}s"
        text = " ".join([text, *(" and ".join(bounds),) * bool(bounds)])
        return text + (", or a list of them" if self.or_list else "") + (" or None" if self.optional else "")


@dataclass(frozen=True)
class OneOf:
    """The values of a named key."""

    names: Tuple[Any, ...]

    def admits(self, value: Any) -> bool:
        return any(value is name or (type(value) is type(name) and value == name) for name in self.names)

    def __str__(self) -> str:
        names = [repr(n) for n in self.names]
        return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


@dataclass(frozen=True)
class Matches:
    """The values of a key named by a pattern.

    Args:
        pattern: a regular expression the whole name must match.
        text: what the values are, for an error (``'a folder name'``).
    """

    pattern: str
    text: str

    def admits(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(self.pattern, value) is not None

    def __str__(self) -> str:
        return self.text


class ConfigError(ValueError):
    """A config key that does not exist, a section of the wrong type, or a value it does not take."""


def require(valid: Any, value: Any, name: str) -> None:
    """Refuse ``value`` unless ``valid`` (a :class:`Number`, :class:`OneOf` or :class:`Matches`) admits it.

    Args:
        valid: the values the option takes.
        value: the value given.
        name: what the error calls the option (e.g. ``data.mean``).

    Raises:
        ConfigError: ``valid`` does not admit ``value``; the message says what was expected.
    """
    if not valid.admits(value):
        raise ConfigError(f"{name} must be {valid}, got {value!r}")


PREPROCESSING = ("input_size", "mean", "std", "crop_pct", "interpolation")  # timm's data config keys
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")  # timm's resize interpolations
PREPROCESSING_VALUES = {
    "input_size": Number(int, 1, optional=True, length=3),
    "mean": Number(float, optional=True, length=0),
    "std": Number(float, 0.0, low_open=True, optional=True, length=0),
    "crop_pct": Number(float, 0.0, 1.0, low_open=True, optional=True),
    "interpolation": OneOf((None, *INTERPOLATIONS)),
}


def check_preprocessing(values: Dict[str, Any], name: Callable[[str], str] = lambda key: key,
                        channels: Optional[int] = None) -> Dict[str, Any]:
    """The preprocessing ``values`` checked and completed.

    Args:
        values: ``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation`` (None or absent:
            not given).
        name: what an error calls a key (e.g. ``data.mean``).
        channels: the input's channel count: a single mean or std is repeated for every channel,
            another count is refused.

    Returns:
        The values, a single mean or std repeated for every channel.
    """
    out = dict(values)
    for key, valid in PREPROCESSING_VALUES.items():
        if out.get(key) is not None:
            require(valid, out[key], name(key))
    for key in ("mean", "std"):
        if out.get(key) is None or channels is None:
            continue
        if len(out[key]) == 1:
            out[key] = tuple(out[key]) * channels
        elif len(out[key]) != channels:
            raise ConfigError(f"{name(key)} has {len(out[key])} values for {channels}-channel input: give {channels} "
                              f"(one per channel) or 1 (for every channel)")
    return out
