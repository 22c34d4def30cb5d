"""factedit: edit facts inside HuggingFace causal language models and undo them exactly.

    import factedit
    model, tok = factedit.load_model()
    editor = factedit.Editor("ft_l", tokenizer=tok)
    record = editor.edit(model, "The capital of France is", "Rome")
    editor.revert(model, record.id)

The names below load on first use (core/lazy.py): `import factedit`, or a command that needs only part of
the package (`factedit --help`), does not import torch, transformers and peft up front.
"""

from typing import TYPE_CHECKING

from ._version import __version__
from .core.lazy import lazy_exports

__all__ = [
    "AdapterExport",
    "CheckpointError",
    "ConfigError",
    "Delta",
    "DriftError",
    "EditNotFoundError",
    "EditPreview",
    "EditRecord",
    "EditRequest",
    "Editor",
    "FacteditError",
    "GuardConfig",
    "InvalidDeltaError",
    "InvalidRequestError",
    "JournalError",
    "MethodSpec",
    "ModelMismatchError",
    "ParamDelta",
    "PreserveConfig",
    "UnsupportedModelError",
    "__version__",
    "available_methods",
    "check_vllm_compatible",
    "load_model",
    "register_method",
]

_ERRORS = ("CheckpointError", "ConfigError", "DriftError", "EditNotFoundError", "FacteditError", "InvalidDeltaError",
           "InvalidRequestError", "JournalError", "ModelMismatchError", "UnsupportedModelError")
__getattr__, __dir__ = lazy_exports(__name__, {
    "AdapterExport": "artifacts.adapters", "check_vllm_compatible": "artifacts.adapters",
    "Delta": "core.delta", "ParamDelta": "core.delta", **dict.fromkeys(_ERRORS, "core.errors"),
    "MethodSpec": "core.methods", "available_methods": "core.methods", "register_method": "core.methods",
    "EditRecord": "core.record", "EditRequest": "core.request", "Editor": "editing.editor",
    "EditPreview": "editing.preview", "load_model": "model.loading", "GuardConfig": "safety.drift",
    "PreserveConfig": "safety.preserve",
})

if TYPE_CHECKING:  # what type checkers and editors read
    from .artifacts.adapters import AdapterExport, check_vllm_compatible
    from .core.delta import Delta, ParamDelta
    from .core.errors import (
        CheckpointError,
        ConfigError,
        DriftError,
        EditNotFoundError,
        FacteditError,
        InvalidDeltaError,
        InvalidRequestError,
        JournalError,
        ModelMismatchError,
        UnsupportedModelError,
    )
    from .core.methods import MethodSpec, available_methods, register_method
    from .core.record import EditRecord
    from .core.request import EditRequest
    from .editing.editor import Editor
    from .editing.preview import EditPreview
    from .model.loading import load_model
    from .safety.drift import GuardConfig
    from .safety.preserve import PreserveConfig
