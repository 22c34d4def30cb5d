"""Who may call what, decided from the request line and headers alone, before any body byte is read.

Every API route declares its access where it is added (`declare(Access.WRITE)`); `TokenGate`, the
outermost middleware, matches each request against the app's routes the way the router will and
answers 401/403 itself, so an unauthenticated request costs the server its headers and nothing more
(a 60 MiB upload is refused before its first byte is read, and the connection is closed with it).
A request no route declares (an unknown path, a method a route lacks) needs the token for reads
when it is a GET or HEAD and is a write otherwise.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection, Sequence
from enum import Enum
from typing import Any

from fastapi import Security
from fastapi.security import HTTPBearer
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError, refuse

ACCESS_KEY = "x-factedit-access"  # in each operation of the OpenAPI document too

# Declares the bearer scheme in the OpenAPI document (the docs' "Authorize" button). It checks nothing:
# TokenGate has decided before a route runs.
BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="the server's token (--token-file or FACTEDIT_API_TOKEN)")


class Access(str, Enum):
    OPEN = "open"  # never needs the token (health, the docs)
    READ = "read"  # needs the token unless the server was started with open reads
    WRITE = "write"  # always needs the token; refused outright by a server without one


def declare(access: Access) -> dict[str, Any]:
    """Keyword arguments of `add_api_route` for a route of `access`: what TokenGate enforces and the
    OpenAPI document shows."""
    return {"openapi_extra": {ACCESS_KEY: access.value},
            "dependencies": [] if access is Access.OPEN else [Security(BEARER)]}


class TokenGate:
    """ASGI middleware: passes a request its route's access allows, answers the others 401
    (`unauthorized`, `WWW-Authenticate: Bearer`) or 403 (`writes_disabled`: no token configured).

    Args:
        routes: the API routes, in the order the app's router tries them.
        open_paths: paths open to GET and HEAD besides the declared routes (the OpenAPI docs).
        token: the bearer token, compared in constant time; None: requests that need it are refused.
        open_reads: READ routes need no token.
    """

    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute], open_paths: Collection[str],
                 token: str | None, open_reads: bool) -> None:
        self.app, self.routes, self.open_paths = app, routes, frozenset(open_paths)
        self.token = None if token is None else token.encode()
        self.open_reads = open_reads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (refusal := self.refusal(scope)) is not None:
            return await refuse(refusal, scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> APIError | None:
        """Why the request may not go on (None: it may), from its method, path and headers."""
        access = self.access(scope)
        if access is Access.OPEN or (access is Access.READ and self.open_reads):
            return None
        if self.token is None:
            return APIError(403, "writes_disabled", "this server was started without a token: requests that need "
                            "one are refused")
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self.token):
            return None
        return APIError(401, "unauthorized", "a valid bearer token is required (Authorization: Bearer <token>)",
                        headers={"WWW-Authenticate": "Bearer"})

    def access(self, scope: Scope) -> Access:
        """The access the route that will handle this request declares."""
        reading = scope["method"] in ("GET", "HEAD")
        if reading and scope["path"] in self.open_paths:
            return Access.OPEN
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:  # the router takes the first full match: so does the gate
                declared = (getattr(route, "openapi_extra", None) or {}).get(ACCESS_KEY)
                if declared is not None:
                    return Access(declared)
                break
        return Access.READ if reading else Access.WRITE
