"""Config dataclasses validated at the boundary with OmegaConf structured configs.

`validated(cls, overrides)` merges plain overrides (from Python keyword arguments, YAML or the
command line) onto the dataclass's schema: unknown keys and ill-typed values (`max_steps=2.5`,
`lr="fast"`) are refused with a ConfigError naming the key, before anything slow happens; then the
dataclass is built (its `__post_init__` checks ranges). Lists become tuples, and a field that holds a
config dataclass (metadata `{"dataclass": cls}`, e.g. `preserve`) is built from its mapping, merged
onto the field's default config when it has one (a partial override changes only the keys it names).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf, SCMode
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

T = TypeVar("T")


def validated(config_cls: type[T], overrides: Mapping[str, Any], what: str | None = None) -> T:
    """An instance of `config_cls` from `overrides`, type-checked by OmegaConf (module docstring)."""
    what = what or config_cls.__name__
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{what} takes a mapping of its fields, not {type(overrides).__name__} {overrides!r}")
    known = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} for {what}; known keys: {sorted(known)}")
    # Nested config dataclasses are validated on their own (OmegaConf makes nodes it creates from a
    # frozen dataclass read-only), then put in place of their mapping.
    # A mapping is merged onto the field's default when that is a config (ultraedit's preserve threshold
    # 0.5 stays when only `preserve.protect_edits` is set); onto the nested class's own defaults otherwise.
    nested = {f.name: f for f in dataclasses.fields(config_cls) if "dataclass" in f.metadata}
    inner = {
        name: value if value is None or isinstance(value, nested[name].metadata["dataclass"])
        else validated(nested[name].metadata["dataclass"], _onto_default(nested[name], value), f"{what}.{name}")
        for name, value in overrides.items()
        if name in nested
    }
    plain = {k: v for k, v in overrides.items() if k not in nested}
    _refuse_interpolation(plain, what)
    try:
        merged = OmegaConf.merge(_schema(config_cls), _plain(plain))
        values = OmegaConf.to_container(merged, resolve=True, structured_config_mode=SCMode.DICT)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        reason = str(exc.msg).splitlines()[0]
        raise ConfigError(f"invalid {what}{f' key {key!r}' if key else ''}: {reason}") from None
    return _build(config_cls, {**values, **inner}, what)


@functools.cache
def _schema(config_cls: type) -> DictConfig:
    """The class's structured config, built once (OmegaConf.merge copies it, never writes it)."""
    return _writable(OmegaConf.structured(config_cls))


def _onto_default(field: dataclasses.Field, value: Any) -> Any:
    """`value` (a nested config's overrides) on top of the field's default config, key by key."""
    default = field.default
    if field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    if not isinstance(value, Mapping) or not dataclasses.is_dataclass(default):
        return value
    return {**_plain(default), **value}


def _refuse_interpolation(value: Any, where: str) -> None:
    """Values are taken literally: an OmegaConf interpolation (`${...}`, resolvers such as `oc.env`
    included) in a value would otherwise be resolved here."""
    if isinstance(value, str) and "${" in value:
        raise ConfigError(f"{where}: interpolation ('${{...}}') is not supported in config values")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _refuse_interpolation(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _refuse_interpolation(item, f"{where}[{i}]")


def _writable(node: DictConfig) -> DictConfig:
    """Frozen dataclasses give read-only nodes (nested ones too); the built result is frozen again."""
    OmegaConf.set_readonly(node, False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            _writable(child)
    return node


def _plain(value: Any) -> Any:
    """Tuples and dataclass instances as lists and dicts, which OmegaConf merges."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(config_cls: type[T], values: Mapping[str, Any], what: str) -> T:
    kwargs = {}
    for field in dataclasses.fields(config_cls):
        value = values[field.name]
        nested = field.metadata.get("dataclass")
        if nested is not None and isinstance(value, Mapping):
            value = _build(nested, value, f"{what}.{field.name}")  # a default left as a mapping
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[field.name] = value
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {what}: {exc}") from None


def as_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON-ready values (tuples as lists, nested configs as dicts)."""
    return _plain(config)
