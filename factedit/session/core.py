"""`EditSession`: one model, its journal and one Editor, shared by the Streamlit app and the HTTP service.

Concurrency: the weights are guarded by a readers–writer lock (`rwlock.py`). Generations, predictions,
diffs and other reads hold it shared and run together; an edit, revert or import holds it alone, waits
for running reads and holds new ones back, so no read ever sees half-applied weights. Writes that
would queue past `max_pending_writes` are refused with `SessionBusyError` (the service answers 503).

The public methods take the lock once; the `_unlocked` helpers below them assume it is held (the lock
is not reentrant).

Methods: the journal holds edits of any method (replay only adds the stored deltas); when an edit
asks for another method or other settings, the one Editor switches with `Editor.set_method`, keeping
weights, history and journal.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..editing.editor import Editor
from ..editing.errors import ConfigError, FacteditError, InvalidDeltaError, JournalError
from ..editing.journal import Journal
from ..editing.loading import load_model, model_id
from ..editing.methods import available_methods
from ..editing.record import EditRecord
from ..editing.request import EditRequest
from ..editing.scoring import score_requests
from ..editing.weights import model_sha256
from .config import SessionConfig
from .generation import BatchGenerator
from .rwlock import LockTimeout, ReadWriteLock

logger = logging.getLogger(__name__)

MAX_PROBES = 20
MAX_CACHED = 64  # predictions kept for the current weights


class SessionBusyError(FacteditError):
    """Too many edits are already waiting for the weights; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Prediction:
    """What the model does with one prompt now: top-5 next tokens and a greedy continuation."""

    prompt: str
    top: list[dict[str, Any]]  # [{"token", "id", "prob"}] x 5
    continuation: str


@dataclass(frozen=True)
class EditOutcome:
    record: EditRecord
    before: Prediction
    after: Prediction


class EditSession:
    """Model, tokenizer, journal and current Editor (see the module docstring).

    Args:
        config: which model and journal, the default method and its settings, the guard.
        max_pending_writes: edits, reverts and imports allowed to wait for the weights at once.
        lock_timeout: seconds a write waits for the weights before `SessionBusyError` (None: no limit).
    """

    def __init__(self, config: SessionConfig, *, max_pending_writes: int = 8, lock_timeout: float | None = None):
        self.config = config
        self.rw = ReadWriteLock()
        self.max_pending_writes = max_pending_writes
        self.lock_timeout = lock_timeout
        self.version = 0  # bumped by every change of the weights; keys the prediction cache
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)  # the session's own process: a process setting
        self.model, self.tokenizer = load_model(config.model_source)
        self.model_id = model_id(self.model)
        self.methods = available_methods()
        self.journal_path = config.journal_path
        self.journal_error: str | None = None  # why the journal cannot be used (then nothing can be edited)
        self.editor: Editor | None = None
        self._journal: Journal | None = None
        self._editor_settings: tuple[str, str] | None = None  # (method, overrides as JSON) the Editor has
        self._cache: dict[tuple, Any] = {}
        self._cache_lock = threading.Lock()  # readers share the cache
        self._probes_before: tuple[int, list[dict[str, Any]]] | None = None  # (version, scores)
        self._generator: BatchGenerator | None = None
        self._generator_options: dict[str, Any] = {}
        self._generator_lock = threading.Lock()
        self._summary: dict[str, Any] = {}
        self.probes = self._load_probes()
        self._open(self.journal_path)
        self._summarize()

    # --- locking ------------------------------------------------------------------------------------
    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the weights shared (for reads outside this class, e.g. a generation batch)."""
        with self.rw.read():
            yield

    @contextmanager
    def _writing(self) -> Iterator[None]:
        if self.rw.waiting_writers >= self.max_pending_writes:
            raise SessionBusyError(f"{self.rw.waiting_writers} edits are already waiting; try again shortly")
        try:
            with self.rw.write(self.lock_timeout):
                yield
        except LockTimeout as exc:
            raise SessionBusyError(str(exc)) from exc

    # --- journal and editor -------------------------------------------------------------------------
    def _open(self, path: Path) -> None:
        """Open `path` and replay its active edits; on failure keep the error and stay read-only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._journal = Journal(path)
        except Exception as exc:
            self.journal_error = f"{type(exc).__name__}: {exc}"
            return
        errors = []
        for method in self._method_order():
            try:
                editor = Editor(method, tokenizer=self.tokenizer, journal=self._journal,
                                guard=self.config.guard_max_ratio, **self.config.overrides_for(method))
            except Exception as exc:
                errors.append(f"{method}: {exc}")
                continue
            try:
                editor.attach(self.model)
            except Exception as exc:
                self.journal_error = f"{type(exc).__name__}: {exc}"
                self._reload_model()  # a failed replay may have touched the weights
                self._journal.close()
                self._journal = None
                return
            self.editor, self._editor_settings = editor, (method, "{}")
            return
        self.journal_error = "no edit method could be built: " + "; ".join(errors)

    def _method_order(self) -> list[str]:
        first = self.config.default_method
        return [first] + [m for m in self.methods if m != first]

    def _reload_model(self) -> None:
        self.model, _ = load_model(self.config.model_source)
        self.version += 1
        if self._generator is not None:  # it holds the old model
            self.start_generator(**self._generator_options)

    def start_new_journal(self) -> Path:
        """Use a fresh journal file beside the current one (the old file is left as it is)."""
        with self._writing():
            if self._journal is not None:
                self._journal.close()
            self._journal, self.editor, self.journal_error = None, None, None
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = self.journal_path.with_name(f"{self.journal_path.stem}-{stamp}{self.journal_path.suffix}")
            self._reload_model()
            self.journal_path = path
            self._open(path)
            self._summarize()
            return path

    def _editor_for(self, method: str | None, overrides: Mapping[str, Any] | None = None) -> Editor:
        """The Editor set to `method` (default: the config's) with the config's settings for it plus
        `overrides`; switches (see the module docstring) only when they differ from the current ones."""
        editor = self._require_editor()
        method = method or self.config.default_method
        if method not in self.methods:
            raise ConfigError(f"unknown method {method!r}; registered: {', '.join(self.methods)}")
        overrides = dict(overrides or {})
        settings = (method, json.dumps(overrides, sort_keys=True, default=str))
        if settings == self._editor_settings:
            return editor
        try:
            editor.set_method(method, **{**self.config.overrides_for(method), **overrides})
        except FacteditError:
            raise
        except Exception as exc:  # e.g. the method's module or checkpoint is missing
            raise ConfigError(f"method {method!r} is not available: {type(exc).__name__}: {exc}") from exc
        self._editor_settings = settings
        return editor

    def _require_editor(self) -> Editor:
        if self.editor is None:
            raise JournalError(self.journal_error or "the journal is not open")
        return self.editor

    # --- generation -----------------------------------------------------------------------------------
    @property
    def generator(self) -> BatchGenerator:
        """The engine that generates from the current weights in batches (started on first use)."""
        with self._generator_lock:
            if self._generator is None:
                self._generator = BatchGenerator(self.model, self.tokenizer, self.reading, **self._generator_options)
            return self._generator

    def start_generator(self, **options: Any) -> BatchGenerator:
        """(Re)start the generation engine with `BatchGenerator` options (max_batch, max_pending, ...);
        requests of the one it replaces end with an error."""
        self.stop_generator()
        with self._generator_lock:
            self._generator_options = dict(options)
        return self.generator

    def stop_generator(self) -> None:
        with self._generator_lock:
            generator, self._generator = self._generator, None
        if generator is not None:
            generator.close()

    def close(self) -> None:
        self.stop_generator()
        with self.rw.write():
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            if self.editor is not None:
                self.editor.close()
            self.editor = None

    # --- changes ------------------------------------------------------------------------------------
    def edit(
        self, method: str | None, prompt: str, target: str,
        paraphrases: Sequence[str] = (), locality: Sequence[str] = (),
    ) -> EditOutcome:
        """Apply one edit with `method`; returns the record and the prompt's predictions around it."""
        request = EditRequest(prompt, target, paraphrases=tuple(paraphrases), locality=tuple(locality))
        with self._writing():
            editor = self._editor_for(method)
            before, probes = self._predict_unlocked(prompt), self._score_probes_unlocked()
            record = editor.edit_batch(self.model, [request])
            self._changed(probes)
            return EditOutcome(record, before, self._predict_unlocked(prompt))

    def edit_requests(
        self, requests: Sequence[EditRequest], method: str | None = None, overrides: Mapping[str, Any] | None = None,
    ) -> EditRecord:
        """Apply one or several facts as one edit (one record), with `method` and config `overrides`."""
        if not requests:
            raise ConfigError("an edit needs at least one fact")
        with self._writing():
            editor = self._editor_for(method, overrides)
            probes = self._score_probes_unlocked()
            record = editor.edit_batch(self.model, list(requests))
            self._changed(probes)
            return record

    def revert(self, edit_id: str) -> EditRecord:
        with self._writing():
            editor, probes = self._require_editor(), self._score_probes_unlocked()
            record = editor.revert(self.model, edit_id)
            self._changed(probes)
            return record

    def revert_all(self) -> list[EditRecord]:
        with self._writing():
            editor, probes = self._require_editor(), self._score_probes_unlocked()
            records = editor.revert_all(self.model)
            if records:
                self._changed(probes)
            return records

    def import_edit(self, data: bytes) -> EditRecord:
        """Apply an exported edit file's bytes as a new edit (checked against this model)."""
        with self._writing():
            editor, probes = self._require_editor(), self._score_probes_unlocked()
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "upload.safetensors"
                path.write_bytes(data)
                try:
                    record = editor.import_edit(self.model, path)
                except FacteditError:
                    raise
                except Exception as exc:  # unreadable bytes: not a safetensors file at all
                    raise InvalidDeltaError(f"not an exported factedit edit: {exc}") from exc
            self._changed(probes)
            return record

    def _changed(self, probes_before: list[dict[str, Any]]) -> None:
        """After a successful change: new cache version; remember the probes as they were before it."""
        self._probes_before = (self.version, probes_before)
        self.version += 1
        self._summarize()

    # --- reading ------------------------------------------------------------------------------------
    def history(self) -> list[EditRecord]:
        """Every edit, oldest first (records without their deltas' tensors)."""
        with self.rw.read():
            return self.editor.history if self.editor is not None else []

    def record(self, edit_id: str) -> EditRecord:
        """One edit's record (its delta included)."""
        with self.rw.read():
            return self._require_editor().record(edit_id)

    def export_edit(self, edit_id: str) -> bytes:
        with self.rw.read():
            editor = self._require_editor()
            with tempfile.TemporaryDirectory() as tmp:
                return editor.export_edit(edit_id, Path(tmp) / "edit.safetensors").read_bytes()

    def diff(self, edit_id: str, probes: Sequence[str] | None = None) -> dict[str, Any]:
        """`EditDiff.to_dict()` of one edit, with `probes` (default: the session's) scored with and
        without it."""
        probes = tuple(self.probes if probes is None else probes)
        with self.rw.read():
            key = ("diff", self.version, edit_id, probes)
            cached = self._cached(key)
            if cached is None:
                editor = self._require_editor()
                cached = self._store(key, editor.diff(edit_id, model=self.model, probes=probes).to_dict())
            return cached

    def predict(self, prompt: str) -> Prediction:
        """Top-5 next tokens and a greedy continuation of `prompt` on the current weights (cached)."""
        with self.rw.read():
            return self._predict_unlocked(prompt)

    def score_probes(self) -> list[dict[str, Any]]:
        """[{"prompt", "top"}] for every probe on the current weights (cached per version)."""
        with self.rw.read():
            return self._score_probes_unlocked()

    def probes_before_last_change(self) -> dict[str, dict[str, Any]]:
        """Probe scores just before the last edit or revert, by prompt ({} before the first)."""
        if self._probes_before is None:
            return {}
        return {row["prompt"]: row for row in self._probes_before[1]}

    def weights_sha256(self) -> str:
        """sha256 over every parameter of the served model (cached per version): two processes serve
        the same weights exactly when these agree."""
        with self.rw.read():
            key = ("sha256", self.version)
            cached = self._cached(key)
            return cached if cached is not None else self._store(key, model_sha256(self.model))

    def health(self) -> dict[str, Any]:
        """Model, method, journal and edit counts, and the drift the guard measured last. Never waits for
        the lock: it answers during an edit too (the figures are those of the last finished change)."""
        return {
            "status": "ok" if self.editor is not None else "read_only",
            "model": self.model_id,
            "method": self._editor_settings[0] if self._editor_settings else None,
            "methods": list(self.methods),
            "journal": {"name": self.journal_path.name, "error": self.journal_error},
            **self._summary,
            "guard_max_ratio": self.config.guard_max_ratio,
            "weights_version": self.version,
            "writing": self.rw.writing,
            "pending_writes": self.rw.waiting_writers,
        }

    def _summarize(self) -> None:
        """Refresh the figures `health` reports (called with the lock held, after every change)."""
        history = self.editor.history if self.editor is not None else []
        active = [r for r in history if r.status == "active"]
        self._summary = {"edits": len(history), "active_edits": len(active),
                         "drift": next((r.drift for r in reversed(active) if r.drift), None)}

    def _predict_unlocked(self, prompt: str) -> Prediction:
        key = ("predict", self.version, prompt)
        cached = self._cached(key)
        if cached is None:
            top = score_requests(self.model, self.tokenizer, [], probes=[prompt])["probes"][0]["top"]
            cached = self._store(key, Prediction(prompt, top, self._continue(prompt)))
        return cached

    def _score_probes_unlocked(self) -> list[dict[str, Any]]:
        key = ("probes", self.version, tuple(self.probes))
        cached = self._cached(key)
        if cached is None:
            scored = score_requests(self.model, self.tokenizer, [], probes=self.probes) if self.probes else {}
            cached = self._store(key, scored.get("probes", []))
        return cached

    def _continue(self, prompt: str) -> str:
        encoded = self.tokenizer(prompt, return_tensors="pt")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                **encoded, do_sample=False, max_new_tokens=self.config.continuation_tokens, pad_token_id=pad,
            )
        return self.tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)

    def _cached(self, key: tuple) -> Any:
        with self._cache_lock:
            return self._cache.get(key)

    def _store(self, key: tuple, value: Any) -> Any:
        """Cache `value` for the current weights; drop entries of older weights and keep it small."""
        with self._cache_lock:
            for stale in [k for k in self._cache if k[1] != self.version]:
                del self._cache[stale]
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[key] = value
        return value

    # --- probes (kept beside the journal, shared by all users of the session) ------------------------
    @property
    def _probes_file(self) -> Path:
        return self.config.journal_path.with_name(self.config.journal_path.name + ".probes.json")

    def _load_probes(self) -> list[str]:
        try:
            probes = json.loads(self._probes_file.read_text())
            if isinstance(probes, list) and all(isinstance(p, str) for p in probes):
                return probes
        except (OSError, ValueError):
            pass
        return list(self.config.probes)

    def set_probes(self, probes: Sequence[str]) -> None:
        cleaned = list(dict.fromkeys(p.strip() for p in probes if p.strip()))
        if len(cleaned) > MAX_PROBES:
            raise ConfigError(f"at most {MAX_PROBES} probes; remove some first")
        self.probes = cleaned
        try:
            self._probes_file.parent.mkdir(parents=True, exist_ok=True)
            self._probes_file.write_text(json.dumps(cleaned, indent=1))
        except OSError as exc:  # only persistence is lost
            logger.warning("could not save the probe list to %s: %s", self._probes_file, exc)
