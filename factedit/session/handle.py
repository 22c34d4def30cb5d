"""`Generation`: the handle of one submitted request, which a caller iterates (sync or async), awaits,
or cancels, and into which the engine's worker thread pushes events.

The events are kept in a list guarded by a condition variable: sync iteration waits on the condition,
async iteration registers an ``asyncio.Event`` that the worker sets with ``loop.call_soon_threadsafe``,
so the event loop never blocks. Leaving an iteration early (``break``, an exception, a cancelled task: a
client that disconnected) cancels the request and frees its slot."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

from .generation_types import Completion, Event, Finished, GenerationError, SamplingParams, TextDelta, TokenInfo

__all__ = ["Generation"]


@dataclass(frozen=True)
class _Failed:
    """The final event of a request that failed: raised to its consumers as GenerationError, never yielded."""

    error: BaseException


class Generation:
    """The handle of one submitted request: iterate it (sync or async) for events, or call ``result()``.

    Events are kept, so iterating twice (or iterating, then calling result) sees them all again.
    """

    def __init__(
        self, prompt_ids: list[int], params: SamplingParams, on_end: Callable[[Generation, str], None],
    ) -> None:
        """on_end(generation, outcome): called once when it ends ("served", "failed", "cancelled"): the
        engine frees its slot."""
        self.prompt_ids = prompt_ids
        self.params = params
        self.completion_tokens = 0  # written by the worker, read by cancel() and retry estimates
        self._on_end = on_end
        self._cond = threading.Condition()
        self._events: list[TextDelta | Finished | _Failed] = []
        self._done = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

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
        finished = Finished("cancelled", self.prompt_tokens, self.completion_tokens)
        if self.push(finished, final=True):
            self._on_end(self, "cancelled")

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

    # -- worker side: the engine's worker thread reports through these

    def push(self, event: TextDelta | Finished | _Failed, *, final: bool = False) -> bool:
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

    def finish(self, event: Finished) -> None:
        """End with ``event`` and free the slot as served; nothing if the request was cancelled meanwhile."""
        if self.push(event, final=True):
            self._on_end(self, "served")

    def fail(self, error: BaseException) -> None:
        """End with ``error`` (raised to consumers as GenerationError) and free the slot as failed."""
        if self.push(_Failed(error), final=True):
            self._on_end(self, "failed")


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
