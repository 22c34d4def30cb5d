"""The batching generation engine: batched greedy equals generate(), streaming text, stop/eos/length,
sampling, logprobs, slots and cancel, the read lock around a batch, worker errors, asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import pytest
import torch
from tiny_models import ARCHS, tiny_model

from factedit.session.generation import BatchGenerator
from factedit.session.generation_types import Finished, GenerationError, QueueFullError, SamplingParams, TextDelta
from factedit.session.handle import Generation

PROMPTS = ["The capital of France is", "Hi", "Michael Jordan plays the sport of basketball and"]
GREEDY = SamplingParams(max_tokens=12, temperature=0)
WAIT = 30  # seconds: generous on a shared CPU; the tiny model needs far less


class Gate:
    """A read-lock factory the test can hold shut: the worker takes its batch only once it holds the lock,
    so everything submitted while the test holds it lands in one batch."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self) -> threading.Lock:
        return self.lock


@contextlib.contextmanager
def engine(model, tok, read_lock=contextlib.nullcontext, **kwargs) -> Iterator[BatchGenerator]:
    gen = BatchGenerator(model, tok, read_lock, **kwargs)
    try:
        yield gen
    finally:
        gen.close()


def submit_together(gen: BatchGenerator, gate: Gate, items: list[tuple[list[int], SamplingParams]]) -> list[Generation]:
    with gate.lock:
        return [gen.submit(ids, params) for ids, params in items]


def events_of(handle: Generation) -> tuple[list[TextDelta], Finished]:
    events = list(handle)
    assert isinstance(events[-1], Finished) and all(isinstance(e, TextDelta) for e in events[:-1])
    return events[:-1], events[-1]


def forced_tokens(model, script: list[int]):
    """Make the model emit ``script`` (one token per forward call, batch of one); returns the hook handle."""
    calls = {"n": 0}

    def hook(module, args, output):
        n = calls["n"]
        calls["n"] += 1
        if n < len(script):
            logits = torch.full_like(output.logits, -1e4)
            logits[..., script[n]] = 0.0
            output.logits = logits
        return output

    return model.register_forward_hook(hook)


def block_at_call(model, call: int) -> tuple[threading.Event, threading.Event]:
    """Make forward call number ``call`` (0 = prefill) wait for ``release``; ``entered`` is set when it is reached."""
    entered, release = threading.Event(), threading.Event()
    calls = {"n": 0}

    def hook(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] - 1 == call:
            entered.set()
            assert release.wait(WAIT)

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return entered, release


def reference(model, tok, ids: list[int], max_new: int) -> list[int]:
    """model.generate on one prompt alone, cut after its first eos."""
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new,
        pad_token_id=tok.pad_token_id,
    )[0, len(ids) :].tolist()
    return out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out


def generated_ids(completion, eos: int) -> list[int]:
    ids = [t.id for t in completion.tokens]
    return [*ids, eos] if completion.finish_reason == "stop" else ids


# ---------------------------------------------------------------------------------------------------
# Batched greedy decoding is exact


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_batch_equals_generate_alone(arch):
    """Prompts of different lengths (and different max_tokens, so rows leave the cache early) in one batch give
    exactly the tokens model.generate gives each prompt alone: left padding, positions and the cache are right."""
    model, tok = tiny_model(arch)
    prompts = [tok.encode(p) for p in PROMPTS]
    budgets = [20, 3, 9]
    gate = Gate()
    with engine(model, tok, gate) as gen:
        handles = submit_together(gen, gate, [(p, SamplingParams(max_tokens=n, temperature=0))
                                              for p, n in zip(prompts, budgets, strict=True)])
        results = [h.result(WAIT) for h in handles]
        stats = gen.stats
    assert stats.batches == 1 and stats.mean_batch_size == 3
    for ids, n, result in zip(prompts, budgets, results, strict=True):
        assert generated_ids(result, tok.eos_token_id) == reference(model, tok, ids, n)
        assert result.prompt_tokens == len(ids)
    assert stats.tokens_generated == sum(r.completion_tokens for r in results)
    assert stats.requests_served == 3 and stats.pending == 0


# ---------------------------------------------------------------------------------------------------
# Text: streaming, UTF-8, stop strings, eos, length


def test_stream_concatenates_to_result_and_to_non_streaming_text():
    """A random model emits stray bytes (broken UTF-8): deltas still add up to result().text, and a separate
    non-streaming run with the same seed gives the same text; no delta but the last ends mid-character."""
    model, tok = tiny_model("llama")
    prompt = tok.encode(PROMPTS[0])
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=7)
    with engine(model, tok) as gen:
        streamed = gen.submit(prompt, params)
        deltas, finished = events_of(streamed)
        again = gen.submit(prompt, params).result(WAIT)
    text = "".join(d.text for d in deltas)
    assert text == streamed.result().text == again.text
    assert [t.id for d in deltas for t in d.tokens] == [t.id for t in again.tokens]
    assert finished.completion_tokens == again.completion_tokens
    assert not any(d.text.endswith("\ufffd") for d in deltas[:-1])


def test_incomplete_utf8_character_is_held_back():
    model, tok = tiny_model("llama")
    script = tok.encode("aé b")  # "é" is two byte tokens
    assert len(script) == 4
    forced_tokens(model, script)
    with engine(model, tok) as gen:
        deltas, finished = events_of(gen.submit(tok.encode("Hi"), SamplingParams(max_tokens=4, temperature=0)))
    assert [d.text for d in deltas] == ["a", "é", " b"]
    assert [len(d.tokens) for d in deltas] == [1, 2, 1]  # the first byte's token waits for its character
    assert finished.finish_reason == "length"


def test_text_grows_incrementally_and_agrees_with_a_whole_decode():
    """The fast tokenizer's text comes from tokenizers' DecodeStream (one step per token, not the whole list
    again); it, the re-decoding fallback and `final` give the text a whole decode gives, at every length."""
    from factedit.session.sampling import TextSoFar

    _, tok = tiny_model("llama")
    ids = tok.encode("aé b, Paris ñandú 日本")
    incremental, fallback = TextSoFar(tok), TextSoFar(tok)
    fallback._stream = None  # what a tokenizer without DecodeStream gets
    assert incremental._stream is not None
    for n, token in enumerate(ids, start=1):
        whole = tok.decode(ids[:n], skip_special_tokens=True)
        assert fallback.add(token) == whole
        grown = incremental.add(token)
        assert whole.startswith(grown) and len(whole.rstrip("\ufffd")) == len(grown)  # only a partial character waits
    assert incremental.text == incremental.final() == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ((" Paris",), "The capital of France is"),
        (("of France", "capital"), "The "),  # the earliest match wins, whatever the order
        (("ital o",), "The cap"),  # a stop string that spans tokens
        ((" Pax",), "The capital of France is Paris."),  # held back as a possible stop, then released
    ],
)
def test_stop_strings(stop, expected):
    model, tok = tiny_model("llama")
    script = tok.encode("The capital of France is Paris.")
    forced_tokens(model, script)
    with engine(model, tok) as gen:
        handle = gen.submit(tok.encode("Hi"), SamplingParams(max_tokens=len(script), temperature=0, stop=stop))
        deltas, finished = events_of(handle)
    assert "".join(d.text for d in deltas) == handle.result().text == expected
    assert finished.finish_reason == ("length" if expected.endswith("Paris.") else "stop")


def test_eos_stops_and_is_counted_but_not_shown():
    model, tok = tiny_model("llama")
    words = tok.encode(" Paris is")
    forced_tokens(model, [*words, tok.eos_token_id, *words])
    with engine(model, tok) as gen:
        result = gen.submit(tok.encode("Hi"), SamplingParams(max_tokens=10, temperature=0)).result(WAIT)
    assert (result.text, result.finish_reason) == (" Paris is", "stop")
    assert result.completion_tokens == len(words) + 1 and len(result.tokens) == len(words)


def test_generation_config_eos_ids_stop_too():
    model, tok = tiny_model("llama")
    words = tok.encode(" Paris is Rome")
    model.generation_config.eos_token_id = [tok.eos_token_id, words[2]]
    forced_tokens(model, words)
    with engine(model, tok) as gen:
        result = gen.submit(tok.encode("Hi"), SamplingParams(max_tokens=10, temperature=0)).result(WAIT)
    assert (result.text, result.finish_reason) == (tok.decode(words[:2]), "stop")


def test_max_tokens_gives_length():
    model, tok = tiny_model("gpt2")
    with engine(model, tok) as gen:
        result = gen.submit(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=5, temperature=0.7, seed=1)).result(WAIT)
    assert result.finish_reason == "length" and result.completion_tokens == 5 == len(result.tokens)


# ---------------------------------------------------------------------------------------------------
# Sampling and logprobs


def test_seeded_sampling_is_reproducible():
    model, tok = tiny_model("llama")
    prompt = tok.encode(PROMPTS[0])
    gate = Gate()
    with engine(model, tok, gate) as gen:
        alone = gen.submit(prompt, SamplingParams(max_tokens=20, seed=3)).result(WAIT)
        twins = submit_together(gen, gate, [(prompt, SamplingParams(max_tokens=20, seed=3))] * 2)
        other = gen.submit(prompt, SamplingParams(max_tokens=20, seed=4)).result(WAIT)
        a, b = (h.result(WAIT) for h in twins)
    ids = [t.id for t in alone.tokens]
    assert [t.id for t in a.tokens] == [t.id for t in b.tokens] == ids
    assert [t.id for t in other.tokens] != ids


def test_tiny_top_p_is_greedy():
    model, tok = tiny_model("llama")
    prompt = tok.encode(PROMPTS[2])
    with engine(model, tok) as gen:
        greedy = gen.submit(prompt, SamplingParams(max_tokens=15, temperature=0)).result(WAIT)
        nucleus = gen.submit(prompt, SamplingParams(max_tokens=15, temperature=1.5, top_p=1e-6)).result(WAIT)
    assert [t.id for t in nucleus.tokens] == [t.id for t in greedy.tokens]


@pytest.mark.parametrize("temperature", [0.0, 1.3])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logprobs_match_a_direct_forward(arch, temperature):
    """Chosen-token logprobs and the top-k are log_softmax of the raw logits (temperature ignored), for rows of a
    left-padded batch too (gpt2's learned absolute positions make this check the explicit position_ids)."""
    model, tok = tiny_model(arch)
    prompts = [tok.encode(PROMPTS[0]), tok.encode(PROMPTS[1])]
    gate = Gate()
    with engine(model, tok, gate) as gen:
        handles = submit_together(
            gen, gate, [(p, SamplingParams(max_tokens=6, temperature=temperature, seed=0, logprobs=5)) for p in prompts]
        )
        results = [h.result(WAIT) for h in handles]
        plain = gen.submit(prompts[0], SamplingParams(max_tokens=2, logprobs=0)).result(WAIT)
        none = gen.submit(prompts[0], SamplingParams(max_tokens=2)).result(WAIT)
    for prompt, result in zip(prompts, results, strict=True):
        ids = list(prompt)
        for token in result.tokens:
            with torch.no_grad():
                expected = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            assert token.logprob == pytest.approx(float(expected[token.id]), abs=1e-4)
            values, indices = expected.topk(5)
            assert [text for text, _ in token.top] == [tok.decode([i]) for i in indices.tolist()]
            assert [lp for _, lp in token.top] == pytest.approx(values.tolist(), abs=1e-4)
            assert [lp for _, lp in token.top] == sorted((lp for _, lp in token.top), reverse=True)
            ids.append(token.id)
    assert all(t.logprob is not None and t.top == [] for t in plain.tokens)
    assert all(t.logprob is None and t.top == [] for t in none.tokens)


# ---------------------------------------------------------------------------------------------------
# Slots, cancel, close


def test_queue_full_until_a_running_request_is_cancelled():
    model, tok = tiny_model("llama")
    entered, release = block_at_call(model, 2)
    prompt = tok.encode(PROMPTS[0])
    with engine(model, tok, max_pending=1) as gen:
        first = gen.submit(prompt, SamplingParams(max_tokens=20, temperature=0))
        assert entered.wait(WAIT)  # first is mid-batch
        with pytest.raises(QueueFullError) as info:
            gen.submit(prompt, GREEDY)
        assert info.value.retry_after > 0
        first.cancel()  # frees the slot now, though the worker is still inside forward
        second = gen.submit(prompt, GREEDY)
        release.set()
        assert first.result(WAIT).finish_reason == "cancelled"
        assert second.result(WAIT).finish_reason == "length"
        third = gen.submit(prompt, GREEDY)  # a finished request frees its slot too
        assert third.result(WAIT).finish_reason == "length"
        stats = gen.stats
    assert (stats.requests_cancelled, stats.requests_served, stats.requests_rejected) == (1, 2, 1)
    assert stats.pending == 0


def test_cancel_while_queued_and_break_out_of_iteration():
    model, tok = tiny_model("llama")
    prompt = tok.encode(PROMPTS[0])
    gate = Gate()
    with engine(model, tok, gate, max_pending=1) as gen:
        with gate.lock:
            queued = gen.submit(prompt, GREEDY)
            with pytest.raises(QueueFullError):
                gen.submit(prompt, GREEDY)
            queued.cancel()
            assert gen.stats.pending == 0
        assert queued.result(WAIT).finish_reason == "cancelled"
        handle = gen.submit(prompt, SamplingParams(max_tokens=50, temperature=0))
        for _event in handle:
            break  # leaving the iteration early cancels the request
        assert handle.done and handle.result().finish_reason == "cancelled"
        assert gen.submit(prompt, GREEDY).result(WAIT).finish_reason == "length"


def test_close_fails_queued_requests_and_refuses_new_ones():
    model, tok = tiny_model("llama")
    gate = Gate()
    gen = BatchGenerator(model, tok, gate)
    with gate.lock:
        queued = gen.submit(tok.encode("Hi"), GREEDY)
        gen.close(timeout=0)
        with pytest.raises(GenerationError, match="closed"):
            queued.result(WAIT)
        with pytest.raises(GenerationError, match="closed"):
            list(queued)
    gen.close()
    with pytest.raises(GenerationError, match="closed"):
        gen.submit(tok.encode("Hi"), GREEDY)


def test_close_fails_the_running_batch():
    model, tok = tiny_model("llama")
    entered, release = block_at_call(model, 2)
    gen = BatchGenerator(model, tok, contextlib.nullcontext)
    running = gen.submit(tok.encode("Hi"), SamplingParams(max_tokens=20, temperature=0))
    assert entered.wait(WAIT)
    gen.close(timeout=0)
    release.set()
    with pytest.raises(GenerationError, match="closed during generation"):
        running.result(WAIT)
    gen._thread.join(WAIT)
    assert not gen._thread.is_alive() and gen.stats.pending == 0


# ---------------------------------------------------------------------------------------------------
# The read lock, worker errors


class RecordingRWLock:
    """A writer-preferring readers–writer lock that logs who holds it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.readers = 0
        self.writing = False
        self.writers_waiting = 0
        self.log: list[str] = []

    @contextlib.contextmanager
    def read(self):
        with self.cond:
            self.cond.wait_for(lambda: not self.writing and not self.writers_waiting)
            self.readers += 1
            self.log.append("read-enter")
        try:
            yield
        finally:
            with self.cond:
                self.readers -= 1
                self.log.append("read-exit")
                self.cond.notify_all()

    @contextlib.contextmanager
    def write(self):
        with self.cond:
            self.writers_waiting += 1
            self.cond.wait_for(lambda: not self.writing and self.readers == 0)
            self.writers_waiting -= 1
            self.writing = True
            self.log.append("write-enter")
        try:
            yield
        finally:
            with self.cond:
                self.writing = False
                self.log.append("write-exit")
                self.cond.notify_all()


def test_read_lock_is_held_for_the_whole_batch():
    model, tok = tiny_model("llama")
    rw = RecordingRWLock()

    def check(module, args, kwargs):
        assert rw.readers == 1 and not rw.writing
        rw.log.append("forward")

    model.register_forward_pre_hook(check, with_kwargs=True)
    entered, release = block_at_call(model, 3)
    with engine(model, tok, rw.read) as gen:
        handle = gen.submit(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=8, temperature=0))
        assert entered.wait(WAIT)
        wrote = threading.Event()

        def edit():
            with rw.write():
                wrote.set()

        writer = threading.Thread(target=edit)
        writer.start()
        assert not wrote.wait(0.3)  # the edit waits for the batch
        release.set()
        result = handle.result(WAIT)
        writer.join(WAIT)
        after = gen.submit(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=8, temperature=0)).result(WAIT)
    assert wrote.is_set() and result.finish_reason == "length" and after.text == result.text
    first_batch = rw.log[: rw.log.index("read-exit") + 1]
    assert first_batch == ["read-enter"] + ["forward"] * 8 + ["read-exit"]  # prefill + 7 steps, all under the lock
    assert rw.log[len(first_batch) :][:2] == ["write-enter", "write-exit"]  # the edit came between the batches


def test_worker_error_reaches_every_row_and_the_worker_goes_on():
    model, tok = tiny_model("llama")
    calls = {"n": 0}

    def explode_once(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first decode step of the first batch
            raise RuntimeError("boom")

    model.register_forward_pre_hook(explode_once, with_kwargs=True)
    gate = Gate()
    with engine(model, tok, gate) as gen:
        doomed = submit_together(gen, gate, [(tok.encode(p), GREEDY) for p in PROMPTS[:2]])
        for handle in doomed:
            with pytest.raises(GenerationError, match="boom") as info:
                handle.result(WAIT)
            assert isinstance(info.value.__cause__, RuntimeError)
            with pytest.raises(GenerationError, match="boom"):
                list(handle)
        assert gen.submit(tok.encode(PROMPTS[0]), GREEDY).result(WAIT).completion_tokens == GREEDY.max_tokens
        stats = gen.stats
    assert (stats.requests_failed, stats.requests_served, stats.pending) == (2, 1, 0)


# ---------------------------------------------------------------------------------------------------
# asyncio


def test_async_iteration_matches_sync_and_does_not_block_the_loop():
    model, tok = tiny_model("llama")
    prompts = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=30, temperature=0)
    with engine(model, tok) as gen:
        expected = [gen.submit(p, params).result(WAIT).text for p in prompts]

        async def stream(ids: list[int]) -> str:
            parts = []
            async for event in gen.submit(ids, params):
                if isinstance(event, TextDelta):
                    parts.append(event.text)
            return "".join(parts)

        async def main() -> tuple[list[str], str, int]:
            ticks = 0
            done = False

            async def ticker() -> None:
                nonlocal ticks
                while not done:
                    ticks += 1
                    await asyncio.sleep(0.001)

            tick_task = asyncio.create_task(ticker())
            texts = await asyncio.gather(*(stream(p) for p in prompts))
            collected = await gen.submit(prompts[0], params).aresult()
            done = True
            await tick_task
            return list(texts), collected.text, ticks

        texts, collected, ticks = asyncio.run(main())
    assert texts == expected and collected == expected[0]
    assert ticks > 1


def test_cancelling_the_consuming_task_cancels_the_request():
    model, tok = tiny_model("llama")
    entered, release = block_at_call(model, 2)
    with engine(model, tok, max_pending=1) as gen:

        async def main() -> Generation:
            handle = gen.submit(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=20, temperature=0))

            async def consume() -> None:
                async for _event in handle:
                    pass

            task = asyncio.create_task(consume())
            await asyncio.to_thread(entered.wait, WAIT)
            task.cancel()  # what a web framework does when the client disconnects
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return handle

        handle = asyncio.run(main())
        assert handle.done and gen.stats.pending == 0
        release.set()
        assert handle.result(WAIT).finish_reason == "cancelled"
        assert gen.submit(tok.encode("Hi"), GREEDY).result(WAIT).finish_reason == "length"


# ---------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=0),
        dict(max_tokens=2.5),
        dict(max_tokens=True),
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(stop=("",)),
        dict(stop=(1,)),
        dict(stop=("x",) * 17),
        dict(logprobs=21),
        dict(logprobs=-1),
        dict(seed=1.5),
        dict(seed=2**64),
    ],
)
def test_sampling_params_are_validated(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampling_params_normalise():
    params = SamplingParams(stop="\n", temperature=0, top_p=1)
    assert params.stop == ("\n",) and isinstance(params.temperature, float) and isinstance(params.top_p, float)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_submit_refuses_prompts_that_do_not_fit():
    model, tok = tiny_model("gpt2")  # the context is n_positions = 128
    with engine(model, tok) as gen:
        assert gen.max_context == 128
        with pytest.raises(ValueError, match="context of 128"):
            gen.submit([5] * 120, SamplingParams(max_tokens=9))
        with pytest.raises(ValueError, match="empty"):
            gen.submit([], GREEDY)
        with pytest.raises(ValueError, match="vocabulary"):
            gen.submit([len(tok) + 5], GREEDY)
        assert gen.submit([5] * 120, SamplingParams(max_tokens=8, temperature=0)).result(WAIT).completion_tokens == 8
