"""An exported edit file (`Editor.export_edit`): safetensors holding the delta, with the record it came
from as JSON metadata. `read_exported` reads and checks all of it before anything uses it, so an import
of a file whose record was altered is refused whole rather than applied and then failing."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..core.delta import Delta, delta_metadata
from ..core.errors import FacteditError, InvalidDeltaError
from ..core.request import EditRequest

EXPORT_FORMAT = "factedit.edit/1"

_TEXT_FIELDS = ("id", "method", "model_id", "model_fingerprint")


@dataclass(frozen=True)
class ExportedEdit:
    """record: the exported record's fields, checked (the text fields are strings, `created_at` a
    number, `timings` numbers by name, `config` an object); requests: its facts."""

    record: Mapping[str, Any]
    requests: tuple[EditRequest, ...]
    delta: Delta

    @property
    def method(self) -> str:
        return self.record["method"]

    @property
    def config(self) -> Mapping[str, Any]:
        return self.record["config"]

    @property
    def model_fingerprint(self) -> str:
        return self.record["model_fingerprint"]


def exported_metadata(data: bytes) -> Mapping[str, Any]:
    """The record of an exported edit file, checked; InvalidDeltaError saying what is wrong."""
    meta = delta_metadata(data)
    if meta.get("format") != EXPORT_FORMAT:
        raise InvalidDeltaError("not an exported factedit edit (its metadata names no factedit.edit format)")
    try:
        record = json.loads(meta["record"])
    except (KeyError, ValueError):
        raise InvalidDeltaError("an exported edit without a readable record") from None
    if not isinstance(record, dict):
        raise InvalidDeltaError("the exported edit's record is not an object")
    for name in _TEXT_FIELDS:
        if not isinstance(record.get(name), str) or not record[name]:
            raise InvalidDeltaError(f"the exported edit's record: {name} must be a non-empty string")
    if not _number(record.get("created_at")):
        raise InvalidDeltaError("the exported edit's record: created_at must be a number")
    timings = record.get("timings", {})
    if not isinstance(timings, dict) or not all(_number(v) for v in timings.values()):
        raise InvalidDeltaError("the exported edit's record: timings must be an object of numbers")
    if not isinstance(record.get("config"), dict):
        raise InvalidDeltaError("the exported edit's record: config must be an object")
    requests = record.get("requests")
    if not isinstance(requests, list) or not requests or not all(isinstance(r, dict) for r in requests):
        raise InvalidDeltaError("the exported edit's record: requests must be a non-empty list of facts")
    return record


def read_exported(data: bytes) -> ExportedEdit:
    """The whole exported edit: record, facts and delta, each checked (the delta against a model is
    checked where it is applied)."""
    record = exported_metadata(data)
    try:
        requests = tuple(EditRequest.from_dict(r) for r in record["requests"])
    except (FacteditError, TypeError) as exc:
        raise InvalidDeltaError(f"the exported edit's record: a fact is malformed: {exc}") from None
    return ExportedEdit(record, requests, Delta.from_bytes(data))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
