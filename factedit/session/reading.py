"""The reading side of `EditSession` (core.py): history and records, diffs and effects, predictions and
side-by-side tries, probes, drift, the weights' hash and health. A part of `EditSession`, split off by
job; reads hold the weights shared (or work on a read view), and their results are cached per weights
version (cache.py)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.record import EditRecord
from ..model.weights import model_sha256
from .changes import EditOutcome
from .probes import top_rows
from .reads import Prediction, continuation, next_token_logprobs, top_next_tokens

__all__ = ["MAX_NEW_TOKENS", "SessionReading"]

MAX_NEW_TOKENS = 64  # longest continuation `predict` and `try_prompt` generate


class SessionReading:
    """Reads of `EditSession` (which sets up the state used here: model, tokenizer, editor, caches)."""

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

    def health(self) -> dict[str, Any]:
        """Model, method, journal and edit counts, and the drift the guard measured last. Never waits for
        the lock: it answers during an edit too (the figures are those of the last finished change)."""
        return {
            "status": "ok" if self.editor is not None else "read_only",
            "model": self.model_id,
            "method": self._switch.method,
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
