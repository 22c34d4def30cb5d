"""The app's settings: `factedit/conf/app.yaml`, then environment variables, validated into one dataclass.

    FACTEDIT_APP_CONFIG    another YAML file instead of factedit/conf/app.yaml
    FACTEDIT_APP_MODEL     "default" (the embedded SmolLM2-135M) or a local HuggingFace model folder
    FACTEDIT_APP_JOURNAL   the journal file (default: runs/app/edits-<model>.sqlite under the repository)
    FACTEDIT_APP_THREADS   torch CPU threads for the app process (0: torch's default, all cores)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from factedit import ConfigError
from factedit.paths import CONFIG_DIR
from factedit.session import SessionConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_FILE = CONFIG_DIR / "app.yaml"

ENV_CONFIG = "FACTEDIT_APP_CONFIG"
ENV_MODEL = "FACTEDIT_APP_MODEL"
ENV_JOURNAL = "FACTEDIT_APP_JOURNAL"
ENV_THREADS = "FACTEDIT_APP_THREADS"


@dataclass(frozen=True)
class AppConfig(SessionConfig):
    """The session's settings (factedit.session.SessionConfig) plus the page's own."""

    example_prompt: str = "The capital of France is"  # pre-filled in the edit form
    example_target: str = "Rome"
    # Preselected in "Compare methods" (those registered): the methods the guide covers that edit fast
    # enough to compare at once.
    compare_methods: tuple[str, ...] = ("mend", "ultraedit", "ft_l", "lora")

    def default_journal_path(self) -> Path:
        return REPO_ROOT / "runs" / "app" / f"edits-{self.model_tag}.sqlite"


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
    for name in ("probes", "compare_methods"):
        if name in values:
            values[name] = tuple(str(p) for p in values[name])
    try:
        return AppConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid app settings in {path}: {exc}") from exc
