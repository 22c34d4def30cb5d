"""JSON-lines files of an evaluation run (cases.jsonl, checkpoints.jsonl), written so a run can resume.

Each line is flushed and fsynced when written, so an interrupted run loses at most the line being
written; `read_lines` ignores a half-written (unparsable) last line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..core.atomic import write_text

logger = logging.getLogger(__name__)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every whole JSON line of `path` ([] when it does not exist). An unparsable last line (an
    interrupted write) is dropped; an unparsable line elsewhere is an error."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("ignoring the half-written last line of %s", path)
                break
            raise ValueError(
                f"{path}: line {number} is not JSON; the file is damaged (delete it to start over)"
            ) from None
    return rows


class JsonLines:
    """An append-only JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self) -> list[dict[str, Any]]:
        return read_lines(self.path)

    def rewrite(self, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Keep the whole lines that `keep` accepts (atomically); returns them."""
        return self.replace([row for row in self.rows() if keep(row)])

    def replace(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Make `rows` the file's content (atomically: a temporary file renamed into place)."""
        write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))
        return rows

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
            handle.flush()
            os.fsync(handle.fileno())
