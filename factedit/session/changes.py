"""`ChangeLog`: what the session tells about its changes without waiting for the weights (health, the
app's views): the last change, the guard's last refusal, edit counts with the newest measured drift, and
the predictions around the newest edits."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..core.errors import DriftError
from ..core.record import EditRecord
from .reads import Prediction

MAX_OUTCOMES = 32  # EditOutcomes kept (by edit id) for views that show an edit's before/after


@dataclass(frozen=True)
class EditOutcome:
    """An edit and its prompt's predictions (top-5 and greedy continuation) just before and just after it;
    both None when the edit was asked for without them (`edit(..., predict=False)`: the record's
    `pre`/`post` still hold the top-5, and generating costs a second or more on a CPU)."""

    record: EditRecord
    before: Prediction | None
    after: Prediction | None


class ChangeLog:
    """Written with the weights held alone, read without the lock: readers see the last finished change."""

    def __init__(self) -> None:
        self.last_change: dict[str, Any] | None = None  # {"kind", "edit_ids", "version", "at"}
        self.last_refusal: dict[str, Any] | None = None  # the guard's last refusal, until an edit succeeds
        self.summary: dict[str, Any] = {}  # {"edits", "active_edits", "drift", "drift_edit", "stored_deltas"}
        self._outcomes: dict[str, EditOutcome] = {}  # edit id -> predictions around it (the newest few)

    def changed(self, kind: str, ids: list[str], version: int, history: Sequence[EditRecord]) -> None:
        """A change ("edit", "revert" or "import") of `ids` made the weights `version`; `history` after it."""
        self.last_change = {"kind": kind, "edit_ids": ids, "version": version, "at": time.time()}
        if kind != "revert":
            self.last_refusal = None
        self.summarize(history)

    def summarize(self, history: Sequence[EditRecord]) -> None:
        """Refresh the edit counts and the newest drift the guard measured from `history`."""
        active = [r for r in history if r.status == "active"]
        measured = next((r for r in reversed(active) if r.drift), None)
        self.summary = {"edits": len(history), "active_edits": len(active),
                        "drift": measured.drift if measured else None,
                        "drift_edit": measured.id if measured else None,
                        "stored_deltas": sum(r.compacted_at is None for r in history)}

    @contextmanager
    def refusals(self, what: str) -> Iterator[None]:
        """Keep the guard's refusal of `what` (the app's header shows it), then re-raise it."""
        try:
            yield
        except DriftError as exc:
            self.last_refusal = {"what": what, "ratio": exc.ratio, "max_ratio": exc.max_ratio,
                                 "message": str(exc), "at": time.time()}
            raise

    def keep(self, outcome: EditOutcome) -> EditOutcome:
        """Keep `outcome` by its edit id (the newest `MAX_OUTCOMES`) and return it."""
        self._outcomes[outcome.record.id] = outcome
        while len(self._outcomes) > MAX_OUTCOMES:
            del self._outcomes[next(iter(self._outcomes))]
        return outcome

    def outcome(self, edit_id: str) -> EditOutcome | None:
        return self._outcomes.get(edit_id)

    def forget_outcomes(self) -> None:
        self._outcomes.clear()
