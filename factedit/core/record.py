"""EditRecord: everything about one applied edit, serialisable as JSON (the delta travels apart,
as safetensors bytes)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from .delta import Delta
from .request import EditRequest

Status = Literal["active", "reverted"]


def new_edit_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class EditRecord:
    """One edit (one `edit` or `edit_batch` call).

    pre/post: measurements on the requests before and after the edit (see `scoring.score_requests`).
    timings: milliseconds (`compute_ms`, `apply_ms`, `edit_ms` for the whole call).
    model_id/model_fingerprint: the base model the edit was made on (artifacts describe themselves).
    """

    id: str
    method: str
    config: Mapping[str, Any]
    requests: tuple[EditRequest, ...]
    pre: Mapping[str, Any]
    post: Mapping[str, Any]
    timings: Mapping[str, float]
    model_id: str
    model_fingerprint: str
    factedit_version: str
    created_at: float = field(default_factory=time.time)
    status: Status = "active"
    reverted_at: float | None = None
    # The delta's parameter names; known without the delta, which a journal may keep on disk only.
    params: tuple[str, ...] = ()
    # Perplexity of the reference text right after the edit over the base model's (the guard's
    # measurement; None when the guard was off).
    drift: float | None = None
    # When `Journal.compact` dropped this reverted edit's delta (None: the journal keeps it).
    compacted_at: float | None = None
    # The matrices whose keys the Editor's preserver held for this edit (those of `held_keys`; known
    # without them): its revert made that preserver rebuild its inverse of them.
    held: tuple[str, ...] = ()
    delta: Delta | None = field(default=None, repr=False, compare=False)
    # A lifelong method's state after this edit (methods.StreamState.after); journaled beside the delta.
    state: Mapping[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    # The keys the Editor's preserver holds for this edit in later solves ({param name: (N, in)}), as they
    # were taken right after it; journaled beside the delta, so a reopened journal holds the same ones.
    held_keys: Mapping[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.delta is not None:
            object.__setattr__(self, "params", tuple(self.delta.names()))
        if self.held_keys is not None:
            object.__setattr__(self, "held", tuple(sorted(self.held_keys)))

    @property
    def request(self) -> EditRequest:
        """The first (for `edit`, the only) request."""
        return self.requests[0]

    def without_delta(self) -> EditRecord:
        """This record without its tensors (its `params` stay)."""
        return replace(self, delta=None, state=None, held_keys=None)

    def with_status(self, status: Status) -> EditRecord:
        return replace(self, status=status, reverted_at=time.time() if status == "reverted" else None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (without the delta tensors)."""
        return {
            "id": self.id,
            "method": self.method,
            "config": dict(self.config),
            "requests": [r.to_dict() for r in self.requests],
            "pre": dict(self.pre),
            "post": dict(self.post),
            "timings": dict(self.timings),
            "model_id": self.model_id,
            "model_fingerprint": self.model_fingerprint,
            "factedit_version": self.factedit_version,
            "created_at": self.created_at,
            "status": self.status,
            "reverted_at": self.reverted_at,
            "params": list(self.params),
            "drift": self.drift,
            "compacted_at": self.compacted_at,
            "held": list(self.held),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], delta: Delta | None = None) -> EditRecord:
        fields = dict(data)
        fields["params"] = tuple(fields.get("params", ()))
        fields["held"] = tuple(fields.get("held", ()))
        fields["requests"] = tuple(EditRequest.from_dict(r) for r in fields["requests"])
        return cls(**fields, delta=delta)
