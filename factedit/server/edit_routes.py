"""Edits over HTTP: apply (one fact or a batch), list, read, revert, diff, export and import, compact the
journal, and health.

Every change goes through the session, which holds the weights alone while it writes: generations in
flight finish first and new ones wait. Bad input gets a 4xx JSON error and changes nothing. Each route
declares who may call it (access.py); the token is checked before the body is read.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from ..core.errors import EditNotFoundError
from ..core.request import EditRequest
from .access import Access, declare
from .errors import APIError
from .schemas import CompactBody, EditBody
from .state import ServiceState, StateDep

DAY_S = 86400.0

EDIT_FILE_TYPE = "application/vnd.factedit.edit+safetensors"


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["edits"])
    read, write = declare(Access.READ), declare(Access.WRITE)
    router.add_api_route("/edits", create_edit, methods=["POST"], status_code=201, **write)
    router.add_api_route("/edits", list_edits, methods=["GET"], **read)
    router.add_api_route("/edits/import", import_edit, methods=["POST"], status_code=201, **write)
    router.add_api_route("/edits/{edit_id}", get_edit, methods=["GET"], **read)
    router.add_api_route("/edits/{edit_id}", revert_edit, methods=["DELETE"], **write)
    router.add_api_route("/edits/{edit_id}/diff", diff_edit, methods=["GET"], **read)
    # A write although a GET: the file carries the edit's delta, enough to re-apply it elsewhere.
    router.add_api_route("/edits/{edit_id}/export", export_edit, methods=["GET"], **write,
                         response_class=Response, responses={200: {"content": {EDIT_FILE_TYPE: {}}}})
    router.add_api_route("/journal/compact", compact_journal, methods=["POST"], tags=["journal"], **write)
    router.add_api_route("/health", health, methods=["GET"], tags=["health"], **declare(Access.OPEN))
    return router


def create_edit(body: EditBody, state: StateDep) -> dict[str, Any]:
    """Apply one fact, or several as one edit; returns the record with its before/after scores. The
    session checks the facts against the limits (`limit_exceeded`) and `config` against the method's
    settable fields (`config_not_allowed`) before anything runs."""
    requests = [EditRequest(f.prompt, f.target, f.subject, tuple(f.paraphrases), tuple(f.locality))
                for f in body.all_facts()]
    record = state.session.edit_requests(requests, body.method, body.config)
    return record.to_dict()


def list_edits(
    state: StateDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1)] = 50,
    status: Literal["active", "reverted"] | None = None,
) -> dict[str, Any]:
    """The history, oldest first, one page at a time."""
    if limit > state.config.limits.max_page:
        raise APIError(422, "page_too_large", f"limit is at most {state.config.limits.max_page}", param="limit")
    records = [r for r in state.session.history() if status is None or r.status == status]
    return {"object": "list", "data": [r.to_dict() for r in records[offset:offset + limit]],
            "total": len(records), "offset": offset, "limit": limit}


def get_edit(edit_id: str, state: StateDep) -> dict[str, Any]:
    return _find(state, edit_id).to_dict()


def revert_edit(edit_id: str, state: StateDep) -> dict[str, Any]:
    """Undo one active edit exactly (the other edits stay)."""
    if _find(state, edit_id).status != "active":
        raise APIError(409, "already_reverted", f"edit {edit_id} is already reverted")
    return state.session.revert(edit_id).to_dict()


def diff_edit(
    edit_id: str, state: StateDep, probe: Annotated[list[str] | None, Query()] = None,
) -> dict[str, Any]:
    """Per-parameter change and the predictions on its prompts (and `probe`s) with and without it."""
    _find(state, edit_id)
    limits = state.config.limits
    probe = probe or []
    if len(probe) > limits.max_prompts or any(len(p) > 4 * limits.max_prompt_tokens for p in probe):
        raise APIError(422, "too_many_probes", f"at most {limits.max_prompts} probes of sensible length",
                       param="probe")
    return state.session.diff(edit_id, probes=probe or None)


def export_edit(edit_id: str, state: StateDep) -> Response:
    """The edit as a self-describing safetensors file (delta + record), for `POST /v1/edits/import`."""
    _find(state, edit_id)
    data = state.session.export_edit(edit_id)
    return Response(data, media_type=EDIT_FILE_TYPE,
                    headers={"Content-Disposition": f'attachment; filename="edit-{edit_id}.safetensors"'})


async def import_edit(file: UploadFile, state: StateDep) -> dict[str, Any]:
    """Apply an uploaded exported edit as a new edit (checked against this model; never unpickled)."""
    data = await file.read()
    if not data:
        raise APIError(422, "invalid_edit_file", "the uploaded file is empty", param="file")
    record = await run_in_threadpool(state.session.import_edit, data)
    return record.to_dict()


async def compact_journal(state: StateDep, body: CompactBody | None = None) -> dict[str, Any]:
    """Drop the stored deltas of edits reverted more than `older_than_days` ago (their records stay);
    returns `{"dropped", "bytes_before", "bytes_after"}`."""
    days = (body or CompactBody()).older_than_days
    return await run_in_threadpool(state.session.compact_journal, older_than_s=days * DAY_S)


async def health(
    state: StateDep,
    weights: Annotated[bool, Query(description="also hash every parameter (sha256, ~1 s)")] = False,
) -> dict[str, Any]:
    """Model, journal, active edits, the drift the guard measured last, and the generation queue.
    A coroutine: it answers on the event loop, even when every worker thread waits for the weights."""
    report = {**state.session.health(), "generation": asdict(state.generator.stats)}
    if weights:
        report["weights_sha256"] = await run_in_threadpool(state.session.weights_sha256)
    return report


def _find(state: ServiceState, edit_id: str):
    try:
        return state.session.record(edit_id)
    except EditNotFoundError as exc:
        raise APIError(404, "edit_not_found", str(exc)) from exc
