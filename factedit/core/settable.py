"""What a caller of a session (the app, the HTTP service) may set per edit, and within which bounds.

A method's config dataclass declares it in a class attribute, field by field:

    SETTABLE: ClassVar[Settable] = {"lr": Number(1e-6, 0.1), "max_steps": Integer(1, 200), ...}

Fields it leaves out (a checkpoint path, anything that reaches the file system or costs unbounded
work) stay as the operator configured them (`SessionConfig.method_overrides`, YAML). `checked`
validates a caller's overrides against the declaration before anything runs: values are JSON
scalars or short lists of them, taken literally (no interpolation, no resolvers), within their bounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigNotAllowedError


@dataclass(frozen=True)
class Setting:
    """One settable field. kind: "int", "float", "bool" or "choice" (one of `choices`); many: a list of
    1 to `max_items` such values; optional: None is allowed (turns the field off); nested: the settable
    fields of a nested config dataclass (a mapping of its fields is given)."""

    kind: str
    low: float = -math.inf
    high: float = math.inf
    choices: tuple[str, ...] = ()
    many: bool = False
    max_items: int = 8
    optional: bool = False
    nested: Mapping[str, Setting] | None = None

    def check(self, value: Any, where: str) -> None:
        if value is None:
            if not self.optional:
                raise ConfigNotAllowedError(f"{where} may not be null")
            return
        if self.nested is not None:
            if not isinstance(value, Mapping):
                raise ConfigNotAllowedError(f"{where} takes a mapping of its fields, not {type(value).__name__}")
            checked(self.nested, value, where)
        elif self.many:
            if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= self.max_items:
                raise ConfigNotAllowedError(f"{where} takes a list of 1 to {self.max_items} values")
            for i, item in enumerate(value):
                self._check_one(item, f"{where}[{i}]")
        else:
            self._check_one(value, where)

    def _check_one(self, value: Any, where: str) -> None:
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigNotAllowedError(f"{where} takes true or false")
            return
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise ConfigNotAllowedError(f"{where} takes one of {list(self.choices)}")
            return
        # bool is an int in Python: refuse it where a number is meant.
        number_types = (int,) if self.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number_types) or not math.isfinite(value):
            raise ConfigNotAllowedError(f"{where} takes {'an integer' if self.kind == 'int' else 'a finite number'}")
        if not self.low <= value <= self.high:
            raise ConfigNotAllowedError(f"{where} must be between {self.low:g} and {self.high:g}, not {value:g}")


Settable = Mapping[str, Setting]


def Integer(low: int, high: int, *, optional: bool = False) -> Setting:
    return Setting("int", low, high, optional=optional)


def Number(low: float, high: float, *, optional: bool = False) -> Setting:
    return Setting("float", low, high, optional=optional)


def Flag() -> Setting:
    return Setting("bool")


def Choice(*choices: str, optional: bool = False) -> Setting:
    return Setting("choice", choices=choices, optional=optional)


def Integers(low: int, high: int, max_items: int, *, optional: bool = False) -> Setting:
    return Setting("int", low, high, many=True, max_items=max_items, optional=optional)


def Numbers(low: float, high: float, max_items: int) -> Setting:
    return Setting("float", low, high, many=True, max_items=max_items)


def Choices(*choices: str, optional: bool = False) -> Setting:
    return Setting("choice", choices=choices, many=True, max_items=len(choices), optional=optional)


def Nested(fields: Settable, *, optional: bool = True) -> Setting:
    return Setting("nested", nested=fields, optional=optional)


# Shared by the methods' declarations.
LAYERS = Integers(-64, 63, max_items=8)  # blocks; the method checks them against the model
SEED = Integer(0, 2**31 - 1, optional=True)


def settable_fields(config_cls: type) -> Settable:
    """The fields of a method's config a caller may set (its `SETTABLE`; none when it declares none)."""
    return getattr(config_cls, "SETTABLE", {})


def checked(settable: Settable, overrides: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`overrides` as a plain dict when every field is declared settable and its value within bounds;
    ConfigNotAllowedError naming the first that is not."""
    if not isinstance(overrides, Mapping):
        raise ConfigNotAllowedError(f"{what} takes a mapping of settings, not {type(overrides).__name__}")
    for name, value in overrides.items():
        setting = settable.get(name) if isinstance(name, str) else None
        if setting is None:
            allowed = ", ".join(sorted(settable)) or "none"
            raise ConfigNotAllowedError(f"{what}.{name} cannot be set per edit (settable: {allowed})")
        setting.check(value, f"{what}.{name}")
    return dict(overrides)
