"""`MethodSwitch`: which method and settings the session's one Editor has, and switching them. The
journal holds edits of any method (replay only adds the stored deltas), so when an edit asks for another
method or other settings the Editor switches in place with `Editor.set_method`, keeping weights,
history and journal."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.errors import ConfigError, FacteditError
from ..core.methods import default_method_for, get_method, param_names_of
from ..core.settable import checked, settable_fields
from ..editing.editor import Editor
from ..editing.journal import Journal
from .config import SessionConfig


class MethodSwitch:
    """Args:
    config: the default method, each method's settings and the guard.
    methods: the registered methods.
    model: the session's model, which decides the default method where `config` names none.
    """

    def __init__(self, config: SessionConfig, methods: Sequence[str], model: nn.Module) -> None:
        self.config = config
        self.methods = methods
        self.current: tuple[str, str] | None = None  # (method, overrides as JSON) the Editor has
        self.default = config.default_method or default_method_for(model, methods, config.overrides_for)

    @property
    def method(self) -> str | None:
        return self.current[0] if self.current else None

    def first_editor(self, journal: Journal, tokenizer: PreTrainedTokenizerBase) -> tuple[str, Editor]:
        """(method, an Editor over `journal`, not yet attached) for the first method that builds, the
        default first; ConfigError saying why each failed when none does."""
        first = self.default
        errors = []
        for method in [first] + [m for m in self.methods if m != first]:
            try:
                return method, Editor(method, tokenizer=tokenizer, journal=journal,
                                      guard=self.config.guard_max_ratio, **self.config.overrides_for(method))
            except Exception as exc:  # a method whose module or checkpoint is missing: try the next
                errors.append(f"{method}: {exc}")
        raise ConfigError("no edit method could be built: " + "; ".join(errors))

    def edited_params(self, model: nn.Module) -> list[str]:
        """The parameters each method that builds would edit with the config's settings for it."""
        # None: a method that does not build or edit here is not used either
        names = [param_names_of(method, model, self.config.overrides_for(method)) for method in self.methods]
        return list(dict.fromkeys(name for some in names if some is not None for name in some))

    def built(self, method: str) -> None:
        """The Editor now in use was built with `method` and the config's settings for it."""
        self.current = (method, "{}")

    def known(self, method: str | None) -> str:
        """`method`, or the default; ConfigError for one that is not registered."""
        method = method or self.default
        if method not in self.methods:
            raise ConfigError(f"unknown method {method!r}; registered: {', '.join(self.methods)}")
        return method

    def settings(self, method: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The config's settings for `method` with a caller's `overrides` on top, once they are checked
        against what a caller may set per edit (settable.py; ConfigNotAllowedError otherwise): the
        session's callers are the app and the service, its config is the operator's."""
        caller = checked(settable_fields(get_method(method).config_cls), overrides or {}, f"config of {method}")
        return {**self.config.overrides_for(method), **caller}

    def switch(self, editor: Editor, method: str | None, overrides: Mapping[str, Any] | None = None) -> Editor:
        """`editor` set to `method` (default: `self.default`) with `settings(method, overrides)`; switched
        only when they differ from the current ones."""
        method = self.known(method)
        merged = self.settings(method, overrides)
        settings = (method, json.dumps(dict(overrides or {}), sort_keys=True, default=str))
        if settings == self.current:
            return editor
        with available(method):
            editor.set_method(method, **merged)
        self.current = settings
        return editor


@contextmanager
def available(method: str) -> Iterator[None]:
    """Building `method` failed because a part of it is missing here (its module, a file it reads): say
    so as a ConfigError. Anything else (out of memory, a bug) stays what it is: it is not the caller's
    invalid config."""
    try:
        yield
    except FacteditError:
        raise
    except (ImportError, OSError) as exc:
        raise ConfigError(f"method {method!r} is not available: {type(exc).__name__}: {exc}") from exc
