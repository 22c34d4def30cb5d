"""`EditSession`: one model, its journal and one Editor, shared by the Streamlit app and the HTTP service.

Concurrency: the weights are guarded by a readers–writer lock (`rwlock.py`). Generations, predictions
and other reads hold it shared and run together; an edit, revert or import holds it alone, waits
for running reads and holds new ones back, so no read ever sees half-applied weights. Previews, diffs,
an edit's effect and `try_prompt` hold it alone too, though they write nothing: `functional_call`
swaps the module's parameters in place for the duration of a call (and a LoRA preview injects
modules), which a concurrent generation would see. Writes that
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..editing.delta import delta_metadata
from ..editing.diff import _FunctionalModel
from ..editing.editor import EXPORT_FORMAT, Editor
from ..editing.errors import ConfigError, DriftError, FacteditError, InvalidDeltaError, JournalError
from ..editing.journal import Journal
from ..editing.loading import load_model, model_id
from ..editing.methods import available_methods
from ..editing.preview import EditPreview, compare_prompts, prompt_items, score_prompts
from ..editing.record import EditRecord
from ..editing.request import EditRequest
from ..editing.scoring import top_tokens
from ..editing.weights import model_sha256
from .config import SessionConfig
from .generation import BatchGenerator
from .origins import PREVIEW, Origins
from .rwlock import LockTimeout, ReadWriteLock

logger = logging.getLogger(__name__)

MAX_PROBES = 20
MAX_CACHED = 64  # predictions kept for the current weights
MAX_NEW_TOKENS = 64  # longest continuation `predict` and `try_prompt` generate
MAX_OUTCOMES = 32  # EditOutcomes kept (by edit id) for views that show an edit's before/after


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
    """An edit and its prompt's predictions (top-5 and greedy continuation) just before and just after it;
    both None when the edit was asked for without them (`edit(..., predict=False)`: the record's
    `pre`/`post` still hold the top-5, and generating costs a second or more on a CPU)."""

    record: EditRecord
    before: Prediction | None
    after: Prediction | None


class _Generating(nn.Module):
    """`model.generate` as a forward, so functional_call can run it with some weights replaced."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(**kwargs)


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
        # The probes' next-token log-distributions just before the last change: (version, probes, logprobs).
        self._probes_before: tuple[int, tuple[str, ...], list[torch.Tensor]] | None = None
        self._last_change: dict[str, Any] | None = None  # what the last change was (health, views)
        self._last_refusal: dict[str, Any] | None = None  # the guard's last refusal, until an edit succeeds
        self._outcomes: dict[str, EditOutcome] = {}  # edit id -> predictions around it (the newest few)
        self._generator: BatchGenerator | None = None
        self._generator_options: dict[str, Any] = {}
        self._generator_lock = threading.Lock()
        self._summary: dict[str, Any] = {}
        self.probes = self._load_probes()
        self.origins = Origins(self._sidecar("origins"))
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

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the model alone without changing the weights: for computations that swap weights in through
        functional_call, add hooks or inject modules (previews, diffs, a LoRA's training), which a
        concurrent generation would otherwise see."""
        with self._writing():
            yield

    @contextmanager
    def _reporting(self, editor: Editor, progress: Callable[[int, int, float], None] | None) -> Iterator[None]:
        editor.progress = progress
        try:
            yield
        finally:
            editor.progress = None

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
            self.origins = Origins(self._sidecar("origins"))
            self._outcomes.clear()
            self._open(path)
            self._summarize()
            return path

    def _editor_for(self, method: str | None, overrides: Mapping[str, Any] | None = None) -> Editor:
        """The Editor set to `method` (default: the config's) with the config's settings for it plus
        `overrides`; switches (see the module docstring) only when they differ from the current ones."""
        editor = self._require_editor()
        method = self._known_method(method)
        overrides = dict(overrides or {})
        settings = (method, json.dumps(overrides, sort_keys=True, default=str))
        if settings == self._editor_settings:
            return editor
        with _available(method):
            editor.set_method(method, **{**self.config.overrides_for(method), **overrides})
        self._editor_settings = settings
        return editor

    def _known_method(self, method: str | None) -> str:
        """`method`, or the config's default; ConfigError for one that is not registered."""
        method = method or self.config.default_method
        if method not in self.methods:
            raise ConfigError(f"unknown method {method!r}; registered: {', '.join(self.methods)}")
        return method

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
        paraphrases: Sequence[str] = (), locality: Sequence[str] = (), *,
        overrides: Mapping[str, Any] | None = None, progress: Callable[[int, int, float], None] | None = None,
        predict: bool = True,
    ) -> EditOutcome:
        """Apply one edit with `method` (and config `overrides` on top of the session's settings for it);
        returns the record and the prompt's predictions around it (`predict=False`: without them, see
        `EditOutcome`).
        `progress(step, max_steps, loss)` is called while a fine-tuning method trains."""
        request = EditRequest(prompt, target, paraphrases=tuple(paraphrases), locality=tuple(locality))
        with self._writing():
            editor = self._editor_for(method, overrides)
            before = self._predict_unlocked(prompt) if predict else None
            probes = self._probe_logprobs_unlocked()
            with self._reporting(editor, progress), self._refusals(f"the {editor.method} edit of {prompt!r}"):
                record = editor.edit_batch(self.model, [request])
            self._changed(probes, "edit", [record.id])
            return self._outcome(record, before, predict)

    def preview(
        self, method: str | None, prompt: str, target: str,
        paraphrases: Sequence[str] = (), locality: Sequence[str] = (), *,
        overrides: Mapping[str, Any] | None = None, probes: Sequence[str] | None = None,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> EditPreview:
        """What an edit with `method` would do on the current weights, computed and scored on the prompt,
        paraphrases, locality prompts and `probes` (default: the session's) without applying anything
        (`Editor.preview`). Holds the model alone while it computes (see `_exclusive`)."""
        request = EditRequest(prompt, target, paraphrases=tuple(paraphrases), locality=tuple(locality))
        method = self._known_method(method)
        settings = {**self.config.overrides_for(method), **(overrides or {})}
        with self._exclusive():
            editor = self._require_editor()
            with self._reporting(editor, progress), _available(method):
                return editor.preview(self.model, [request], probes=list(self.probes if probes is None else probes),
                                      method=method, **settings)

    def apply_preview(self, preview: EditPreview, predict: bool = True) -> EditOutcome:
        """Apply a preview's delta as it was computed (refused once the weights changed since); `predict`
        as for `edit`."""
        prompt = preview.requests[0].prompt
        with self._writing():
            editor = self._require_editor()
            before = self._predict_unlocked(prompt) if predict else None
            probes = self._probe_logprobs_unlocked()
            with self._refusals(f"the {preview.method} edit of {prompt!r}"):
                record = editor.apply_preview(self.model, preview)
            self.origins.add(record.id, {"kind": PREVIEW, "timings": dict(preview.timings)})
            self._changed(probes, "edit", [record.id])
            return self._outcome(record, before, predict)

    def edit_requests(
        self, requests: Sequence[EditRequest], method: str | None = None, overrides: Mapping[str, Any] | None = None,
    ) -> EditRecord:
        """Apply one or several facts as one edit (one record), with `method` and config `overrides`."""
        if not requests:
            raise ConfigError("an edit needs at least one fact")
        with self._writing():
            editor = self._editor_for(method, overrides)
            probes = self._probe_logprobs_unlocked()
            with self._refusals(f"the {editor.method} edit of {len(requests)} fact(s)"):
                record = editor.edit_batch(self.model, list(requests))
            self._changed(probes, "edit", [record.id])
            return record

    def revert(self, edit_id: str) -> EditRecord:
        with self._writing():
            editor, probes = self._require_editor(), self._probe_logprobs_unlocked()
            record = editor.revert(self.model, edit_id)
            self._changed(probes, "revert", [record.id])
            return record

    def revert_all(self) -> list[EditRecord]:
        with self._writing():
            editor, probes = self._require_editor(), self._probe_logprobs_unlocked()
            records = editor.revert_all(self.model)
            if records:
                self._changed(probes, "revert", [r.id for r in records])
            return records

    def import_edit(self, data: bytes, name: str | None = None) -> EditRecord:
        """Apply an exported edit file's bytes as a new edit (checked against this model). Its origin
        (`origin(id)`) keeps the original edit's id, time and timings; `name`: the file's name."""
        exported = _exported_record(data)
        with self._writing():
            editor, probes = self._require_editor(), self._probe_logprobs_unlocked()
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "upload.safetensors"
                path.write_bytes(data)
                try:
                    with self._refusals(f"the import of {name or 'an edit file'}"):
                        record = editor.import_edit(self.model, path)
                except FacteditError:
                    raise
                except Exception as exc:  # unreadable bytes: not a safetensors file at all
                    raise InvalidDeltaError(f"not an exported factedit edit: {exc}") from exc
            self.origins.imported(record.id, exported, name, time.time())
            self._changed(probes, "import", [record.id])
            return record

    def _changed(self, probes_before: tuple[tuple[str, ...], list[torch.Tensor]], kind: str, ids: list[str]) -> None:
        """After a successful change: new cache version; remember the probes as they were before it and
        what the change was."""
        self._probes_before = (self.version, *probes_before)
        self.version += 1
        self._last_change = {"kind": kind, "edit_ids": ids, "version": self.version, "at": time.time()}
        if kind != "revert":
            self._last_refusal = None
        self._summarize()

    def _outcome(self, record: EditRecord, before: Prediction | None, predict: bool) -> EditOutcome:
        outcome = EditOutcome(record, before, self._predict_unlocked(record.request.prompt) if predict else None)
        self._outcomes[record.id] = outcome
        while len(self._outcomes) > MAX_OUTCOMES:
            del self._outcomes[next(iter(self._outcomes))]
        return outcome

    @contextmanager
    def _refusals(self, what: str) -> Iterator[None]:
        """Keep the guard's refusal of `what` for `health` (the header shows it), then re-raise it."""
        try:
            yield
        except DriftError as exc:
            self._last_refusal = {"what": what, "ratio": exc.ratio, "max_ratio": exc.max_ratio,
                                  "message": str(exc), "at": time.time()}
            raise

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
        without it (through functional_call: the model is held alone meanwhile)."""
        probes = tuple(self.probes if probes is None else probes)
        cached = self._cached(self._key("diff", edit_id, probes))
        if cached is not None:
            return cached
        with self._exclusive():  # the weights may have changed while waiting: the key is taken again
            diff = self._require_editor().diff(edit_id, model=self.model, probes=probes).to_dict()
            return self._store(self._key("diff", edit_id, probes), diff)

    def effect(self, edit_id: str, probes: Sequence[str] | None = None) -> dict[str, Any]:
        """What one edit does on the current weights (`Editor.effect`): its prompts, paraphrases,
        locality prompts and `probes` (default: the session's) without/with it when it is active, as
        they are now/with it re-applied when it is reverted; with its parameter changes. Cached."""
        probes = tuple(self.probes if probes is None else probes)
        cached = self._cached(self._key("effect", edit_id, probes))
        if cached is not None:
            return cached
        with self._exclusive():
            effect = self._require_editor().effect(edit_id, self.model, probes)
            return self._store(self._key("effect", edit_id, probes), effect)

    def next_tokens(self, prompt: str) -> list[dict[str, Any]]:
        """The top-5 next tokens of `prompt` on the current weights (cached; no generation)."""
        with self.rw.read():
            return self._next_tokens_unlocked(prompt)

    def predict(self, prompt: str, max_new_tokens: int | None = None) -> Prediction:
        """Top-5 next tokens and a greedy continuation of `prompt` (`max_new_tokens` long, default the
        config's `continuation_tokens`) on the current weights (cached)."""
        with self.rw.read():
            return self._predict_unlocked(prompt, max_new_tokens)

    def try_prompt(self, prompt: str, edit_id: str, max_new_tokens: int | None = None) -> dict[str, Any]:
        """`prompt` on the current weights and with `edit_id` toggled, side by side: {"edit_id", "active",
        "without", "with"} (Predictions): an active edit without/with it, a reverted one as the model is
        now/with it re-applied. Cached per weights."""
        if not prompt.strip():
            raise ConfigError("the prompt is empty")
        cached = self._cached(self._key("try", prompt, edit_id, max_new_tokens))
        if cached is not None:
            return cached
        with self._exclusive():
            active, replaced = self._require_editor().toggled_weights(edit_id, self.model)
            now = self._predict_unlocked(prompt, max_new_tokens)
            other = self._predict_unlocked(prompt, max_new_tokens, replaced)
            result = {"edit_id": edit_id, "active": active, "without": other if active else now,
                      "with": now if active else other}
            return self._store(self._key("try", prompt, edit_id, max_new_tokens), result)

    def outcome(self, edit_id: str) -> EditOutcome | None:
        """The predictions around one of the newest edits made through `edit` or `apply_preview` here."""
        return self._outcomes.get(edit_id)

    def origin(self, edit_id: str) -> dict[str, Any] | None:
        """Where an edit came from when not from an edit call (origins.py): import or applied preview."""
        return self.origins.get(edit_id)

    @property
    def last_change(self) -> dict[str, Any] | None:
        """{"kind": "edit"/"revert"/"import", "edit_ids", "version", "at"} of the last change (None before)."""
        return self._last_change

    def score_probes(self) -> list[dict[str, Any]]:
        """[{"prompt", "top"}] for every probe on the current weights (cached per version)."""
        with self.rw.read():
            return self._score_probes_unlocked()

    def probes_before_last_change(self) -> dict[str, dict[str, Any]]:
        """Probe scores just before the last edit or revert, by prompt ({} before the first)."""
        if self._probes_before is None:
            return {}
        _, probes, logprobs = self._probes_before
        return {p: {"prompt": p, "top": top_tokens(self.tokenizer, lp, 5)}
                for p, lp in zip(probes, logprobs, strict=True)}

    def probe_changes(self) -> list[dict[str, Any]]:
        """Every probe now against just before the last change (`preview.compare_prompts` rows: top-5,
        the old answer's probability, the largest change of any token's probability as `shift`, whether
        the top-1 flipped); a probe added since has "before" None."""
        with self.rw.read():
            key = self._key("probe_changes", tuple(self.probes))
            cached = self._cached(key)
            if cached is not None:
                return cached
            probes, now = self._probe_logprobs_unlocked()
            before = dict(zip(*self._probes_before[1:], strict=True)) if self._probes_before else {}
            rows = []
            for prompt, logprobs in zip(probes, now, strict=True):
                prior = before.get(prompt, logprobs)
                item = [("probe", prompt, None)]
                row = compare_prompts(self.tokenizer, item, [(prior, None)], [(logprobs, None)])[0]
                rows.append(row if prompt in before else {**row, "before": None})
            return self._store(key, rows)

    def weights_sha256(self) -> str:
        """sha256 over every parameter of the served model (cached per version): two processes serve
        the same weights exactly when these agree."""
        with self.rw.read():
            key = self._key("sha256")
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
            "last_change": self._last_change,
            "last_refusal": self._last_refusal,
            "weights_version": self.version,
            "writing": self.rw.writing,
            "pending_writes": self.rw.waiting_writers,
        }

    def _summarize(self) -> None:
        """Refresh the figures `health` reports (called with the lock held, after every change)."""
        history = self.editor.history if self.editor is not None else []
        active = [r for r in history if r.status == "active"]
        measured = next((r for r in reversed(active) if r.drift), None)
        self._summary = {"edits": len(history), "active_edits": len(active),
                         "drift": measured.drift if measured else None,
                         "drift_edit": measured.id if measured else None}

    def _predict_unlocked(
        self, prompt: str, max_new_tokens: int | None = None, replaced: Mapping[str, torch.Tensor] | None = None,
    ) -> Prediction:
        """`replaced`: parameter values to use instead of the model's (functional_call; then the caller
        holds the model alone), e.g. the weights without one edit; such predictions are not cached."""
        tokens = self.config.continuation_tokens if max_new_tokens is None else max_new_tokens
        if not 1 <= tokens <= MAX_NEW_TOKENS:
            raise ConfigError(f"a continuation is 1 to {MAX_NEW_TOKENS} tokens long, not {tokens}")
        key = self._key("predict", prompt, tokens)
        cached = self._cached(key) if replaced is None else None
        if cached is None:
            if replaced is None:
                top = self._next_tokens_unlocked(prompt)
            else:
                scored = score_prompts(_FunctionalModel(self.model, dict(replaced)), self.tokenizer,
                                       [("probe", prompt, None)])
                top = top_tokens(self.tokenizer, scored[0][0], 5)
            prediction = Prediction(prompt, top, self._continue(prompt, tokens, replaced))
            cached = prediction if replaced is not None else self._store(key, prediction)
        return cached

    def _next_tokens_unlocked(self, prompt: str) -> list[dict[str, Any]]:
        key = self._key("next", prompt)
        cached = self._cached(key)
        if cached is None:
            scored = score_prompts(self.model, self.tokenizer, [("probe", prompt, None)])
            cached = self._store(key, top_tokens(self.tokenizer, scored[0][0], 5))
        return cached

    def _probe_logprobs_unlocked(self) -> tuple[tuple[str, ...], list[torch.Tensor]]:
        """(probes, their next-token log-distributions) on the current weights (cached per version)."""
        probes = tuple(self.probes)
        key = self._key("probe_logprobs", probes)
        cached = self._cached(key)
        if cached is None:
            scored = score_prompts(self.model, self.tokenizer, prompt_items((), probes)) if probes else []
            cached = self._store(key, (probes, [logprobs for logprobs, _ in scored]))
        return cached

    def _score_probes_unlocked(self) -> list[dict[str, Any]]:
        probes, logprobs = self._probe_logprobs_unlocked()
        return [{"prompt": p, "top": top_tokens(self.tokenizer, lp, 5)} for p, lp in zip(probes, logprobs, strict=True)]

    def _continue(self, prompt: str, tokens: int, replaced: Mapping[str, torch.Tensor] | None = None) -> str:
        encoded = self.tokenizer(prompt, return_tensors="pt").to(next(self.model.parameters()).device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        kwargs = {**encoded, "do_sample": False, "max_new_tokens": tokens, "pad_token_id": pad}
        with torch.no_grad():
            if replaced is None:
                out = self.model.generate(**kwargs)
            else:
                values = {f"model.{name}": value for name, value in replaced.items()}
                out = functional_call(_Generating(self.model), values, args=(), kwargs=kwargs, strict=False)
        return self.tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)

    def _key(self, kind: str, *parts: Any) -> tuple:
        """A cache key for the current weights (`_store` drops the keys of older ones)."""
        return (kind, self.version, *parts)

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
        return self._sidecar("probes", self.config.journal_path)

    def _sidecar(self, what: str, journal: Path | None = None) -> Path:
        """`<journal>.<what>.json`, beside the journal."""
        journal = journal or self.journal_path
        return journal.with_name(f"{journal.name}.{what}.json")

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


@contextmanager
def _available(method: str) -> Iterator[None]:
    """Building `method` failed for a reason that is not the caller's input (e.g. its module or checkpoint
    is missing): say so as a ConfigError."""
    try:
        yield
    except FacteditError:
        raise
    except Exception as exc:
        raise ConfigError(f"method {method!r} is not available: {type(exc).__name__}: {exc}") from exc


def _exported_record(data: bytes) -> dict[str, Any]:
    """The record an exported edit file carries in its metadata ({} when it carries none)."""
    try:
        meta = delta_metadata(data)
        return json.loads(meta["record"]) if meta.get("format") == EXPORT_FORMAT else {}
    except (FacteditError, KeyError, ValueError):
        return {}  # Editor.import_edit says what is wrong with the file
