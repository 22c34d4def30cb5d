"""`WeightsAccess`: who may touch the served weights, and when.

Generations, predictions and other reads hold the weights shared (`reading`) and run together; an edit,
revert or import holds them alone (`writing`): it waits for the running reads and holds new ones back,
so no read ever sees half-applied weights (rwlock.py prefers writers). Previews, diffs and effects swap
weights in through `functional_call` (a LoRA preview injects modules): they run on a fresh read view of
the model (model/views.py) while holding the weights shared (`viewing`), so generations go on
meanwhile; they run one at a time, since they toggle `requires_grad` on the shared parameters. Writes
past `max_pending_writes` waiting, and views past `max_pending_views`, are refused with
`SessionBusyError` (the service answers 503).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..core.errors import FacteditError
from ..model.views import read_view
from .rwlock import LockTimeout, ReadWriteLock


class SessionBusyError(FacteditError):
    """Too many edits are already waiting for the weights; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WeightsAccess:
    """Args:
    max_pending_writes: edits, reverts and imports allowed to wait for the weights at once.
    max_pending_views: previews, diffs and effects allowed to wait for their turn at once.
    lock_timeout: seconds a write or a view waits before `SessionBusyError` (None: no limit).
    """

    def __init__(self, max_pending_writes: int = 8, max_pending_views: int = 8, lock_timeout: float | None = None):
        self.rw = ReadWriteLock()
        self.max_pending_writes = max_pending_writes
        self.max_pending_views = max_pending_views
        self.lock_timeout = lock_timeout
        self._view_slot = threading.Lock()  # one read view computes at a time
        self._views_lock = threading.Lock()  # guards the count of those waiting for it
        self._views_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the weights shared (a generation batch, a prediction)."""
        with self.rw.read():
            yield

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the weights alone (an edit, a revert, an import)."""
        if self.rw.waiting_writers >= self.max_pending_writes:
            raise SessionBusyError(f"{self.rw.waiting_writers} edits are already waiting; try again shortly")
        try:
            with self.rw.write(self.lock_timeout):
                yield
        except LockTimeout as exc:
            raise SessionBusyError(str(exc)) from exc

    @contextmanager
    def viewing(self, model: nn.Module) -> Iterator[nn.Module]:
        """A fresh read view of `model` with the weights held shared, one view at a time (module docstring)."""
        with self._views_lock:
            if self._views_waiting >= self.max_pending_views:
                raise SessionBusyError(f"{self._views_waiting} previews or diffs are already waiting; try again")
            self._views_waiting += 1
        try:
            if not self._view_slot.acquire(timeout=-1 if self.lock_timeout is None else self.lock_timeout):
                raise SessionBusyError(f"other previews or diffs held the model for {self.lock_timeout} s")
        finally:
            with self._views_lock:
                self._views_waiting -= 1
        try:
            with self.rw.read(self.lock_timeout):
                yield read_view(model)
        except LockTimeout as exc:
            raise SessionBusyError(str(exc)) from exc
        finally:
            self._view_slot.release()
