"""Dynamic-batching text generation for the service: one worker thread, wave batching, one read lock per batch.

    gen = BatchGenerator(model, tokenizer, rwlock.read)
    handle = gen.submit(prompt_ids, SamplingParams(max_tokens=32, temperature=0))
    for event in handle:                  # or `async for event in handle:` inside an event loop
        ...                               # TextDelta(text, tokens) ..., then Finished(finish_reason, ...)
    completion = handle.result()          # or collect everything at once

Design
------
*Wave batching.* A single daemon worker thread owns the model's forward passes. When a request arrives it
waits ``gather_s`` for stragglers, takes the read lock, then takes everything queued (up to ``max_batch``)
as one batch: the prompts are left-padded to a common width, prefilled in one forward pass, and decoded one
token per row per step with the KV cache. Rows that finish (eos, stop string, max_tokens, cancel) are
dropped from the cache, so the remaining rows run on a smaller batch. Requests arriving meanwhile wait and
form the next wave. Letting them join a running batch (continuous batching) would keep the read lock held
for as long as traffic lasts, starving edits; a wave bounds a writer's wait to one batch.

*Lock discipline.* ``read_lock()`` (the session's readers–writer lock) is held for the whole generation
of a batch, from prefill to the last token, so an edit (a writer) waits for the batch to end and no
sequence is ever produced by a mix of old and new weights. The batch is taken from the queue after the
lock is acquired, so requests that arrive while an edit runs are generated together right after it.

*Explicit position ids.* With left padding a row's first real token sits at column ``width - len``, but
transformers 5 models do not derive positions from ``attention_mask``: without ``position_ids`` a short
prompt would be encoded at shifted positions (rotary/learned embeddings) and greedy output would differ
from generating it alone. Positions are therefore ``cumsum(mask) - 1`` (clamped at 0 on the padding) at
prefill and one more per step afterwards, per row.

*Text.* Each row decodes its whole generated id list at every step and emits the new suffix, holding back
a trailing incomplete UTF-8 character (decoded as '\\ufffd') and any tail that could be the beginning of a
stop string. ``result().text`` is the concatenation of the deltas by construction, so streaming and
non-streaming output agree exactly. Eos tokens end a row without adding text.

*Threads and asyncio.* A :class:`Generation` keeps its events in a list guarded by a condition variable:
sync iteration waits on the condition, async iteration registers an ``asyncio.Event`` that the worker sets
with ``loop.call_soon_threadsafe``, so the event loop never blocks. Leaving an iteration early (``break``,
an exception, a cancelled task: a client that disconnected) cancels the request and frees its slot.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "MAX_LOGPROBS",
    "BatchGenerator",
    "Completion",
    "Event",
    "Finished",
    "Generation",
    "GenerationError",
    "GeneratorStats",
    "QueueFullError",
    "SamplingParams",
    "TextDelta",
    "TokenInfo",
]

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # the most top alternatives a request may ask for (OpenAI's limit)
MAX_STOP_STRINGS = 16
_UNKNOWN_RETRY_S = 1.0  # retry_after when nothing runs yet to measure (e.g. an edit holds the lock)

_LIVE: weakref.WeakSet[BatchGenerator] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    # A worker thread still alive while the interpreter tears down aborts the process now and then
    # ("terminate called without an active exception" from torch's thread pools), so stop them first.
    for generator in list(_LIVE):
        generator.close(timeout=5)


# ---------------------------------------------------------------------------------------------------
# Parameters, events, results, errors


def _is_int(value: Any) -> bool:
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
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
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
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
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


@dataclass(frozen=True)
class _Failed:
    error: BaseException


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


# ---------------------------------------------------------------------------------------------------
# The request handle


class Generation:
    """The handle of one submitted request: iterate it (sync or async) for events, or call ``result()``.

    Events are kept, so iterating twice (or iterating, then calling result) sees them all again.
    """

    def __init__(self, owner: BatchGenerator, prompt_ids: list[int], params: SamplingParams) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self._owner = owner
        self._cond = threading.Condition()
        self._events: list[TextDelta | Finished | _Failed] = []
        self._done = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._completion_tokens = 0  # written by the worker, read by cancel() and retry estimates
        self._holds_slot = False  # guarded by the owner's lock

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        """True once the request finished, failed or was cancelled."""
        return self._done

    def cancel(self) -> None:
        """Stop this request (e.g. its client disconnected): it ends with Finished("cancelled") now, its
        row is dropped at the worker's next step, and its pending slot is freed immediately. No-op once done."""
        finished = Finished("cancelled", self.prompt_tokens, self._completion_tokens)
        if self._push(finished, final=True):
            self._owner._release(self, "cancelled")

    # -- consumption

    def __iter__(self) -> Iterator[Event]:
        """Yield events as they come (blocking); raise GenerationError if the request failed."""
        index, complete = 0, False
        try:
            while True:
                with self._cond:
                    while index >= len(self._events):
                        self._cond.wait()
                    event = self._events[index]
                index += 1
                if isinstance(event, _Failed):
                    complete = True
                    _raise_failure(event)
                yield event
                if isinstance(event, Finished):
                    complete = True
                    return
        finally:
            if not complete:  # the consumer left early: nobody will read the rest
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[Event]:
        """Yield events as they come without blocking the event loop; raise GenerationError on failure."""
        loop = asyncio.get_running_loop()
        index, complete = 0, False
        try:
            while True:
                wake: asyncio.Event | None = None
                with self._cond:  # never held across an await
                    if index < len(self._events):
                        event = self._events[index]
                    else:
                        wake = asyncio.Event()
                        self._waiters.append((loop, wake))
                if wake is not None:
                    await wake.wait()
                    continue
                index += 1
                if isinstance(event, _Failed):
                    complete = True
                    _raise_failure(event)
                yield event
                if isinstance(event, Finished):
                    complete = True
                    return
        finally:
            if not complete:  # a cancelled task (client disconnect), break or error: free the slot
                self.cancel()

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end and return everything; TimeoutError after ``timeout`` s (the request goes on),
        GenerationError if it failed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout=timeout):
                raise TimeoutError(f"the generation did not finish within {timeout} s")
            events = list(self._events)
        return _collect(events)

    async def aresult(self) -> Completion:
        """``result()`` for async code: waits without blocking the event loop."""
        events = [event async for event in self]
        return _collect(events)

    # -- worker side

    def _push(self, event: TextDelta | Finished | _Failed, *, final: bool = False) -> bool:
        """Append an event and wake consumers; False (and nothing appended) once the request is done."""
        with self._cond:
            if self._done:
                return False
            self._events.append(event)
            self._done = final
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, wake in waiters:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(wake.set)
        return True


def _raise_failure(event: _Failed) -> None:
    error = event.error
    if isinstance(error, GenerationError):
        raise GenerationError(str(error)) from error.__cause__
    raise GenerationError(f"generation failed: {type(error).__name__}: {error}") from error


def _collect(events: Sequence[TextDelta | Finished | _Failed]) -> Completion:
    texts: list[str] = []
    tokens: list[TokenInfo] = []
    for event in events:
        if isinstance(event, _Failed):
            _raise_failure(event)
        elif isinstance(event, TextDelta):
            texts.append(event.text)
            tokens.extend(event.tokens)
        else:
            return Completion("".join(texts), event.finish_reason, event.prompt_tokens, event.completion_tokens, tokens)
    raise AssertionError("a finished generation has no Finished event")  # _done implies a final event


# ---------------------------------------------------------------------------------------------------
# The engine


class _Row:
    """Decoding state of one request inside a running batch."""

    __slots__ = ("count", "emitted", "gen", "ids", "rng", "tokens")

    def __init__(self, gen: Generation, rng: torch.Generator | None) -> None:
        self.gen = gen
        self.rng = rng  # per-request generator when seeded, else None (the engine's)
        self.ids: list[int] = []  # generated ids, eos excluded
        self.count = 0  # generated tokens, eos included
        self.emitted = 0  # characters of the decoded text already sent
        self.tokens: list[TokenInfo] = []  # not yet attached to a delta


def _context_length(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if _is_int(value) and value > 0:
            return value
    return None


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    candidates.append(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    for value in candidates:
        if _is_int(value):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if _is_int(v))
    return frozenset(ids)


def _safe_end(text: str, start: int, stops: Iterable[str]) -> int:
    """How much of ``text`` may be sent: hold back a trailing incomplete character and a possible stop start."""
    end = len(text)
    while end > start and text[end - 1] == "\ufffd":  # bytes of an unfinished UTF-8 character
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end - start), hold, -1):
            if text.endswith(stop[:k], start, end):
                hold = k
                break
    return end - hold


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p (the first always stays)."""
    sorted_p, order = probs.sort(descending=True)  # (vocab,)
    keep = (sorted_p.cumsum(0) - sorted_p) < top_p  # mass before each token is still short of top_p
    filtered = torch.zeros_like(probs)
    filtered[order[keep]] = sorted_p[keep]
    return filtered


class BatchGenerator:
    """Generate completions for many concurrent requests in batches, on one background worker thread.

    model: a causal LM in eval mode (left untouched: no train(), no config changes).
    tokenizer: its tokenizer (decode; eos_token_id and pad_token_id are used).
    read_lock: zero-argument callable returning a context manager, held for each whole batch.
    max_batch: the most requests generated together. max_pending: the most requests queued or running;
    beyond it submit raises QueueFullError. gather_s: how long the worker waits for stragglers once a
    request arrived, before starting a batch.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        read_lock: Callable[[], AbstractContextManager[Any]],
        *,
        max_batch: int = 8,
        max_pending: int = 64,
        gather_s: float = 0.005,
    ) -> None:
        if not _is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not _is_int(max_pending) or max_pending < 1:
            raise ValueError(f"max_pending must be an integer >= 1, got {max_pending!r}")
        if not math.isfinite(gather_s) or gather_s < 0:
            raise ValueError(f"gather_s must be >= 0, got {gather_s!r}")
        self._model = model
        self._tokenizer = tokenizer
        self._read_lock = read_lock
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._gather_s = float(gather_s)

        embeddings = model.get_input_embeddings()
        self._device = embeddings.weight.device
        self._vocab = int(embeddings.num_embeddings)
        self._max_positions = _context_length(model.config)
        self._eos = _eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        if not _is_int(pad):  # the id is masked out, any valid one does
            pad = min(self._eos) if self._eos else 0
        self._pad_id: int = pad
        self._token_texts: dict[int, str] = {}  # worker-only cache of single-token texts
        self._rng = torch.Generator()  # unseeded requests; private so the global RNG is left alone
        self._rng.seed()

        self._lock = threading.Condition()  # guards everything below
        self._queue: deque[Generation] = deque()
        self._running: list[Generation] = []
        self._inflight = 0  # queued + running requests holding a slot
        self._closed = False
        self._step_s: float | None = None  # moving average of one decode step, for retry_after
        self._counts = dict.fromkeys(
            ("submitted", "served", "cancelled", "failed", "rejected", "batches", "batched_rows", "tokens"), 0
        )
        self._busy_s = 0.0
        self._thread = threading.Thread(target=self._worker, name="factedit-generation", daemon=True)
        _LIVE.add(self)
        self._thread.start()

    # -- public API

    @property
    def max_context(self) -> int | None:
        """The model's context length in tokens (prompt + max_tokens must fit), or None if unknown."""
        return self._max_positions

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Generation:
        """Queue one request and return its handle at once.

        Raises ValueError for an empty prompt, ids outside the vocabulary, or prompt + max_tokens beyond
        the model's context; QueueFullError when max_pending requests are queued or running;
        GenerationError once the generator is closed.
        """
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = list(prompt_ids)
        if not ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        if not all(_is_int(i) and 0 <= i < self._vocab for i in ids):
            bad = next(i for i in ids if not (_is_int(i) and 0 <= i < self._vocab))
            raise ValueError(f"prompt token id {bad!r} is not in the vocabulary (0..{self._vocab - 1})")
        if self._max_positions is not None and len(ids) + params.max_tokens > self._max_positions:
            raise ValueError(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self._max_positions} tokens"
            )
        gen = Generation(self, ids, params)
        with self._lock:
            if self._closed:
                raise GenerationError("the generator is closed")
            if self._inflight >= self._max_pending:
                self._counts["rejected"] += 1
                retry = self._retry_after_locked()
                raise QueueFullError(
                    f"{self._inflight} requests are queued or running (the limit is {self._max_pending}); "
                    f"retry in about {retry:.1f} s",
                    retry_after=retry,
                )
            self._inflight += 1
            gen._holds_slot = True
            self._queue.append(gen)
            self._counts["submitted"] += 1
            self._lock.notify_all()
        return gen

    @property
    def stats(self) -> GeneratorStats:
        """A snapshot of the counters."""
        with self._lock:
            c = self._counts
            return GeneratorStats(
                requests_submitted=c["submitted"],
                requests_served=c["served"],
                requests_cancelled=c["cancelled"],
                requests_failed=c["failed"],
                requests_rejected=c["rejected"],
                batches=c["batches"],
                mean_batch_size=c["batched_rows"] / c["batches"] if c["batches"] else 0.0,
                tokens_generated=c["tokens"],
                busy_s=self._busy_s,
                pending=self._inflight,
                running=sum(not g.done for g in self._running),
            )

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker: queued requests and the running batch fail with GenerationError; idempotent.

        Call it when the service stops (it also runs at interpreter exit: a torch worker thread left running
        while the interpreter tears down can abort the process)."""
        with self._lock:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._lock.notify_all()
        for gen in queued:
            self._fail(gen, GenerationError("the generator was closed before this request ran"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> BatchGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- slots

    def _release(self, gen: Generation, outcome: str) -> None:
        """Free the request's slot (once) and count how it ended."""
        with self._lock:
            if not gen._holds_slot:
                return
            gen._holds_slot = False
            self._inflight -= 1
            self._counts[outcome] += 1
            with contextlib.suppress(ValueError):  # cancelled while still queued
                self._queue.remove(gen)

    def _fail(self, gen: Generation, error: BaseException) -> None:
        if gen._push(_Failed(error), final=True):
            self._release(gen, "failed")

    def _retry_after_locked(self) -> float:
        """Seconds until the earliest running request ends at the latest, if it runs to max_tokens."""
        step = self._step_s if self._step_s is not None else 0.05
        left = [g.params.max_tokens - g._completion_tokens for g in self._running if not g.done]
        if not left:
            return _UNKNOWN_RETRY_S
        return round(max(0.05, step * max(1, min(left))), 3)

    # -- worker

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                if self._gather_s > 0 and len(self._queue) < self._max_batch:  # let stragglers join
                    self._lock.wait_for(
                        lambda: self._closed or len(self._queue) >= self._max_batch, timeout=self._gather_s
                    )
                if self._closed:
                    return
            batch: list[Generation] = []
            try:
                with self._read_lock():
                    batch = self._take_batch()  # after the lock: what queued during an edit runs now
                    if batch:
                        self._run_batch(batch)
            except Exception as exc:
                logger.warning("generation batch failed: %s: %s", type(exc).__name__, exc, exc_info=True)
                if not batch:  # the lock itself failed: fail the next wave rather than spin on it
                    batch = self._take_batch()
                for gen in batch:
                    self._fail(gen, exc)
            finally:
                with self._lock:
                    self._running = []

    def _take_batch(self) -> list[Generation]:
        with self._lock:
            batch: list[Generation] = []
            while self._queue and len(batch) < self._max_batch:
                gen = self._queue.popleft()
                if not gen.done:
                    batch.append(gen)
            self._running = batch
            return batch

    def _run_batch(self, batch: list[Generation]) -> None:
        started = time.perf_counter()
        rows = [
            _Row(g, torch.Generator().manual_seed(g.params.seed) if g.params.seed is not None else None) for g in batch
        ]
        with self._lock:
            self._counts["batches"] += 1
            self._counts["batched_rows"] += len(batch)
        try:
            with torch.inference_mode():
                self._decode(rows)
        finally:
            with self._lock:
                self._busy_s += time.perf_counter() - started

    def _decode(self, rows: list[_Row]) -> None:
        """Prefill the left-padded prompts, then decode one token per row per step until every row ends."""
        device = self._device
        width = max(r.gen.prompt_tokens for r in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)  # (batch, width)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (batch, width)
        for i, row in enumerate(rows):
            n = row.gen.prompt_tokens
            input_ids[i, width - n :] = torch.tensor(row.gen.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (batch, width); padding sits at 0, masked anyway
        mask = mask.to(device)
        out = self._model(
            input_ids=input_ids.to(device),
            attention_mask=mask,
            position_ids=positions.to(device),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1, :]  # (batch, vocab)
        next_pos = positions[:, -1].to(device) + 1  # (batch,)
        step_started = time.perf_counter()
        while True:
            if self._closed:
                raise GenerationError("the generator was closed during generation")
            chosen = self._choose(logits, rows)
            keep: list[int] = []
            live = 0
            for i, (row, (token, info)) in enumerate(zip(rows, chosen, strict=True)):
                if row.gen.done:  # cancelled since the last step
                    continue
                live += 1
                if not self._advance(row, token, info):
                    keep.append(i)
            with self._lock:
                self._counts["tokens"] += live
            if not keep:
                return
            next_ids = torch.tensor([chosen[i][0] for i in keep], dtype=torch.long, device=device)  # (batch,)
            if len(keep) < len(rows):  # drop finished rows from the cache and every per-row tensor
                index = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(index)
                mask, next_pos = mask[index], next_pos[index]
                rows = [rows[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)  # (batch, past + 1)
            out = self._model(
                input_ids=next_ids[:, None],  # (batch, 1)
                attention_mask=mask,
                position_ids=next_pos[:, None],  # (batch, 1)
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :]  # (batch, vocab)
            next_pos = next_pos + 1
            now = time.perf_counter()  # a whole step (sampling, text, forward): the unit of retry_after
            elapsed, step_started = now - step_started, now
            self._step_s = elapsed if self._step_s is None else 0.8 * self._step_s + 0.2 * elapsed

    def _token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            text = self._tokenizer.decode([token], skip_special_tokens=False)
            self._token_texts[token] = text
        return text

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[tuple[int, TokenInfo]]:
        """Pick each row's next token (greedy, or sampled with its temperature/top_p/generator)."""
        logits = logits.float().cpu()  # (batch, vocab); sampling and logprobs on CPU, ids are needed there anyway
        greedy = logits.argmax(-1).tolist()
        logprobs = None
        if any(r.gen.params.logprobs is not None for r in rows):
            logprobs = torch.log_softmax(logits, dim=-1)  # (batch, vocab), raw logits: before temperature
        chosen: list[tuple[int, TokenInfo]] = []
        for i, row in enumerate(rows):
            params = row.gen.params
            if params.temperature == 0 or row.gen.done:
                token = greedy[i]
            else:
                probs = torch.softmax(logits[i] / params.temperature, dim=-1)  # (vocab,)
                if params.top_p < 1:
                    probs = _top_p_filter(probs, params.top_p)
                token = int(torch.multinomial(probs, 1, generator=row.rng or self._rng))
            logprob: float | None = None
            top: list[tuple[str, float]] = []
            if logprobs is not None and params.logprobs is not None:
                logprob = float(logprobs[i, token])
                if params.logprobs > 0:
                    values, indices = logprobs[i].topk(params.logprobs)  # sorted, descending
                    top = [(self._token_text(t), v) for t, v in zip(indices.tolist(), values.tolist(), strict=True)]
            chosen.append((token, TokenInfo(token, self._token_text(token), logprob, top)))
        return chosen

    def _advance(self, row: _Row, token: int, info: TokenInfo) -> bool:
        """Add the token to the row and send what text is safe; True when the row has finished."""
        gen, params = row.gen, row.gen.params
        row.count += 1
        gen._completion_tokens = row.count
        if token in self._eos:
            return self._finish(row, "stop", None)
        row.ids.append(token)
        row.tokens.append(info)
        text = self._tokenizer.decode(row.ids, skip_special_tokens=True)
        if params.stop:
            hits = [at for at in (text.find(s, row.emitted) for s in params.stop) if at >= 0]
            if hits:
                return self._finish(row, "stop", text[: min(hits)])
        if row.count >= params.max_tokens:
            return self._finish(row, "length", text)
        end = _safe_end(text, row.emitted, params.stop)
        if end > row.emitted:
            self._emit(row, text[row.emitted : end])
            row.emitted = end
        return gen.done  # a cancel that raced in: drop the row

    def _emit(self, row: _Row, text: str) -> None:
        tokens, row.tokens = row.tokens, []
        row.gen._push(TextDelta(text, tokens))

    def _finish(self, row: _Row, reason: str, text: str | None) -> bool:
        """Send the rest of ``text`` (None: what was decoded so far) and Finished; always True."""
        if text is None:
            text = self._tokenizer.decode(row.ids, skip_special_tokens=True) if row.ids else ""
        rest = text[row.emitted :]
        if rest or row.tokens:
            self._emit(row, rest)
        row.emitted = len(text)
        if row.gen._push(Finished(reason, row.gen.prompt_tokens, row.count), final=True):
            self._release(row.gen, "served")
        return True
