"""`EditSession`: one model, its journal and one Editor, shared by the Streamlit app and the HTTP service.

Concurrency (access.py): reads hold the weights shared, edits, reverts and imports alone; previews,
diffs, effects and `try_prompt` run on a read view of the model, held shared, so generations go on.

Every change of the weights goes through `_changing`, which brings the session's bookkeeping (version,
caches, the change log behind `health`) up to what the Editor holds, whether the change finished or
failed after it reached the weights.

The public methods take the lock once; the `_unlocked` helpers below them assume it is held (the lock
is not reentrant).

Methods: one Editor serves edits of every method, switched in place when an edit asks for another
(`switch.py`).
"""
# long: the session's public API over one lock; its jobs live elsewhere (access.py, changes.py, probes.py,
# reads.py, switch.py, origins.py, drift_meter.py) and what is left here is glue and docs.

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifacts.exported import read_exported
from ..core.errors import ConfigError, FacteditError, InvalidDeltaError, JournalError
from ..core.methods import available_methods
from ..core.record import EditRecord
from ..core.request import EditRequest
from ..editing.editor import Editor
from ..editing.journal import Journal
from ..editing.preview import EditPreview
from ..model.loading import load_model, model_id
from ..model.weights import model_sha256
from .access import WeightsAccess
from .cache import VersionedCache
from .changes import ChangeLog, EditOutcome
from .config import SessionConfig
from .drift_meter import DriftMeter
from .generation import BatchGenerator
from .limits import RequestLimits
from .origins import PREVIEW, Origins
from .probes import ProbeList, top_rows
from .reads import Prediction, continuation, next_token_logprobs, top_next_tokens
from .switch import MethodSwitch, available

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 64  # longest continuation `predict` and `try_prompt` generate


class EditSession:
    """Model, tokenizer, journal and current Editor (see the module docstring).

    Args:
        config: which model and journal, the default method and its settings, the guard.
        max_pending_writes: edits, reverts and imports allowed to wait for the weights at once.
        lock_timeout: seconds a write waits for the weights before `SessionBusyError` (None: no limit).
        max_pending_views: previews, diffs and effects allowed to wait for their turn at once.
        request_limits: how much one edit may ask (facts, paraphrases, text length; limits.py).
    """

    def __init__(self, config: SessionConfig, *, max_pending_writes: int = 8, lock_timeout: float | None = None,
                 max_pending_views: int = 8, request_limits: RequestLimits | None = None):
        self.config = config
        self.access = WeightsAccess(max_pending_writes, max_pending_views, lock_timeout)  # access.py
        self.rw = self.access.rw
        self.request_limits = request_limits or RequestLimits()  # checked for every edit, preview and import
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
        self._switch = MethodSwitch(config, self.methods, self.model)
        self._cache = VersionedCache(lambda: self.version)
        self._log = ChangeLog()
        self._generator: BatchGenerator | None = None
        self._generator_options: dict[str, Any] = {}
        self._generator_lock = threading.Lock()
        # Beside the first journal: the probes outlive `start_new_journal`.
        # Read now, before the journal's edits are replayed: the base model's reference perplexity.
        self.drift_meter = DriftMeter(self.model, self.tokenizer)
        self._probes = ProbeList(_sidecar(config.journal_path, "probes"), config.probes)
        self.origins = Origins(_sidecar(self.journal_path, "origins"))
        self._open(self.journal_path)
        self._log.summarize(self._history_unlocked())

    # --- locking (access.py) --------------------------------------------------------------------------
    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the weights shared (for reads outside this class, e.g. a generation batch)."""
        with self.access.reading():
            yield

    def _writing(self):
        return self.access.writing()

    def _read_view(self):
        return self.access.viewing(self.model)

    @contextmanager
    def _changing(self, kind: str) -> Iterator[Editor]:
        """Around a change of the weights (the write lock held): the Editor to change them with; after it,
        whether it finished or failed past the point where the Editor took it, the session's version,
        caches and change log follow what the Editor now holds."""
        editor = self._require_editor()
        probes = self._probe_logprobs_unlocked()
        before = _statuses(editor)
        try:
            yield editor
        finally:
            after = _statuses(editor)
            if after != before:
                self._changed(probes, kind, [edit_id for edit_id, status in after.items()
                                             if before.get(edit_id) != status])

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
        try:
            method, editor = self._switch.first_editor(self._journal, self.tokenizer)
        except ConfigError as exc:
            self.journal_error = str(exc)
            return
        try:
            editor.attach(self.model)
        except Exception as exc:
            self.journal_error = f"{type(exc).__name__}: {exc}"
            self._reload_model()  # a failed replay may have touched the weights
            self._journal.close()
            self._journal = None
            return
        self.editor = editor
        self._switch.built(method)
        if self.config.warm_guard:
            try:
                editor.warm_guard(self.model, self._switch.edited_params(self.model))
            except Exception as exc:  # only speed is lost: the first edits prepare the guard themselves
                logger.warning("could not prepare the drift guard: %s", exc)

    def _reload_model(self) -> None:
        """A fresh copy of the base model (the caller restarts a running generator: it holds the old one)."""
        self.model, _ = load_model(self.config.model_source)
        self.version += 1

    def start_new_journal(self) -> Path:
        """Use a fresh journal file beside the current one (the old file is left as it is)."""
        # The generator is stopped before the weights are held alone: its worker may be waiting for them,
        # and joining it under the lock would stall until the join gives up.
        running = self._generator is not None
        self.stop_generator()
        try:
            with self._writing():
                if self._journal is not None:
                    self._journal.close()
                if self.editor is not None:
                    self.editor.close()
                self._journal, self.editor, self.journal_error = None, None, None
                stamp = time.strftime("%Y%m%d-%H%M%S")
                path = self.journal_path.with_name(f"{self.journal_path.stem}-{stamp}{self.journal_path.suffix}")
                self._reload_model()
                self.journal_path = path
                self.origins = Origins(_sidecar(path, "origins"))
                self._log.forget_outcomes()
                self._open(path)
                self._log.summarize(self._history_unlocked())
                return path
        finally:
            if running:
                self.start_generator(**self._generator_options)

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
        self.request_limits.check([request])
        with self._writing():
            editor = self._switch.switch(self._require_editor(), method, overrides)
            before = self._predict_unlocked(prompt) if predict else None
            with self._changing("edit"), self._reporting(editor, progress), \
                    self._log.refusals(f"the {editor.method} edit of {prompt!r}"):
                record = editor.edit_batch(self.model, [request])
            return self._outcome(record, before, predict)

    def preview(
        self, method: str | None, prompt: str, target: str,
        paraphrases: Sequence[str] = (), locality: Sequence[str] = (), *,
        overrides: Mapping[str, Any] | None = None, probes: Sequence[str] | None = None,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> EditPreview:
        """What an edit with `method` would do on the current weights, computed and scored on the prompt,
        paraphrases, locality prompts and `probes` (default: the session's) without applying anything
        (`Editor.preview`), on a read view of the model (see `_read_view`)."""
        request = EditRequest(prompt, target, paraphrases=tuple(paraphrases), locality=tuple(locality))
        self.request_limits.check([request])
        method = self._switch.known(method)
        settings = self._switch.settings(method, overrides)
        with self._read_view() as view:
            editor = self._require_editor()
            with self._reporting(editor, progress), available(method):
                return editor.preview(view, [request], probes=list(self.probes if probes is None else probes),
                                      method=method, **settings)

    def apply_preview(self, preview: EditPreview, predict: bool = True) -> EditOutcome:
        """Apply a preview's delta as it was computed (refused once the weights changed since); `predict`
        as for `edit`."""
        prompt = preview.requests[0].prompt
        with self._writing():
            before = self._predict_unlocked(prompt) if predict else None
            with self._changing("edit") as editor, self._log.refusals(f"the {preview.method} edit of {prompt!r}"):
                record = editor.apply_preview(self.model, preview)
                self.origins.add(record.id, {"kind": PREVIEW, "timings": dict(preview.timings)})
            return self._outcome(record, before, predict)

    def edit_requests(
        self, requests: Sequence[EditRequest], method: str | None = None, overrides: Mapping[str, Any] | None = None,
    ) -> EditRecord:
        """Apply one or several facts as one edit (one record), with `method` and config `overrides`."""
        if not requests:
            raise ConfigError("an edit needs at least one fact")
        self.request_limits.check(requests)
        with self._writing():
            editor = self._switch.switch(self._require_editor(), method, overrides)
            with self._changing("edit"), self._log.refusals(f"the {editor.method} edit of {len(requests)} fact(s)"):
                return editor.edit_batch(self.model, list(requests))

    def revert(self, edit_id: str) -> EditRecord:
        with self._writing(), self._changing("revert") as editor:
            return editor.revert(self.model, edit_id)

    def revert_all(self) -> list[EditRecord]:
        with self._writing(), self._changing("revert") as editor:
            return editor.revert_all(self.model)

    def import_edit(self, data: bytes, name: str | None = None) -> EditRecord:
        """Apply an exported edit file's bytes as a new edit (checked against this model). Its origin
        (`origin(id)`) keeps the original edit's id, time and timings; `name`: the file's name."""
        try:
            exported = read_exported(data)  # the whole file checked before the weights are touched
        except FacteditError:
            raise
        except Exception as exc:  # unreadable bytes: not a safetensors file at all
            raise InvalidDeltaError(f"not an exported factedit edit: {exc}") from exc
        self.request_limits.check(exported.requests)
        with self._writing(), self._changing("import") as editor, tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "upload.safetensors"
            path.write_bytes(data)
            with self._log.refusals(f"the import of {name or 'an edit file'}"):
                record = editor.import_edit(self.model, path)
            self.origins.imported(record.id, exported.record, name, time.time())
            return record

    def _changed(self, probes_before: tuple[tuple[str, ...], list[torch.Tensor]], kind: str, ids: list[str]) -> None:
        """After a successful change: new cache version; remember the probes as they were before it and
        what the change was."""
        self._probes.before = probes_before
        self.version += 1
        self._log.changed(kind, ids, self.version, self._history_unlocked())

    def _outcome(self, record: EditRecord, before: Prediction | None, predict: bool) -> EditOutcome:
        after = self._predict_unlocked(record.request.prompt) if predict else None
        return self._log.keep(EditOutcome(record, before, after))

    # --- reading ------------------------------------------------------------------------------------
    def history(self) -> list[EditRecord]:
        """Every edit, oldest first (records without their deltas' tensors)."""
        with self.rw.read():
            return self._history_unlocked()

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
        without it (through functional_call, on a read view: generations go on meanwhile)."""
        probes = tuple(self.probes if probes is None else probes)
        cached = self._cache.get(self._cache.key("diff", edit_id, probes))
        if cached is not None:
            return cached
        with self._read_view() as view:  # the weights may have changed while waiting: the key is taken again
            diff = self._require_editor().diff(edit_id, model=view, probes=probes).to_dict()
            return self._cache.store(self._cache.key("diff", edit_id, probes), diff)

    def effect(self, edit_id: str, probes: Sequence[str] | None = None) -> dict[str, Any]:
        """What one edit does on the current weights (`Editor.effect`): its prompts, paraphrases,
        locality prompts and `probes` (default: the session's) without/with it when it is active, as
        they are now/with it re-applied when it is reverted; with its parameter changes. Cached."""
        probes = tuple(self.probes if probes is None else probes)
        cached = self._cache.get(self._cache.key("effect", edit_id, probes))
        if cached is not None:
            return cached
        with self._read_view() as view:
            effect = self._require_editor().effect(edit_id, view, probes)
            return self._cache.store(self._cache.key("effect", edit_id, probes), effect)

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
        cached = self._cache.get(self._cache.key("try", prompt, edit_id, max_new_tokens))
        if cached is not None:
            return cached
        with self._read_view() as view:
            active, replaced = self._require_editor().toggled_weights(edit_id, view)
            now = self._predict_unlocked(prompt, max_new_tokens)
            other = self._predict_unlocked(prompt, max_new_tokens, replaced, view)
            result = {"edit_id": edit_id, "active": active, "without": other if active else now,
                      "with": now if active else other}
            return self._cache.store(self._cache.key("try", prompt, edit_id, max_new_tokens), result)

    def toggled_prediction(
        self, prompt: str, edit_id: str, max_new_tokens: int | None = None,
    ) -> tuple[bool, Prediction]:
        """(active, prediction): `prompt` with `edit_id` toggled only (without an active edit, a reverted one
        re-applied), the other side of `try_prompt` when the current weights' side comes from elsewhere
        (the app streams it from the generator). Not cached."""
        if not prompt.strip():
            raise ConfigError("the prompt is empty")
        with self._read_view() as view:
            active, replaced = self._require_editor().toggled_weights(edit_id, view)
            return active, self._predict_unlocked(prompt, max_new_tokens, replaced, view)

    def measure_drift(self) -> float:
        """The drift of the current weights, measured now (`drift_meter`; cached per weights version)."""
        with self.rw.read():
            return self._cache.fetch(self._cache.key("drift"), lambda: self.drift_meter.ratio(self.model))

    def outcome(self, edit_id: str) -> EditOutcome | None:
        """The predictions around one of the newest edits made through `edit` or `apply_preview` here."""
        return self._log.outcome(edit_id)

    def origin(self, edit_id: str) -> dict[str, Any] | None:
        """Where an edit came from when not from an edit call (origins.py): import or applied preview."""
        return self.origins.get(edit_id)

    @property
    def last_change(self) -> dict[str, Any] | None:
        """{"kind": "edit"/"revert"/"import", "edit_ids", "version", "at"} of the last change (None before)."""
        return self._log.last_change

    @property
    def probes(self) -> list[str]:
        """The probe prompts, shared by every user of the session (kept beside the first journal)."""
        return self._probes.prompts

    def set_probes(self, probes: Sequence[str]) -> None:
        """Use and save `probes` (stripped, each once; ConfigError past `probes.MAX_PROBES`)."""
        self._probes.set(probes)

    def score_probes(self) -> list[dict[str, Any]]:
        """[{"prompt", "top"}] for every probe on the current weights (cached per version)."""
        with self.rw.read():
            return top_rows(self.tokenizer, *self._probe_logprobs_unlocked())

    def probes_before_last_change(self) -> dict[str, dict[str, Any]]:
        """Probe scores just before the last edit or revert, by prompt ({} before the first)."""
        return self._probes.before_rows(self.tokenizer)

    def probe_changes(self) -> list[dict[str, Any]]:
        """Every probe now against just before the last change (`preview.compare_prompts` rows: top-5,
        the old answer's probability, the largest change of any token's probability as `shift`, whether
        the top-1 flipped); a probe added since has "before" None."""
        with self.rw.read():
            return self._cache.fetch(self._cache.key("probe_changes", tuple(self.probes)),
                                     lambda: self._probes.changes(self.tokenizer, *self._probe_logprobs_unlocked()))

    def weights_sha256(self) -> str:
        """sha256 over every parameter of the served model (cached per version): two processes serve
        the same weights exactly when these agree."""
        with self.rw.read():
            return self._cache.fetch(self._cache.key("sha256"), lambda: model_sha256(self.model))

    @property
    def default_method(self) -> str:
        """The method of an edit that names none (the config's, else chosen for the model: MethodSwitch)."""
        return self._switch.default

    def health(self) -> dict[str, Any]:
        """Model, method, journal and edit counts, and the drift the guard measured last. Never waits for
        the lock: it answers during an edit too (the figures are those of the last finished change)."""
        return {
            "status": "ok" if self.editor is not None else "read_only",
            "model": self.model_id,
            "method": self._switch.method,
            "default_method": self._switch.default,
            "methods": list(self.methods),
            "journal": {"name": self.journal_path.name, "error": self.journal_error, "bytes": self._journal_bytes(),
                        "deltas": self._log.summary.get("stored_deltas", 0),
                        # False: replaying gave other bits than the journal's writer had (Editor.replay_differs)
                        "replay_exact": not self.editor.replay_differs if self.editor is not None else None},
            **{k: v for k, v in self._log.summary.items() if k != "stored_deltas"},
            "guard_max_ratio": self.config.guard_max_ratio,
            "last_change": self._log.last_change,
            "last_refusal": self._log.last_refusal,
            "weights_version": self.version,
            "writing": self.rw.writing,
            "pending_writes": self.rw.waiting_writers,
        }

    def compact_journal(self, older_than_s: float = 0.0) -> dict[str, Any]:
        """Drop the journal's deltas of edits reverted at least `older_than_s` seconds ago, keeping their
        records (`Journal.compact`): {"dropped", "bytes_before", "bytes_after"}. The weights and the
        replay are untouched, so it holds them shared."""
        with self.rw.read():
            report = self._require_editor().compact_journal(older_than_s)
            self._log.summarize(self._history_unlocked())
            return report

    def _journal_bytes(self) -> int | None:
        try:
            return self.journal_path.stat().st_size
        except OSError:
            return None

    def _history_unlocked(self) -> list[EditRecord]:
        return self.editor.history if self.editor is not None else []

    def _predict_unlocked(
        self, prompt: str, max_new_tokens: int | None = None, replaced: Mapping[str, torch.Tensor] | None = None,
        view: nn.Module | None = None,
    ) -> Prediction:
        """`replaced`: parameter values to use instead of the model's, through functional_call on `view`
        (a read view of the model, `_read_view`), e.g. the weights without one edit; not cached."""
        tokens = self.config.continuation_tokens if max_new_tokens is None else max_new_tokens
        if not 1 <= tokens <= MAX_NEW_TOKENS:
            raise ConfigError(f"a continuation is 1 to {MAX_NEW_TOKENS} tokens long, not {tokens}")
        if replaced is not None:
            if view is None:
                raise ValueError("replaced weights are read through a read view of the model")
            return Prediction(prompt, top_next_tokens(view, self.tokenizer, prompt, replaced),
                              continuation(view, self.tokenizer, prompt, tokens, replaced))
        return self._cache.fetch(self._cache.key("predict", prompt, tokens), lambda: Prediction(
            prompt, self._next_tokens_unlocked(prompt), continuation(self.model, self.tokenizer, prompt, tokens)))

    def _next_tokens_unlocked(self, prompt: str) -> list[dict[str, Any]]:
        return self._cache.fetch(self._cache.key("next", prompt),
                                 lambda: top_next_tokens(self.model, self.tokenizer, prompt))

    def _probe_logprobs_unlocked(self) -> tuple[tuple[str, ...], list[torch.Tensor]]:
        """(probes, their next-token log-distributions) on the current weights (cached per version)."""
        probes = tuple(self.probes)
        return self._cache.fetch(self._cache.key("probe_logprobs", probes),
                                 lambda: (probes, next_token_logprobs(self.model, self.tokenizer, probes)))


def _statuses(editor: Editor) -> dict[str, str]:
    """Each edit's status, by id: what a change of the weights changes."""
    return {record.id: record.status for record in editor.history}


def _sidecar(journal: Path, what: str) -> Path:
    """`<journal>.<what>.json`, beside the journal."""
    return journal.with_name(f"{journal.name}.{what}.json")
