"""factedit: edit facts inside HuggingFace causal language models and undo them exactly.

    import factedit
    model, tok = factedit.load_model()
    editor = factedit.Editor("ft_l", tokenizer=tok)
    record = editor.edit(model, "The capital of France is", "Rome")
    editor.revert(model, record.id)
"""

from ._version import __version__
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
