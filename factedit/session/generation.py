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

The request handle (and how events cross from the worker thread to sync and async consumers) is in
handle.py, per-row sampling and text in sampling.py, the request and result types in generation_types.py.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..core.request import max_context
from .generation_types import GenerationError, GeneratorStats, QueueFullError, SamplingParams, is_int
from .handle import Generation
from .sampling import Row, Sampler

__all__ = ["BatchGenerator"]

logger = logging.getLogger(__name__)

_UNKNOWN_RETRY_S = 1.0  # retry_after when nothing runs yet to measure (e.g. an edit holds the lock)

_LIVE: weakref.WeakSet[BatchGenerator] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    # A worker thread still alive while the interpreter tears down aborts the process now and then
    # ("terminate called without an active exception" from torch's thread pools), so stop them first.
    for generator in list(_LIVE):
        generator.close(timeout=5)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    candidates.append(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    for value in candidates:
        if is_int(value):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if is_int(v))
    return frozenset(ids)


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
        if not is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not is_int(max_pending) or max_pending < 1:
            raise ValueError(f"max_pending must be an integer >= 1, got {max_pending!r}")
        if not math.isfinite(gather_s) or gather_s < 0:
            raise ValueError(f"gather_s must be >= 0, got {gather_s!r}")
        self._model = model
        self._read_lock = read_lock
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._gather_s = float(gather_s)

        embeddings = model.get_input_embeddings()
        self._device = embeddings.weight.device
        self._vocab = int(embeddings.num_embeddings)
        self._max_positions = max_context(model.config)
        eos = _eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        if not is_int(pad):  # the id is masked out, any valid one does
            pad = min(eos) if eos else 0
        self._pad_id: int = pad
        self._sampler = Sampler(tokenizer, eos)  # worker-only: token choice and text of each row

        self._lock = threading.Condition()  # guards everything below
        self._queue: deque[Generation] = deque()
        self._running: list[Generation] = []
        self._inflight = 0  # queued + running requests holding a slot
        self._slots: set[Generation] = set()  # those requests (a slot is freed once, when it ends)
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
        if not all(is_int(i) and 0 <= i < self._vocab for i in ids):
            bad = next(i for i in ids if not (is_int(i) and 0 <= i < self._vocab))
            raise ValueError(f"prompt token id {bad!r} is not in the vocabulary (0..{self._vocab - 1})")
        if self._max_positions is not None and len(ids) + params.max_tokens > self._max_positions:
            raise ValueError(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self._max_positions} tokens"
            )
        gen = Generation(ids, params, self._release)
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
            self._slots.add(gen)
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
            gen.fail(GenerationError("the generator was closed before this request ran"))
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
            if gen not in self._slots:
                return
            self._slots.discard(gen)
            self._inflight -= 1
            self._counts[outcome] += 1
            with contextlib.suppress(ValueError):  # cancelled while still queued
                self._queue.remove(gen)

    def _retry_after_locked(self) -> float:
        """Seconds until the earliest running request ends at the latest, if it runs to max_tokens."""
        step = self._step_s if self._step_s is not None else 0.05
        left = [g.params.max_tokens - g.completion_tokens for g in self._running if not g.done]
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
                    gen.fail(exc)
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
        rows = [self._sampler.row(g) for g in batch]
        with self._lock:
            self._counts["batches"] += 1
            self._counts["batched_rows"] += len(batch)
        try:
            with torch.inference_mode():
                self._decode(rows)
        finally:
            with self._lock:
                self._busy_s += time.perf_counter() - started

    def _decode(self, rows: list[Row]) -> None:
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
            chosen = self._sampler.choose(logits, rows)
            keep: list[int] = []
            live = 0
            for i, (row, (token, info)) in enumerate(zip(rows, chosen, strict=True)):
                if row.gen.done:  # cancelled since the last step
                    continue
                live += 1
                if not self._sampler.advance(row, token, info):
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
