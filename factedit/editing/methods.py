"""The method registry: a method is a config dataclass plus a builder of an object with `compute`.

Built-in methods are named here by import path, so importing factedit does not import peft or the
MEND code until a method is used. Adding a method is one line in `_BUILTIN` (or `register_method`).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from .delta import Delta
from .errors import ConfigError
from .request import TokenizedRequest


class EditMethod(Protocol):
    """What a built method does: compute a Delta for the requests, leaving the model unchanged.

    `compute` may also take `preserver=` (a `KeyPreserver` or None): then it fits its delta inside
    the null space of preserved keys itself; the Editor projects every delta of a preserving method
    in any case. `param_names` says which weights it edits (the preserver is built for them).
    """

    def compute(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest]
    ) -> Delta: ...

    def param_names(self, model: nn.Module) -> list[str]: ...


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    build: Callable[[Any], EditMethod]  # config instance -> method
    batched: bool = True  # computes one update for several requests (else edit_batch loops)
    guarded: bool = False  # Editor(guard="auto") turns the drift guard on for this method


_BUILTIN: dict[str, str] = {
    "ft": "factedit.peft.ft:METHOD",
    "ft_l": "factedit.peft.ft:METHOD_L",
    "lora": "factedit.peft.lora:METHOD",
    "mend": "factedit.mend.method:METHOD",
}
_REGISTERED: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Make `spec` available to `Editor(spec.name, ...)`."""
    _REGISTERED[spec.name] = spec
    return spec


def available_methods() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def get_method(name: str) -> MethodSpec:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ConfigError(f"unknown method {name!r}; registered methods: {', '.join(available_methods())}")
    module_name, attr = _BUILTIN[name].split(":")
    spec = getattr(importlib.import_module(module_name), attr)
    _REGISTERED[name] = spec
    return spec


def make_config(config_cls: type, overrides: Mapping[str, Any]) -> Any:
    """`config_cls(**overrides)` with a clear error for unknown keys and list->tuple coercion."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {unknown} for {config_cls.__name__}; known keys: {sorted(fields)}"
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    try:
        for name, value in values.items():
            nested = _dataclass_of(fields[name])
            if nested is not None and isinstance(value, Mapping):
                values[name] = make_config(nested, value)
        config = config_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {config_cls.__name__}: {exc}") from exc
    return config


def _dataclass_of(field: dataclasses.Field) -> type | None:
    """The config dataclass a field holds (e.g. `preserve: PreserveConfig | None`), named in its
    metadata (`preserve.preserve_field`), so a mapping given for it becomes that dataclass."""
    return field.metadata.get("dataclass")


def config_to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
