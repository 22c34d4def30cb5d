"""A readers–writer lock that prefers writers.

Generations and other reads of the weights hold it shared; an edit, revert or import holds it alone.
A writer that arrives waits for the running readers to finish and holds new readers back, so a
stream of generations cannot starve an edit and no reader ever sees half-applied weights.

The lock is not reentrant: a thread holding it must not take it again (the session takes it once,
at its public entry points).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class LockTimeout(TimeoutError):
    """The lock could not be taken within the given time."""


class ReadWriteLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # threads holding it shared
        self._writer = False  # a thread holds it alone
        self._waiting_writers = 0

    @property
    def waiting_writers(self) -> int:
        """Writers queued behind the current holders (a load figure, read without the lock)."""
        return self._waiting_writers

    @property
    def readers(self) -> int:
        return self._readers

    @property
    def writing(self) -> bool:
        """Whether a writer holds the lock now (read without the lock)."""
        return self._writer

    @contextmanager
    def read(self, timeout: float | None = None) -> Iterator[None]:
        with self._cond:
            if not self._cond.wait_for(lambda: not self._writer and not self._waiting_writers, timeout):
                raise LockTimeout(f"the weights stayed locked by an edit for {timeout} s")
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self, timeout: float | None = None) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            try:
                if not self._cond.wait_for(lambda: not self._writer and not self._readers, timeout):
                    raise LockTimeout(f"running reads held the weights for {timeout} s")
            finally:
                self._waiting_writers -= 1
                self._cond.notify_all()  # readers held back by this writer may go on if it gave up
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
