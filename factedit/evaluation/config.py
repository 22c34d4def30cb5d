"""The evaluation's typed config, validated at the boundary from the composed Hydra config."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.configs import validated
from ..core.errors import ConfigError
from ..paths import resolve_path
from .loaders import FORMATS, REPHRASE_CHOICES

MODES = ("single", "batch", "sequential")
ALL_MODES = "all"  # mode=all: every mode, each in out/<mode>/ (see suite.py)
NONE_METHOD = "none"  # the unedited baseline


@dataclass(frozen=True)
class MethodRun:
    name: str  # a registered method, or "none"
    overrides: Mapping[str, Any] = field(default_factory=dict)  # Editor(...) keyword arguments


@dataclass(frozen=True)
class DataConfig:
    path: Path
    name: str | None = None  # the named dataset, if one was chosen
    format: str = "auto"
    fields: dict[str, str] | None = None  # mapped format only: record field -> source field
    skip_invalid: bool = False  # the dataset's own default (the top-level skip_invalid overrides it)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"invalid eval config: data.format must be one of {', '.join(FORMATS)}")


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # None: the embedded default model; else a hub id or a local folder
    dtype: str | None = None
    device: str | None = None


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """The scalar settings of an evaluation run (see factedit/conf/eval.yaml for what each does)."""

    n: int | None = None
    start: int = 0
    mode: str = "single"
    batch_size: int = 8
    sequential_batch: int = 1
    checkpoints: tuple[int, ...] = (10, 25, 50, 100)
    shuffle: bool = False
    seed: int = 0
    rephrase: str = "all"  # "paraphrase" / "generation": only records with a rephrase prompt of that kind
    skip_invalid: bool = False
    fluency: bool = False
    gen_tokens: int = 100
    generation: bool = True
    chat_tokens: int = 16
    score_batch_size: int = 16
    padding_side: str = "right"
    resume: bool = True
    journal: bool = True
    plots: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.n is not None and self.n < 1:
            problems.append("n must be >= 1 (or null for every record)")
        if self.start < 0:
            problems.append("start must be >= 0")
        if self.rephrase not in REPHRASE_CHOICES:
            problems.append(f"rephrase must be one of {', '.join(REPHRASE_CHOICES)}, got {self.rephrase!r}")
        if min(self.batch_size, self.sequential_batch, self.score_batch_size, self.gen_tokens, self.chat_tokens) < 1:
            problems.append("batch_size, sequential_batch, score_batch_size, gen_tokens and chat_tokens must be >= 1")
        if any(c < 1 for c in self.checkpoints):
            problems.append("checkpoints must be >= 1")
        if self.padding_side not in ("left", "right"):
            problems.append("padding_side must be left or right")
        if problems:
            raise ConfigError("invalid eval config: " + "; ".join(problems))


@dataclass(frozen=True, kw_only=True)
class EvalConfig(RunSettings):
    """One evaluation run: the methods, the data, the model, where results go, and the run's settings."""

    methods: tuple[MethodRun, ...]
    data: DataConfig
    out: Path
    model: ModelConfig = ModelConfig()

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("invalid eval config: no method given")
        super().__post_init__()

    def identity(self) -> dict[str, Any]:
        """What must match for an output folder to be resumed."""
        return {
            "data": str(self.data.path),
            "format": self.data.format,
            "n": self.n,
            "start": self.start,
            "mode": self.mode,
            "batch_size": self.batch_size if self.mode == "batch" else None,
            "sequential_batch": self.sequential_batch if self.mode == "sequential" else None,
            "shuffle": self.shuffle,
            "seed": self.seed if self.shuffle else None,
            **({"rephrase": self.rephrase} if self.rephrase != "all" else {}),  # folders from before it resume
            "model": self.model.path,
            "dtype": self.model.dtype,
            "fluency": self.fluency,
            "gen_tokens": self.gen_tokens if self.fluency else None,
            "generation": self.generation,
            "chat_tokens": self.chat_tokens if self.generation else None,
            "skip_invalid": self.skip_invalid,
        }


def _method_runs(cfg: Mapping[str, Any]) -> tuple[MethodRun, ...]:
    """Methods in the order chosen; the kwargs of conf/method/<name>.yaml, then method_overrides."""
    extra = dict(cfg.get("method_overrides") or {})
    runs = []
    for name, kwargs in (cfg.get("methods") or {}).items():
        merged = {**dict(kwargs or {}), **dict(extra.pop(name, None) or {})}
        if name == NONE_METHOD and merged:
            raise ConfigError("method none (the unedited baseline) takes no overrides")
        runs.append(MethodRun(name, merged))
    if extra:
        raise ConfigError(f"method_overrides for {sorted(extra)}, which are not chosen methods")
    return tuple(runs)


def default_out(methods: tuple[MethodRun, ...], data: DataConfig) -> Path:
    stem = data.name or data.path.stem
    return (
        Path("runs") / "eval" / f"{time.strftime('%Y%m%d-%H%M%S')}-{'+'.join(m.name for m in methods)}-{stem}"
    )


def from_container(cfg: Mapping[str, Any]) -> EvalConfig:
    """EvalConfig from the composed config as plain Python containers (OmegaConf.to_container).

    Every part goes through the project's one validation path (`core.configs.validated`): unknown
    keys and ill-typed values are refused with the key's name before anything loads."""
    groups = {"methods", "method_overrides", "data", "model", "out"}
    data_cfg = dict(cfg.get("data") or {})
    if not data_cfg.get("path"):
        raise ConfigError(
            "no dataset: give data=<name> (counterfact, counterfact_train, zsre) or data=<file>"
        )
    data_cfg["path"] = resolve_path(data_cfg["path"])
    data_cfg["format"] = data_cfg.get("format") or "auto"
    data = validated(DataConfig, data_cfg, "eval config data")
    model = validated(ModelConfig, dict(cfg.get("model") or {}), "eval config model")
    simple = {key: value for key, value in cfg.items() if key not in groups}
    if simple.get("skip_invalid") is None:
        simple["skip_invalid"] = data.skip_invalid
    if simple.get("checkpoints") is not None:  # the order given does not matter; repeats count once
        simple["checkpoints"] = sorted({int(c) for c in simple["checkpoints"]})
    settings = validated(RunSettings, simple, "eval config")
    methods = _method_runs(cfg)
    out = Path(cfg["out"]) if cfg.get("out") else default_out(methods, data)
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(RunSettings)}
    return EvalConfig(methods=methods, data=data, model=model, out=out, **values)


def several_modes(cfg: Mapping[str, Any]) -> bool:
    """Whether `mode` asks for a run per mode (a list, or `all`) rather than one run."""
    mode = cfg.get("mode")
    return mode == ALL_MODES or isinstance(mode, list | tuple)


def configs_by_mode(cfg: Mapping[str, Any]) -> list[EvalConfig]:
    """One EvalConfig per mode asked for. `mode` names one mode, a list of them, or `all` (single,
    sequential, batch); with several, each mode is an ordinary run of its own in out/<mode>/ (resumable
    on its own) and `suite.run_suite` adds the overview one level up."""
    if not several_modes(cfg):
        return [from_container(cfg)]
    mode = cfg["mode"]
    modes = ["single", "sequential", "batch"] if mode == ALL_MODES else list(dict.fromkeys(str(m) for m in mode))
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise ConfigError(
            f"invalid eval config: mode must be one of {', '.join(MODES)}, a list of them or {ALL_MODES}, got {mode!r}"
        )
    first = from_container({**cfg, "mode": modes[0]})  # validated once; one folder name for every mode
    return [dataclasses.replace(first, mode=m, out=first.out / m) for m in modes]
