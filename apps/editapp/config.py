"""The app's settings: `factedit/conf/app.yaml`, then environment variables, validated into one dataclass.

    FACTEDIT_APP_CONFIG    another YAML file instead of factedit/conf/app.yaml
    FACTEDIT_APP_MODEL     "default" (the embedded SmolLM2-135M) or a local HuggingFace model folder
    FACTEDIT_APP_JOURNAL   the journal file (default: runs/app/edits-<model>.sqlite under the repository)
    FACTEDIT_APP_THREADS   torch CPU threads for the app process (0: torch's default, all cores)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from factedit import ConfigError
from factedit.paths import CONFIG_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_FILE = CONFIG_DIR / "app.yaml"
DEFAULT_MODEL = "default"

ENV_CONFIG = "FACTEDIT_APP_CONFIG"
ENV_MODEL = "FACTEDIT_APP_MODEL"
ENV_JOURNAL = "FACTEDIT_APP_JOURNAL"
ENV_THREADS = "FACTEDIT_APP_THREADS"

DEFAULT_PROBES = (
    "The capital of France is",
    "The capital of Germany is",
    "The capital of Italy is",
    "The Eiffel Tower is located in",
    "The official language of Spain is",
)


@dataclass(frozen=True)
class AppConfig:
    model: str = DEFAULT_MODEL  # "default" or a local HuggingFace folder
    journal: str = ""  # journal file; "" = runs/app/edits-<model>.sqlite under the repository
    default_method: str = "ft_l"  # the method preselected in the edit form
    method_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # method -> config fields
    probes: tuple[str, ...] = DEFAULT_PROBES  # the probe list a new journal starts with
    continuation_tokens: int = 12  # length of the greedy continuation shown before/after
    example_prompt: str = "The capital of France is"  # pre-filled in the edit form
    example_target: str = "Rome"
    torch_threads: int | None = None  # CPU threads of the app process; None = torch's default
    # The drift guard of every edit made in the app (factedit.editing.drift): an edit that raises the
    # reference text's perplexity past this many times the base model's is undone and reported.
    guard_max_ratio: float = 1.5

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ConfigError("app config: model is empty; use 'default' or a local model folder")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError("app config: torch_threads must be >= 1, or null for torch's default")
        if not (isinstance(self.guard_max_ratio, (int, float)) and self.guard_max_ratio > 1):
            raise ConfigError("app config: guard_max_ratio must be a number > 1")
        if not 1 <= self.continuation_tokens <= 64:
            raise ConfigError("app config: continuation_tokens must be between 1 and 64")
        for method, overrides in self.method_overrides.items():
            if not isinstance(overrides, Mapping):
                raise ConfigError(f"app config: method_overrides.{method} must be a mapping of config fields")

    @property
    def journal_path(self) -> Path:
        if self.journal:
            return Path(self.journal).expanduser().resolve()
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.model).name or "model")
        return REPO_ROOT / "runs" / "app" / f"edits-{tag}.sqlite"

    @property
    def model_source(self) -> str | None:
        """What to give `factedit.load_model`: None for the embedded default model."""
        return None if self.model == DEFAULT_MODEL else self.model

    def overrides_for(self, method: str) -> dict[str, Any]:
        return dict(self.method_overrides.get(method, {}))

    def cache_key(self) -> str:
        """A string that identifies the settings (the shared app state is cached under it)."""
        return json.dumps({**asdict(self), "journal": str(self.journal_path)}, sort_keys=True, default=str)


def load_app_config(environ: Mapping[str, str] | None = None) -> AppConfig:
    """Read the YAML file (if present), then apply the environment variables; raise ConfigError
    with the offending key on anything unknown or malformed."""
    env = os.environ if environ is None else environ
    path = Path(env.get(ENV_CONFIG) or DEFAULT_CONFIG_FILE)
    values: dict[str, Any] = {}
    if path.is_file():
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of app settings")
        values = {k: v for k, v in loaded.items() if v is not None}
    elif env.get(ENV_CONFIG):
        raise ConfigError(f"{ENV_CONFIG}={path} does not exist")
    if env.get(ENV_MODEL):
        values["model"] = env[ENV_MODEL]
    if env.get(ENV_JOURNAL):
        values["journal"] = env[ENV_JOURNAL]
    if env.get(ENV_THREADS):
        try:
            threads = int(env[ENV_THREADS])
        except ValueError:
            raise ConfigError(f"{ENV_THREADS} must be an integer, got {env[ENV_THREADS]!r}") from None
        values["torch_threads"] = threads or None
    known = set(AppConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown app setting(s) {unknown} in {path}; known: {sorted(known)}")
    if "probes" in values:
        values["probes"] = tuple(str(p) for p in values["probes"])
    try:
        return AppConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid app settings in {path}: {exc}") from exc
