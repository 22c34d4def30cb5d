"""factedit: edit facts inside HuggingFace causal language models and undo them exactly.

    import factedit
    model, tok = factedit.load_model()
    editor = factedit.Editor("ft_l", tokenizer=tok)
    record = editor.edit(model, "The capital of France is", "Rome")
    editor.revert(model, record.id)
"""

from ._version import __version__
from .editing.adapters import AdapterExport, check_vllm_compatible
from .editing.delta import Delta, ParamDelta
from .editing.drift import GuardConfig
from .editing.editor import Editor
from .editing.errors import (
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
from .editing.loading import load_model
from .editing.methods import MethodSpec, available_methods, register_method
from .editing.preserve import PreserveConfig
from .editing.preview import EditPreview
from .editing.record import EditRecord
from .editing.request import EditRequest

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
