"""How a group setting is declared: name, default, allowed values, where it applies, its doc.

This module is the bottom of the settings layer. It knows nothing of optimizers: the estimators
(:mod:`gluon_optim.estimators`), the radius policies (:mod:`gluon_optim.radius`) and the core
(:mod:`gluon_optim.groups`) each declare their own :class:`Setting` objects with it, and
:mod:`gluon_optim.groups` assembles them into the one table that validation, defaults, the
typed signature's test and the documentation table all come from.

A check is a small object: calling it on a value returns ``None`` when the value is allowed and
otherwise the reason, and ``describe()`` says in words what it allows (for the docs table).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = [
    "Check",
    "Choice",
    "Flag",
    "Integer",
    "Kind",
    "LearningRate",
    "Number",
    "OptionalFlag",
    "Pair",
    "Setting",
    "Text",
]


class Check(ABC):
    """Base class: ``check(value)`` is ``None`` for an allowed value, else why it is not."""

    #: The verb of the error message: "Invalid" (a bad number) or "Unknown" (a bad name).
    verb = "Invalid"

    @abstractmethod
    def __call__(self, value: Any) -> str | None:
        """``None`` when ``value`` is allowed, else the reason it is not."""

    @abstractmethod
    def describe(self) -> str:
        """In words, what the check allows (for the docs table)."""

    def error(self, name: str, value: Any, where: str = "") -> str | None:
        """The error message for ``value`` of setting ``name``, or ``None`` if it is allowed."""
        reason = self(value)
        if reason is None:
            return None
        if self.verb == "Unknown":
            return f"Unknown {name} {value!r}{where}; {reason}"
        return f"Invalid {name}: {value!r}{where}; {reason}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_scalar(v: Any) -> bool:
    """Plain data that compares as one value (a setting's value is never a tensor or array)."""
    return v is None or isinstance(v, (str, int, float))


@dataclass(frozen=True)
class Number(Check):
    """A finite real number in an interval (``lo_open`` / ``hi_open`` exclude the endpoints)."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __call__(self, value: Any) -> str | None:
        if not _is_number(value):
            return "expected a number"
        lo_ok = value > self.lo if self.lo_open else value >= self.lo
        hi_ok = value < self.hi if self.hi_open else value <= self.hi
        if lo_ok and hi_ok and math.isfinite(value):
            return None
        return f"it must be {self.describe()}"

    def describe(self) -> str:
        if self.lo != -math.inf and self.hi != math.inf:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"in {left}{self.lo:g}, {self.hi:g}{right}"
        parts = []
        if self.lo != -math.inf:
            parts.append(f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}")
        if self.hi != math.inf:
            parts.append(f"< {self.hi:g}" if self.hi_open else f"<= {self.hi:g}")
        return "finite and " + " and ".join(parts) if parts else "finite"


@dataclass(frozen=True)
class Integer(Check):
    """An ``int`` (never a ``bool``) in ``[lo, hi]``."""

    lo: int | None = None
    hi: int | None = None

    def __call__(self, value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi):
            return None
        return f"expected {self.describe()}"

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"an int in [{self.lo}, {self.hi}]"
        if self.lo is not None:
            return f"an int >= {self.lo}"
        return "an int"


@dataclass(frozen=True)
class Choice(Check):
    """One of a fixed set of names; ``options`` is a callable when the set is a live registry."""

    options: tuple[Any, ...] | Callable[[], Sequence[Any]]
    #: Values of earlier versions, each with a sentence on what replaces it.
    renamed: Mapping[str, str] = field(default_factory=dict)
    verb = "Unknown"

    def allowed(self) -> tuple[Any, ...]:
        return tuple(self.options() if callable(self.options) else self.options)

    def __call__(self, value: Any) -> str | None:
        allowed = self.allowed()
        # Only plain scalars are compared: `in` on a tensor or an array compares elementwise
        # and raises for more than one element instead of saying which setting is wrong.
        if not _is_scalar(value) or value not in allowed:
            return f"expected one of {allowed}"
        return None

    def error(self, name: str, value: Any, where: str = "") -> str | None:
        if isinstance(value, str) and value in self.renamed and self(value) is not None:
            return f"{name}={value!r}{where} was replaced in 0.2.0 by {self.renamed[value]}"
        return super().error(name, value, where)

    def describe(self) -> str:
        return "one of " + ", ".join(f"`{v!r}`" for v in self.allowed())


@dataclass(frozen=True)
class Kind(Check):
    """A value of one of ``types`` (never a ``bool`` unless ``bool`` is listed), or ``None``
    when ``optional``; ``words`` says it for messages and docs."""

    types: tuple[type, ...]
    words: str
    optional: bool = False

    def __call__(self, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if isinstance(value, bool) and bool not in self.types:
            return f"expected {self.words}"
        return None if isinstance(value, self.types) else f"expected {self.words}"

    def describe(self) -> str:
        return self.words


def Flag() -> Kind:  # noqa: N802 (reads as a check type in the settings tables)
    """``True`` or ``False``."""
    return Kind((bool,), "True or False")


def OptionalFlag() -> Kind:  # noqa: N802
    """``None`` (decide automatically), ``True`` or ``False``."""
    return Kind((bool,), "None, True or False", optional=True)


def Text() -> Kind:  # noqa: N802
    """Any string (informational keys)."""
    return Kind((str,), "a string")


@dataclass(frozen=True)
class Pair(Check):
    """A pair of numbers, each passing ``item`` (AdamW's ``betas``; ``label`` names one)."""

    item: Number
    label: str = "value"

    def __call__(self, value: Any) -> str | None:
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            return "expected a pair of floats"
        for j, v in enumerate(value):
            if self.item(v) is not None:
                return f"the value at index {j}, {v!r}, is not {self.item.describe()}"
        return None

    def describe(self) -> str:
        return f"a pair, each {self.item.describe()}"

    def error(self, name: str, value: Any, where: str = "") -> str | None:
        if isinstance(value, (tuple, list)) and len(value) == 2:
            for j, v in enumerate(value):
                if self.item(v) is not None:
                    return (
                        f"Invalid {self.label} parameter at index {j}: {v!r}{where}; it must be "
                        f"{self.item.describe()}"
                    )
        return super().error(name, value, where)


@dataclass(frozen=True)
class LearningRate(Check):
    """A finite float ``>= 0``, or a one-element floating tensor that does not require grad.

    A tensor's value is read where that is free (a CPU tensor) or where a host transfer is
    acceptable (``read_device_values``).
    """

    read_device_values: bool = False

    def __call__(self, value: Any) -> str | None:
        if isinstance(value, Tensor):
            if value.numel() != 1:
                return f"tensor lr must have one element, got shape {tuple(value.shape)}"
            if value.requires_grad:
                return "tensor lr must not require grad"
            if not value.is_floating_point():
                return f"tensor lr must be floating point, got {value.dtype}"
            # Reading a CPU tensor costs nothing; a device tensor is read only by the complete
            # checks (construction, add_param_group, load_state_dict), never in step().
            if value.device.type == "cpu" or self.read_device_values:
                number = float(value.item())
                if not (number >= 0.0 and math.isfinite(number)):
                    return f"tensor lr {number} must be finite and >= 0"
            return None
        if not _is_number(value):
            return "expected a float or a tensor"
        return None if value >= 0.0 and math.isfinite(value) else "it must be finite and >= 0"

    def describe(self) -> str:
        return "a finite float >= 0, or a one-element tensor"

    def error(self, name: str, value: Any, where: str = "") -> str | None:
        reason = self(value)
        if reason is None:
            return None
        if isinstance(value, Tensor):
            return f"T{reason[1:]}{where}"
        return f"Invalid learning rate: {value!r}{where}; {reason} (option lr)"


@dataclass(frozen=True)
class Setting:
    """One group key.

    Attributes:
        name: the key in a param group (plain data, so ``state_dict()`` loads with
            ``weights_only=True``).
        default: its value when neither the group nor the optimizer's defaults set it.
        check: what values it accepts.
        applies: where it has an effect: ``"all"``, an algorithm (``"lmo"``, ``"adamw"``), a
            norm, an estimator or a radius policy name. Documentation and the docs table.
        doc: one line for the docs table.
        per_step: users are expected to change it between steps (learning-rate schedules,
            momentum warm-up), so ``step()`` re-checks it every time; every other setting is
            re-checked only when its value changed.
    """

    name: str
    default: Any
    check: Check
    applies: tuple[str, ...]
    doc: str
    per_step: bool = False

    def error(self, value: Any, where: str = "") -> str | None:
        """The error message for ``value`` (``where`` locates the group), or ``None``."""
        return self.check.error(self.name, value, where)
