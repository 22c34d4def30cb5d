"""`VersionedCache`: values computed from the weights, kept only while the weights stay as they were."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

from cachetools import LRUCache

MAX_CACHED = 64  # values kept for the current weights


class VersionedCache:
    """Values keyed by (kind, weights version, *parts). A change of the weights bumps the version, so older
    values are never found again; storing drops them, and past `max_entries` the least recently used.
    Thread-safe: readers holding the weights shared fill it together.

    Args:
        version: the current weights version (read for every key and store).
        max_entries: values kept before the cache starts over.
    """

    def __init__(self, version: Callable[[], int], max_entries: int = MAX_CACHED) -> None:
        self._version = version
        self._entries: LRUCache[tuple, Any] = LRUCache(maxsize=max_entries)
        self._lock = threading.Lock()

    def key(self, kind: str, *parts: Hashable) -> tuple:
        """A key for the current weights."""
        return (kind, self._version(), *parts)

    def get(self, key: tuple) -> Any:
        """The value stored under `key`, or None."""
        with self._lock:
            return self._entries.get(key)

    def fetch(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """The value under `key`, computed (outside the cache's lock) and stored when missing."""
        value = self.get(key)
        return value if value is not None else self.store(key, compute())

    def store(self, key: tuple, value: Any) -> Any:
        """Keep `value` under `key` and return it."""
        with self._lock:
            version = self._version()
            for stale in [k for k in self._entries if k[1] != version]:
                del self._entries[stale]
            self._entries[key] = value
        return value
