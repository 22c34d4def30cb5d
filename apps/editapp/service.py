"""The app's shared state: one model, one journal, one Editor, behind one lock. No Streamlit here.

Every browser tab of one server process shares one `EditService` (cached by `st.cache_resource`), so
all tabs see the same model and history, and edits are serialised by `lock`.

Methods: the journal holds edits of any method (replay only adds the stored deltas); when an edit
asks for another method, the one Editor switches with `Editor.set_method`, keeping weights, history
and journal.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import factedit
from factedit.editing.journal import Journal
from factedit.editing.scoring import score_requests

from .config import AppConfig

logger = logging.getLogger(__name__)

MAX_PROBES = 20
MAX_CACHED = 64  # predictions kept for the current weights


@dataclass(frozen=True)
class Prediction:
    """What the model does with one prompt now: top-5 next tokens and a greedy continuation."""

    prompt: str
    top: list[dict[str, Any]]  # [{"token", "id", "prob"}] x 5
    continuation: str


@dataclass(frozen=True)
class EditOutcome:
    record: factedit.EditRecord
    before: Prediction
    after: Prediction


class EditService:
    """Model, tokenizer, journal and current Editor of the app (see the module docstring)."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.lock = threading.RLock()
        self.version = 0  # bumped by every change of the weights; keys the prediction cache
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)  # the app's own process: a process setting
        self.model, self.tokenizer = factedit.load_model(config.model_source)
        self.methods = factedit.available_methods()
        self.journal_path = config.journal_path
        self.journal_error: str | None = None  # why the journal cannot be used (then nothing can be edited)
        self.editor: factedit.Editor | None = None
        self._journal: Journal | None = None
        self._cache: dict[tuple, Any] = {}
        self._probes_before: tuple[int, list[dict[str, Any]]] | None = None  # (version, scores)
        self.probes = self._load_probes()
        self._open(self.journal_path)

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
                editor = factedit.Editor(method, tokenizer=self.tokenizer, journal=self._journal,
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
            self.editor = editor
            return
        self.journal_error = "no edit method could be built: " + "; ".join(errors)

    def _method_order(self) -> list[str]:
        first = self.config.default_method
        return [first] + [m for m in self.methods if m != first]

    def _reload_model(self) -> None:
        self.model, _ = factedit.load_model(self.config.model_source)
        self.version += 1

    def start_new_journal(self) -> Path:
        """Use a fresh journal file beside the current one (the old file is left as it is)."""
        with self.lock:
            if self._journal is not None:
                self._journal.close()
            self._journal, self.editor, self.journal_error = None, None, None
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = self.journal_path.with_name(f"{self.journal_path.stem}-{stamp}{self.journal_path.suffix}")
            self._reload_model()
            self.journal_path = path
            self._open(path)
            return path

    def _editor_for(self, method: str) -> factedit.Editor:
        """The Editor for `method`, switching (see the module docstring) if the current one differs."""
        if method == self._require_editor().method:
            return self.editor
        if method not in self.methods:
            raise factedit.ConfigError(f"unknown method {method!r}; registered: {', '.join(self.methods)}")
        editor = self._require_editor()
        try:
            editor.set_method(method, **self.config.overrides_for(method))
        except factedit.FacteditError:
            raise
        except Exception as exc:  # e.g. the method's module or checkpoint is missing
            raise factedit.ConfigError(f"method {method!r} is not available: {type(exc).__name__}: {exc}") from exc
        return editor

    def close(self) -> None:
        with self.lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            self.editor = None

    # --- changes ------------------------------------------------------------------------------------
    def edit(
        self, method: str, prompt: str, target: str,
        paraphrases: Sequence[str] = (), locality: Sequence[str] = (),
    ) -> EditOutcome:
        """Apply one edit with `method`; returns the record and the prompt's predictions around it."""
        with self.lock:
            factedit.EditRequest(prompt, target, paraphrases=tuple(paraphrases), locality=tuple(locality))
            editor = self._editor_for(method)
            before, probes = self.predict(prompt), self.score_probes()
            record = editor.edit(self.model, prompt, target, paraphrases=paraphrases, locality=locality)
            self._changed(probes)
            return EditOutcome(record, before, self.predict(prompt))

    def revert(self, edit_id: str) -> factedit.EditRecord:
        with self.lock:
            editor, probes = self._require_editor(), self.score_probes()
            record = editor.revert(self.model, edit_id)
            self._changed(probes)
            return record

    def revert_all(self) -> list[factedit.EditRecord]:
        with self.lock:
            editor, probes = self._require_editor(), self.score_probes()
            records = editor.revert_all(self.model)
            self._changed(probes)
            return records

    def import_edit(self, data: bytes) -> factedit.EditRecord:
        """Apply an exported edit file's bytes as a new edit (checked against this model)."""
        with self.lock:
            editor, probes = self._require_editor(), self.score_probes()
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "upload.safetensors"
                path.write_bytes(data)
                try:
                    record = editor.import_edit(self.model, path)
                except factedit.FacteditError:
                    raise
                except Exception as exc:  # unreadable bytes: not a safetensors file at all
                    raise factedit.InvalidDeltaError(f"not an exported factedit edit: {exc}") from exc
            self._changed(probes)
            return record

    def _require_editor(self) -> factedit.Editor:
        if self.editor is None:
            raise factedit.JournalError(self.journal_error or "the journal is not open")
        return self.editor

    # --- reading ------------------------------------------------------------------------------------
    def history(self) -> list[factedit.EditRecord]:
        with self.lock:
            return self.editor.history if self.editor is not None else []

    def export_edit(self, edit_id: str) -> bytes:
        with self.lock:
            editor = self._require_editor()
            with tempfile.TemporaryDirectory() as tmp:
                return editor.export_edit(edit_id, Path(tmp) / "edit.safetensors").read_bytes()

    def diff(self, edit_id: str) -> dict[str, Any]:
        """`EditDiff.to_dict()` of one edit, with the probes scored with and without it."""
        with self.lock:
            key = ("diff", self.version, edit_id, tuple(self.probes))
            if key not in self._cache:
                editor = self._require_editor()
                self._trim_cache()
                self._cache[key] = editor.diff(edit_id, model=self.model, probes=self.probes).to_dict()
            return self._cache[key]

    def predict(self, prompt: str) -> Prediction:
        """Top-5 next tokens and a greedy continuation of `prompt` on the current weights (cached)."""
        with self.lock:
            key = ("predict", self.version, prompt)
            if key not in self._cache:
                self._trim_cache()
                top = score_requests(self.model, self.tokenizer, [], probes=[prompt])["probes"][0]["top"]
                self._cache[key] = Prediction(prompt, top, self._continue(prompt))
            return self._cache[key]

    def score_probes(self) -> list[dict[str, Any]]:
        """[{"prompt", "top"}] for every probe on the current weights (cached per version)."""
        with self.lock:
            key = ("probes", self.version, tuple(self.probes))
            if key not in self._cache:
                self._trim_cache()
                scored = score_requests(self.model, self.tokenizer, [], probes=self.probes) if self.probes else {}
                self._cache[key] = scored.get("probes", [])
            return self._cache[key]

    def probes_before_last_change(self) -> dict[str, dict[str, Any]]:
        """Probe scores just before the last edit or revert, by prompt ({} before the first)."""
        with self.lock:
            if self._probes_before is None:
                return {}
            return {row["prompt"]: row for row in self._probes_before[1]}

    def _changed(self, probes_before: list[dict[str, Any]]) -> None:
        """After a successful change: new cache version; remember the probes as they were before it."""
        self._probes_before = (self.version, probes_before)
        self.version += 1

    def _continue(self, prompt: str) -> str:
        encoded = self.tokenizer(prompt, return_tensors="pt")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                **encoded, do_sample=False, max_new_tokens=self.config.continuation_tokens, pad_token_id=pad,
            )
        return self.tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)

    def _trim_cache(self) -> None:
        """Drop entries of older weights; keep the cache small (a person types a few prompts)."""
        stale = [k for k in self._cache if k[1] != self.version]
        for k in stale:
            del self._cache[k]
        if len(self._cache) > MAX_CACHED:
            self._cache.clear()

    # --- probes (kept beside the journal, shared by all tabs) ----------------------------------------
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
            raise factedit.ConfigError(f"at most {MAX_PROBES} probes; remove some first")
        with self.lock:
            self.probes = cleaned
            try:
                self._probes_file.parent.mkdir(parents=True, exist_ok=True)
                self._probes_file.write_text(json.dumps(cleaned, indent=1))
            except OSError as exc:  # only persistence is lost
                logger.warning("could not save the probe list to %s: %s", self._probes_file, exc)
