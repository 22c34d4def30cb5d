"""The values the generation engine exchanges with its callers: what a request asks for (SamplingParams,
validated at construction), what it yields (TokenInfo, TextDelta, Finished, Completion), how it fails
(QueueFullError, GenerationError), and the engine's counters (GeneratorStats)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_LOGPROBS",
    "Completion",
    "Event",
    "Finished",
    "GenerationError",
    "GeneratorStats",
    "QueueFullError",
    "SamplingParams",
    "TextDelta",
    "TokenInfo",
]

MAX_LOGPROBS = 20  # the most top alternatives a request may ask for (OpenAI's limit)
MAX_STOP_STRINGS = 16


def is_int(value: Any) -> bool:
    """An int that is not a bool (True and False are ints to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to generate one completion; invalid values raise ValueError at construction.

    max_tokens: the most tokens to generate (>= 1); reaching it ends with finish_reason "length".
    temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    top_p: nucleus sampling, in (0, 1]: sample among the most likely tokens whose mass reaches top_p.
    stop: stop strings (a single string is accepted too); the text ends before the first one found,
        with finish_reason "stop". The tokenizer's eos token(s) also stop with "stop".
    logprobs: None for none; k in 0..20 to get each chosen token's logprob and the k most likely tokens.
    seed: makes sampling reproducible for the same prompt (a private torch.Generator per request).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature!r}")
        object.__setattr__(self, "temperature", float(self.temperature))
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise ValueError(f"top_p must be a number, got {self.top_p!r}")
        if not (0 < self.top_p <= 1):  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "top_p", float(self.top_p))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a string or a sequence of strings, got {self.stop!r}")
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        object.__setattr__(self, "stop", tuple(stop))
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")
        if self.seed is not None and (not is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be None or a 64-bit integer, got {self.seed!r}")


@dataclass(frozen=True)
class TokenInfo:
    """One generated token: its id and text, and when logprobs were asked for, its logprob and the top-k.

    Logprobs come from log_softmax of the raw logits (before temperature / top_p). ``top`` is sorted by
    logprob, descending; it is empty when logprobs is None or 0.
    """

    id: int
    text: str
    logprob: float | None
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class TextDelta:
    """New text, and the tokens generated since the previous delta.

    Text can lag its tokens (an incomplete UTF-8 character, a possible stop-string beginning), and the
    last delta may carry tokens and no text (the tokens of a stop string).
    """

    text: str
    tokens: list[TokenInfo]


@dataclass(frozen=True)
class Finished:
    """The last event: finish_reason is "stop" (eos or stop string), "length" (max_tokens) or "cancelled".

    completion_tokens counts every token generated, the eos that ended the text included.
    """

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


Event = TextDelta | Finished


@dataclass(frozen=True)
class Completion:
    """Everything one request produced (see Finished for the counts; tokens exclude a final eos)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tokens: list[TokenInfo]



class QueueFullError(RuntimeError):
    """``max_pending`` requests are already queued or running; ``retry_after`` estimates when a slot frees (s)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GenerationError(RuntimeError):
    """A request failed in the worker (its ``__cause__`` is the original exception) or the generator closed."""


@dataclass(frozen=True)
class GeneratorStats:
    """Counters since the generator started (``pending`` and ``running`` are current)."""

    requests_submitted: int
    requests_served: int  # finished with "stop" or "length"
    requests_cancelled: int
    requests_failed: int
    requests_rejected: int  # QueueFullError
    batches: int
    mean_batch_size: float
    tokens_generated: int
    busy_s: float  # time spent generating batches
    pending: int  # queued or running now
    running: int

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of generation time (0 before the first batch)."""
        return self.tokens_generated / self.busy_s if self.busy_s > 0 else 0.0
