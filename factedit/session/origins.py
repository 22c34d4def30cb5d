"""Where an edit came from when its record alone does not say: an imported file, or a preview applied
as computed. Kept beside the journal as JSON (`<journal>.origins.json`), by edit id.

An imported edit's record times the import; its origin keeps the original edit's id, time and timings
(those of the edit it was exported from, followed back through earlier imports known here). An applied
preview's record has no compute time of its own; its origin keeps the preview's.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.atomic import write_text

logger = logging.getLogger(__name__)

IMPORT, PREVIEW = "import", "preview"


class Origins:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._origins: dict[str, dict[str, Any]] = {}
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                self._origins = {k: v for k, v in loaded.items() if isinstance(v, dict)}
        except (OSError, ValueError):
            pass

    def get(self, edit_id: str) -> dict[str, Any] | None:
        return self._origins.get(edit_id)

    def all(self) -> dict[str, dict[str, Any]]:
        return dict(self._origins)

    def imported(self, edit_id: str, exported: Mapping[str, Any], file: str | None, at: float) -> dict[str, Any]:
        """Record that `edit_id` is the import of the exported record `exported` (`ExportedEdit.record`)."""
        source = self._origins.get(exported.get("id", ""))
        first = source if source is not None and source.get("kind") == IMPORT else None
        origin = {
            "kind": IMPORT, "file": file, "imported_at": at,
            "source_id": first["source_id"] if first else exported.get("id"),
            "source_created_at": first["source_created_at"] if first else exported.get("created_at"),
            "timings": first["timings"] if first else dict(exported.get("timings") or {}),
        }
        self.add(edit_id, origin)
        return origin

    def add(self, edit_id: str, origin: dict[str, Any]) -> None:
        with self._lock:
            self._origins[edit_id] = origin
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_text(self.path, json.dumps(self._origins, indent=1))
            except OSError as exc:  # only persistence is lost
                logger.warning("could not save edit origins to %s: %s", self.path, exc)
