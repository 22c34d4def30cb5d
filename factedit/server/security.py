"""Who may do what (bearer token, compared in constant time) and how big a request body may be."""

from __future__ import annotations

import hmac
import json
import os
import secrets
from pathlib import Path

from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..editing.errors import ConfigError
from .errors import APIError, error_body

TOKEN_ENV = "FACTEDIT_API_TOKEN"


def load_token(token_file: str | os.PathLike | None, environ: dict[str, str] | None = None) -> str | None:
    """The token from `token_file` (first line) or `FACTEDIT_API_TOKEN`; None when neither is set."""
    env = os.environ if environ is None else environ
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {token_file}: {exc}") from exc
        if not token:
            raise ConfigError(f"the token file {token_file} is empty")
        return token
    return env.get(TOKEN_ENV) or None


def new_token_file(path: Path) -> str:
    """Write a fresh random token to `path`, readable by its owner only, and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    return token


class TokenCheck:
    """A FastAPI dependency: passes requests that carry the token (or, for reads, when reads are open)."""

    def __init__(self, token: str | None, *, write: bool, open_reads: bool) -> None:
        self.token, self.write, self.open_reads = token, write, open_reads

    def __call__(self, request: Request) -> None:
        if not self.write and self.open_reads:
            return
        if self.token is None:
            raise APIError(403, "writes_disabled", "this server was started without a token; it takes no edits")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise APIError(401, "unauthorized", "a valid bearer token is required (Authorization: Bearer <token>)",
                           headers={"WWW-Authenticate": "Bearer"})


class BodySizeLimit:
    """ASGI middleware: a request body past its limit gets 413 before a route reads it. The limit is
    `upload_bytes` for the upload paths and `default_bytes` elsewhere; a chunked body is counted as
    it arrives."""

    def __init__(self, app, default_bytes: int, upload_bytes: int, upload_paths: tuple[str, ...]) -> None:
        self.app, self.default_bytes, self.upload_bytes = app, default_bytes, upload_bytes
        self.upload_paths = upload_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_bytes if scope["path"] in self.upload_paths else self.default_bytes
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, limit)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a route reading its body answers this through the app's handlers
                    raise StarletteHTTPException(413, f"the request body is larger than {limit} bytes")
            return message

        await self.app(scope, counted_receive, send)

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        body = json.dumps(error_body("too_large", f"the request body is larger than {limit} bytes", 413)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
