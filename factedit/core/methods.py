"""The method registry: a method is a config dataclass plus a builder of an object with `compute`.

Built-in methods are named here by import path, so importing factedit does not import peft or the
MEND code until a method is used. Adding a method is one line in `_BUILTIN` (or `register_method`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .configs import as_dict, validated
from .delta import Delta
from .errors import ConfigError
from .request import TokenizedRequest


class EditMethod(Protocol):
    """What a built method does: compute a Delta for the requests, leaving the model unchanged.

    `compute` may also take `preserver=` (a `KeyPreserver` or None): then it fits its delta inside
    the null space of preserved keys itself; the Editor projects every delta of a preserving method
    in any case. `param_names` says which weights it edits (the preserver is built for them).
    `compute` may take `moments=`: a function of parameter names giving the reference corpus's key
    second moments E[kkᵀ] on the base weights (Safeguards.second_moments). A method may have
    `edit_keys(model, tokenizer, names, requests)`: the keys of its edits that later edits hold
    (safeguards.KeysFn); without it, every token of prompt + target.
    A lifelong method's `compute` takes `stream=` (a `StreamState`): what it learned from earlier
    edits comes in, what it learned from this one goes out, and the Editor keeps and journals it.
    """

    def compute(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest]
    ) -> Delta: ...

    def param_names(self, model: nn.Module) -> list[str]: ...


@dataclass
class StreamState:
    """What a lifelong method carries from one edit to the next (for `mend` and `ultraedit`, the
    running statistics of the gradient factors), as named tensors.

    The Editor owns it, not the method, so a preview that is never applied, a refused edit and a
    second Editor cannot disturb it: `before` is what this method's last applied edit left (None:
    the method's own start), `compute` sets `after` from it without writing `before`, and the Editor
    keeps `after` (in memory and in the edit's journal record) only once the edit is applied and
    journaled. A reverted edit's statistics stay: they describe what the method has seen, not the
    weights, and keeping them makes the next delta depend only on the journal's order of edits.
    """

    before: dict[str, torch.Tensor] | None = None
    after: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    build: Callable[[Any], EditMethod]  # config instance -> method
    batched: bool = True  # computes one update for several requests (else edit_batch loops)
    guarded: bool = False  # Editor(guard="auto") turns the drift guard on for this method
    locates: bool = False  # edits at the subject: requests get one (request.with_subject) before they are recorded
    description: str = ""  # one line: what the method does


_BUILTIN: dict[str, str] = {
    "ft": "factedit.peft.ft:METHOD",
    "ft_l": "factedit.peft.ft:METHOD_L",
    "lora": "factedit.peft.lora:METHOD",
    "mend": "factedit.mend.method:METHOD",
    "ultraedit": "factedit.mend.ultraedit:METHOD",
    "alphaedit": "factedit.locate.method:ALPHAEDIT",
    "memit": "factedit.locate.method:MEMIT",
    "rome": "factedit.locate.method:ROME",
    "grace": "factedit.modules.grace:METHOD",
    "tpatcher": "factedit.modules.tpatcher:METHOD",
    "ia3": "factedit.modules.ia3:METHOD",
    "adapter": "factedit.modules.adapter:METHOD",
    "bitfit": "factedit.modules.bitfit:METHOD",
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
    """The method's config from keyword overrides, validated by OmegaConf (configs.py): unknown keys
    and ill-typed values are ConfigErrors that name the key."""
    return validated(config_cls, overrides)


def config_to_dict(config: Any) -> dict[str, Any]:
    return as_dict(config)


# The default method where the config names none: the first of these that edits the session's model.
# `mend` keeps edits best on the default model (docs/lifelong.md, "Small steps, more of them": 200 kept, ES 0.995,
# retention 0.875, drift 1.045x against ultraedit's 0.985 / 0.70 / 1.106x) but its trained editor fits
# only that model; `ultraedit` needs no trained network.
DEFAULT_METHODS = ("mend", "ultraedit")


def param_names_of(method: str, model: nn.Module, overrides: Mapping[str, Any]) -> list[str] | None:
    """The parameters `method` with `overrides` would edit in `model`; None where it does not build or
    edit there (a trained editor for another model, a part of it missing)."""
    spec = get_method(method)
    try:
        return spec.build(make_config(spec.config_cls, overrides)).param_names(model)
    except Exception:
        return None


def default_method_for(
    model: nn.Module, methods: Sequence[str], overrides_for: Callable[[str], Mapping[str, Any]] = lambda _: {},
) -> str:
    """The first of DEFAULT_METHODS that builds with its `overrides_for` and edits `model`, else the first
    of `methods`."""
    for method in DEFAULT_METHODS:
        if method in methods and param_names_of(method, model, overrides_for(method)) is not None:
            return method
    return methods[0]
