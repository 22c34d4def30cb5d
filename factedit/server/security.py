"""The bearer token's files (owner-only, mode 0600) and how big a request body may be. Who may call what:
access.py."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import ConfigError
from .config import TOKEN_ENV
from .errors import APIError, refuse

logger = logging.getLogger(__name__)



def load_token(token_file: str | os.PathLike | None, environ: dict[str, str] | None = None) -> str | None:
    """The token from `token_file` (first line) or `FACTEDIT_API_TOKEN`; None when neither is set. A token
    file other users may read or write is refused (ConfigError saying to `chmod 600` it)."""
    env = os.environ if environ is None else environ
    if token_file is not None:
        try:
            mode = stat.S_IMODE(os.stat(token_file).st_mode)
            if mode & 0o077:
                raise ConfigError(f"the token file {token_file} is open to other users (mode {mode:04o}): "
                                  f"chmod 600 {token_file}")
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


def owner_only(path: Path) -> None:
    """Make `path` (a token file this server keeps) mode 0600 if other users may read or write it,
    with a warning saying so."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
        logger.warning("the token file %s was open to other users (mode %04o); it is now 0600", path, mode)


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
            too_large = APIError(413, "too_large", f"the request body is larger than {limit} bytes")
            return await refuse(too_large, scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a route reading its body answers this through the app's handlers
                    raise StarletteHTTPException(413, f"the request body is larger than {limit} bytes",
                                                 headers={"Connection": "close"})  # the rest is not read
            return message

        await self.app(scope, counted_receive, send)
