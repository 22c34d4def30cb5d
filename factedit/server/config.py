"""Settings of `factedit serve`: where it listens, who may do what, how much one request may ask, and how
long a connection may take to say what it wants."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..core.errors import ConfigError
from ..session.limits import RequestLimits

TOKEN_ENV = "FACTEDIT_API_TOKEN"  # the environment variable that may hold the bearer token for edits
MAX_LIST_ITEMS = 256  # ceiling of every per-request list limit: the request schemas refuse longer lists


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past these the server answers 413 (body) or 422 (the rest)."""

    max_body_bytes: int = 1 << 20  # JSON bodies
    max_upload_bytes: int = 64 << 20  # an exported edit file
    max_prompt_tokens: int = 1024
    max_tokens: int = 256  # tokens generated per completion
    max_prompts: int = 16  # prompts in one /v1/completions request
    max_messages: int = 64  # messages in one chat
    max_facts: int = 64  # facts in one edit (an imported one too)
    max_paraphrases: int = 16  # paraphrases per fact
    max_locality: int = 16  # locality prompts per fact
    max_text_chars: int = 2000  # characters of one prompt, target, subject, paraphrase or locality prompt
    max_page: int = 200  # records per page of the history

    def __post_init__(self) -> None:
        for name in ("max_facts", "max_paraphrases", "max_locality"):
            if not 0 <= getattr(self, name) <= MAX_LIST_ITEMS:
                raise ConfigError(f"limits.{name} must be between 0 and {MAX_LIST_ITEMS}")

    def request_limits(self) -> RequestLimits:
        """The edit limits, as the session checks them for every edit and import."""
        return RequestLimits(max_facts=self.max_facts, max_paraphrases=self.max_paraphrases,
                             max_locality=self.max_locality, max_text_chars=self.max_text_chars)


@dataclass(frozen=True)
class ServerConfig:
    """Args:
        host, port: where uvicorn listens.
        token: bearer token for writes (and reads unless `open_reads`); None: no writes at all.
        max_queue_per_client: generations (prompts) one client may have queued or running at once; a
            client is its peer address (`fairshare.py`). Past it: 429 with Retry-After.
        keep_alive_s: an idle keep-alive connection is closed after this long.
        header_timeout_s: a connection whose request head (request line and headers) is not complete
            this long after it opened, or after its previous response, is closed.
        body_timeout_s: a request body not received whole this long after its head: 408, closed.
        max_in_flight: requests being handled at once (/v1/health aside); past it: 503 with Retry-After.
            Below the threadpool's 40 workers: requests waiting in synchronous routes never take them all.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    open_reads: bool = False  # completions, history and diffs without a token
    max_batch: int = 8  # prompts generated together
    max_queue: int = 64  # generations queued or running; past it: 503 with Retry-After
    max_queue_per_client: int = 16
    max_pending_writes: int = 8  # edits/reverts/imports waiting for the weights; past it: 503
    keep_alive_s: float = 5.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_in_flight: int = 32
    limits: Limits = Limits()

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("the API token must be at least 16 characters")
        if self.token is None and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to serve on {self.host} (not a loopback address) without a token: "
                "give --token-file or FACTEDIT_API_TOKEN"
            )
        for name in ("keep_alive_s", "header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("max_in_flight", "max_queue_per_client", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only; a host name other than localhost may resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
