"""Settings of `factedit serve`: where it listens, who may do what, and how much one request may ask."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..editing.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past these the server answers 413 (body) or 422 (the rest)."""

    max_body_bytes: int = 1 << 20  # JSON bodies
    max_upload_bytes: int = 64 << 20  # an exported edit file
    max_prompt_tokens: int = 1024
    max_tokens: int = 256  # tokens generated per completion
    max_prompts: int = 16  # prompts in one /v1/completions request
    max_messages: int = 64  # messages in one chat
    max_facts: int = 64  # facts in one edit
    max_page: int = 200  # records per page of the history


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # bearer token for writes (and reads unless open_reads)
    open_reads: bool = False  # completions, history and diffs without a token
    max_batch: int = 8  # prompts generated together
    max_queue: int = 64  # generations queued or running; past it: 503 with Retry-After
    max_pending_writes: int = 8  # edits/reverts/imports waiting for the weights; past it: 503
    limits: Limits = Limits()

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("the API token must be at least 16 characters")
        if self.token is None and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to serve on {self.host} (not a loopback address) without a token: "
                "give --token-file or FACTEDIT_API_TOKEN"
            )


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only; a host name other than localhost may resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
