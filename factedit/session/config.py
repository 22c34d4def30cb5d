"""Settings of an editing session: which model, which journal, how edits are made."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..model.loading import cache_dir

DEFAULT_MODEL = "default"
DEFAULT_PROBES = (
    "The capital of France is",
    "The capital of Germany is",
    "The capital of Italy is",
    "The Eiffel Tower is located in",
    "The official language of Spain is",
)


@dataclass(frozen=True)
class SessionConfig:
    model: str = DEFAULT_MODEL  # "default" (the embedded SmolLM2-135M) or a local HuggingFace folder
    journal: str = ""  # journal file; "" = `default_journal_path()`
    # The method of an edit that names none; None = `mend` where its trained editor fits the model (the
    # default model), else `ultraedit` (switch.DEFAULT_METHODS; docs/lifelong.md, "Lifelong editing").
    default_method: str | None = None
    method_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # method -> config fields
    probes: tuple[str, ...] = DEFAULT_PROBES  # the probe list a new journal starts with
    continuation_tokens: int = 12  # length of the greedy continuation shown before/after an edit
    torch_threads: int | None = None  # CPU threads of the process; None = torch's default
    # The drift guard of every edit (factedit.safety.drift): an edit that raises the reference text's
    # perplexity past this many times the base model's is undone and reported.
    guard_max_ratio: float = 1.5
    # Prepare the guard when the journal opens (Editor.warm_guard, for the blocks every method edits):
    # once per model, seconds on a CPU, so that the first edits do not pay for it.
    warm_guard: bool = True

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ConfigError("session config: model is empty; use 'default' or a local model folder")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError("session config: torch_threads must be >= 1, or null for torch's default")
        if not (isinstance(self.guard_max_ratio, (int, float)) and self.guard_max_ratio > 1):
            raise ConfigError("session config: guard_max_ratio must be a number > 1")
        if not 1 <= self.continuation_tokens <= 64:
            raise ConfigError("session config: continuation_tokens must be between 1 and 64")
        for method, overrides in self.method_overrides.items():
            if not isinstance(overrides, Mapping):
                raise ConfigError(f"session config: method_overrides.{method} must be a mapping of config fields")

    @property
    def model_tag(self) -> str:
        """The model's name, safe in a file name."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.model).name or "model")

    def default_journal_path(self) -> Path:
        return cache_dir() / "journals" / f"edits-{self.model_tag}.sqlite"

    @property
    def journal_path(self) -> Path:
        if self.journal:
            return Path(self.journal).expanduser().resolve()
        return self.default_journal_path()

    @property
    def model_source(self) -> str | None:
        """What to give `factedit.load_model`: None for the embedded default model."""
        return None if self.model == DEFAULT_MODEL else self.model

    def overrides_for(self, method: str) -> dict[str, Any]:
        return dict(self.method_overrides.get(method, {}))

    def cache_key(self) -> str:
        """A string that identifies the settings (shared state is cached under it)."""
        return json.dumps({**asdict(self), "journal": str(self.journal_path)}, sort_keys=True, default=str)
