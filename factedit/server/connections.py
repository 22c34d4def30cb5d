"""Connection hygiene: a slow or silent client is dropped instead of being waited for, and a flood of
requests gets 503 instead of an ever longer wait.

- `header_timeout_protocol(s)`: uvicorn's h11 protocol, closing a connection whose request head is not
  complete `s` seconds after the connection opened or its previous response ended (uvicorn itself
  waits forever for a connection that sends half a request line). Given to uvicorn as `http=`.
- `BodyTimeout`: a body not received whole within its deadline answers 408 `body_timeout` and the
  connection is closed.
- `InFlightLimit`: at most N requests handled at once (a health check is always answered); past it,
  503 `busy` with Retry-After. It counts requests, not connections: idle and half-open connections
  (which uvicorn's `limit_concurrency` would count) cost no slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import ClassVar

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import APIError, refuse

logger = logging.getLogger(__name__)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head (`header_timeout_s`)."""

    header_timeout_s: ClassVar[float] = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # a kept-alive connection now waits for its next head
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        # No request in progress: its head has not come (whole) since the connection opened or the last
        # response ended; a request that is being handled has a head and its own body deadline.
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            logger.debug("closing %s: no complete request head within %g s", self.client, self.header_timeout_s)
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to give uvicorn (`uvicorn.run(app, http=...)`) for a head deadline of `seconds`."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": float(seconds)})


class BodyTimeout:
    """ASGI middleware: the request body must arrive whole within `seconds` of its head. Past it, the
    route's read of the body fails with 408 (`body_timeout`, answered through the app's error
    handlers) and the connection is closed. Reads after the body (a stream listening for the client
    leaving) have no deadline."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise StarletteHTTPException(408, f"the request body did not arrive within {self.seconds:g} s",
                                             headers={"Connection": "close"}) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


class InFlightLimit:
    """ASGI middleware: at most `limit` requests handled at once, those to `exempt` paths aside (they
    are neither counted nor refused); past it, 503 `busy` with Retry-After, before the body is read."""

    def __init__(self, app: ASGIApp, limit: int, exempt: Collection[str] = ()) -> None:
        self.app, self.limit, self.exempt = app, limit, frozenset(exempt)
        self.in_flight = 0  # changed on the event loop only: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            busy = APIError(503, "busy", f"{self.in_flight} requests are already being handled; try again shortly",
                            headers={"Retry-After": "1"})
            return await refuse(busy, scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
