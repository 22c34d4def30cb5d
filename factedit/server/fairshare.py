"""Each client's share of the generation queue: one client cannot fill it and make everyone else wait.

A client is its peer address (the host, not the port: a client may open any number of connections).
OpenAI's `user` field is not used: the caller picks it freely, so it would let one client take as many
shares as it likes. Behind a reverse proxy every client has the proxy's address and shares one share.
`factedit serve` ignores X-Forwarded-For, which any local client could set.

A share counts prompts queued or running: taken before they are submitted, given back when the
response ends (a stream included: when it finishes or its client leaves).
"""

from __future__ import annotations

from collections import Counter

from starlette.types import Scope

from .errors import APIError


def client_of(scope: Scope) -> str:
    """The client a request counts against: its peer's host."""
    peer = scope.get("client")
    return peer[0] if peer else "unknown"


class Share:
    """Generations one request holds against its client's share; `release` gives them back (once)."""

    def __init__(self, shares: FairShare, client: str, count: int) -> None:
        self._shares, self.client, self.count = shares, client, count

    def release(self) -> None:
        if self.count:
            self._shares._give_back(self.client, self.count)
            self.count = 0


class FairShare:
    """At most `per_client` generations queued or running per client. Used from the event loop only
    (the generation routes are coroutines), so the counts need no lock."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._held: Counter[str] = Counter()

    def held(self, client: str) -> int:
        return self._held[client]

    def take(self, client: str, count: int) -> Share:
        """`count` more generations for `client`, or 429 `rate_limited` past its share."""
        if self._held[client] + count > self.per_client:
            raise APIError(429, "rate_limited",
                           f"this client already has {self._held[client]} generation(s) queued or running; at most "
                           f"{self.per_client} per client", headers={"Retry-After": "1"})
        self._held[client] += count
        return Share(self, client, count)

    def _give_back(self, client: str, count: int) -> None:
        self._held[client] -= count
        if self._held[client] <= 0:
            del self._held[client]
