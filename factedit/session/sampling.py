"""Per-row decoding for the batch engine: pick each row's next token (greedy, or sampled with the row's
temperature / top_p / seeded generator; logprobs on request) and turn its ids into text, ending the row at
eos, a stop string or max_tokens.

*Sampling* goes through transformers' logits warpers (temperature, then top-p) and a multinomial draw
with the row's seeded generator.

*Text.* Each row's text grows token by token through the tokenizers library's incremental decoder
(`tokenizers.decoders.DecodeStream`: a token's text is read from a short window of ids, not from the
whole list again, so a reply of n tokens costs O(n), not O(n²)); a tokenizer without it (a slow one, or
one that cleans up spaces after decoding) re-decodes the list. The row emits the new suffix, holding back
a trailing incomplete UTF-8 character (decoded as '\\ufffd') and any tail that could be the beginning of a
stop string; when it ends, the whole id list is decoded once and the rest of that text is sent, so
``result().text`` is the concatenation of the deltas by construction and streaming and non-streaming
output agree exactly. Eos tokens end a row without adding text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from .generation_types import Finished, TextDelta, TokenInfo
from .handle import Generation

__all__ = ["Row", "Sampler", "TextSoFar"]


class TextSoFar:
    """The decoded text (special tokens skipped) of a growing list of ids; see the module docstring."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        incremental = isinstance(backend, Tokenizer) and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._backend = backend if incremental else None
        self._stream = DecodeStream(skip_special_tokens=True) if incremental else None
        self.ids: list[int] = []
        self.text = ""

    def add(self, token: int) -> str:
        """Append `token`; the text so far (a partial character at the end may still be missing)."""
        self.ids.append(token)
        if self._stream is None:
            self.text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        else:
            self.text += self._stream.step(self._backend, token) or ""
        return self.text

    def final(self) -> str:
        """The whole list decoded at once: what a non-streaming caller gets."""
        return self._tokenizer.decode(self.ids, skip_special_tokens=True) if self.ids else ""


class Row:
    """Decoding state of one request inside a running batch."""

    __slots__ = ("count", "emitted", "gen", "rng", "text", "tokens", "warpers")

    def __init__(self, gen: Generation, tokenizer: Any) -> None:
        seed = gen.params.seed
        self.gen = gen
        self.rng = torch.Generator().manual_seed(seed) if seed is not None else None  # None: the sampler's
        self.text = TextSoFar(tokenizer)  # generated ids (eos excluded) and their text
        self.count = 0  # generated tokens, eos included
        self.emitted = 0  # characters of the decoded text already sent
        self.tokens: list[TokenInfo] = []  # not yet attached to a delta
        params = gen.params  # built once a row: a sampled row's warpers (None: greedy)
        self.warpers = _warpers(params.temperature, params.top_p) if params.temperature > 0 else None


class Sampler:
    """Chooses the next token of each row and sends the row's text; used by the engine's worker thread only.

    tokenizer: decodes ids to text. eos: the ids that end a row (with finish_reason "stop", adding no text).
    """

    def __init__(self, tokenizer: Any, eos: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self._eos = eos
        self._token_texts: dict[int, str] = {}  # single-token texts, decoded once
        self._rng = torch.Generator()  # unseeded requests; private so the global RNG is left alone
        self._rng.seed()

    def row(self, gen: Generation) -> Row:
        """The decoding state of a request joining the batch."""
        return Row(gen, self._tokenizer)

    def choose(self, logits: torch.Tensor, rows: list[Row]) -> list[tuple[int, TokenInfo]]:
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
                warped = row.warpers(None, logits[i : i + 1])  # (1, vocab)
                probs = torch.softmax(warped, dim=-1)[0]  # (vocab,); filtered tokens at -inf get 0
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

    def advance(self, row: Row, token: int, info: TokenInfo) -> bool:
        """Add the token to the row and send what text is safe; True when the row has finished."""
        gen, params = row.gen, row.gen.params
        row.count += 1
        gen.completion_tokens = row.count
        if token in self._eos:
            return self._finish(row, "stop", None)
        row.tokens.append(info)
        text = row.text.add(token)
        if params.stop:
            hits = [at for at in (text.find(s, row.emitted) for s in params.stop) if at >= 0]
            if hits:
                return self._finish(row, "stop", text[: min(hits)])
        if row.count >= params.max_tokens:
            return self._finish(row, "length", None)
        end = _safe_end(text, row.emitted, params.stop)
        if end > row.emitted:
            self._emit(row, text[row.emitted : end])
            row.emitted = end
        return gen.done  # a cancel that raced in: drop the row

    def _emit(self, row: Row, text: str) -> None:
        tokens, row.tokens = row.tokens, []
        row.gen.push(TextDelta(text, tokens))

    def _finish(self, row: Row, reason: str, text: str | None) -> bool:
        """Send the rest of ``text`` (None: what was decoded so far) and Finished; always True."""
        if text is None:
            text = row.text.final()
        rest = text[row.emitted :]
        if rest or row.tokens:
            self._emit(row, rest)
        row.emitted = len(text)
        row.gen.finish(Finished(reason, row.gen.prompt_tokens, row.count))
        return True

    def _token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            text = self._tokenizer.decode([token], skip_special_tokens=False)
            self._token_texts[token] = text
        return text


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


def _warpers(temperature: float, top_p: float) -> LogitsProcessorList:
    """transformers' warpers for one row: temperature, then (below 1) top-p, as `generate` orders them."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers
