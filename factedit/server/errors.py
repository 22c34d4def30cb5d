"""Errors as JSON with a stable `code`, in the shape OpenAI clients parse:
`{"error": {"message", "type", "code", "param"}}`.

Library errors map to HTTP statuses here, in one table, so every route answers them alike.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from ..core.errors import (
    ConfigError,
    ConfigNotAllowedError,
    DriftError,
    EditNotFoundError,
    FacteditError,
    InvalidDeltaError,
    InvalidRequestError,
    JournalError,
    LimitError,
    ModelMismatchError,
    UnsupportedModelError,
)
from ..session.access import SessionBusyError

logger = logging.getLogger(__name__)

# Most specific first: ModelMismatchError is a JournalError, LimitError an InvalidRequestError,
# ConfigNotAllowedError a ConfigError.
_STATUS: list[tuple[type[Exception], int, str]] = [
    (SessionBusyError, 503, "busy"),
    (DriftError, 422, "drift_exceeded"),
    (ModelMismatchError, 422, "model_mismatch"),
    (EditNotFoundError, 404, "edit_not_found"),
    (InvalidDeltaError, 422, "invalid_edit_file"),
    (LimitError, 422, "limit_exceeded"),
    (InvalidRequestError, 422, "invalid_request"),
    (ConfigNotAllowedError, 422, "config_not_allowed"),
    (ConfigError, 422, "invalid_config"),
    (UnsupportedModelError, 422, "unsupported_model"),
    (JournalError, 503, "journal_unavailable"),
]

_TOO_LONG = {"too_long"}  # pydantic's type for a list or mapping past its bound


class APIError(Exception):
    """An error a route raises on purpose: HTTP status, stable code, message, extra headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.param = status, code, message, headers, param


def error_body(code: str, message: str, status: int, param: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.code, exc.message, exc.status, exc.param), exc.status, headers=exc.headers)


async def refuse(exc: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer `exc` from a middleware, before the app has read the request body, and close the connection
    after it: the unread body is dropped with it instead of being drained."""
    response = error_response(exc)
    response.headers["Connection"] = "close"
    await response(scope, receive, send)


def from_library_error(exc: FacteditError) -> APIError:
    for cls, status, code in _STATUS:
        if isinstance(exc, cls):
            busy = isinstance(exc, SessionBusyError)
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if busy else None
            return APIError(status, code, str(exc), headers)
    return APIError(400, "edit_failed", str(exc))


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(FacteditError)
    async def _library_error(_: Request, exc: FacteditError) -> JSONResponse:
        return error_response(from_library_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        code = "limit_exceeded" if first.get("type") in _TOO_LONG else "invalid_request"
        return error_response(APIError(422, code, message, param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 408: "body_timeout",
                 413: "too_large"}
        return error_response(APIError(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail),
                                       headers=getattr(exc, "headers", None)))
