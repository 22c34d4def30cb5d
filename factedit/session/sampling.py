"""Per-row decoding for the batch engine: pick each row's next token (greedy, or sampled with the row's
temperature / top_p / seeded generator; logprobs on request) and turn its ids into text, ending the row at
eos, a stop string or max_tokens.

*Text.* Each row decodes its whole generated id list at every step and emits the new suffix, holding back
a trailing incomplete UTF-8 character (decoded as '\\ufffd') and any tail that could be the beginning of a
stop string. ``result().text`` is the concatenation of the deltas by construction, so streaming and
non-streaming output agree exactly. Eos tokens end a row without adding text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .generation_types import Finished, TextDelta, TokenInfo
from .handle import Generation

__all__ = ["Row", "Sampler"]


class Row:
    """Decoding state of one request inside a running batch."""

    __slots__ = ("count", "emitted", "gen", "ids", "rng", "tokens")

    def __init__(self, gen: Generation) -> None:
        seed = gen.params.seed
        self.gen = gen
        self.rng = torch.Generator().manual_seed(seed) if seed is not None else None  # None: the sampler's
        self.ids: list[int] = []  # generated ids, eos excluded
        self.count = 0  # generated tokens, eos included
        self.emitted = 0  # characters of the decoded text already sent
        self.tokens: list[TokenInfo] = []  # not yet attached to a delta


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

    def advance(self, row: Row, token: int, info: TokenInfo) -> bool:
        """Add the token to the row and send what text is safe; True when the row has finished."""
        gen, params = row.gen, row.gen.params
        row.count += 1
        gen.completion_tokens = row.count
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

    def _emit(self, row: Row, text: str) -> None:
        tokens, row.tokens = row.tokens, []
        row.gen.push(TextDelta(text, tokens))

    def _finish(self, row: Row, reason: str, text: str | None) -> bool:
        """Send the rest of ``text`` (None: what was decoded so far) and Finished; always True."""
        if text is None:
            text = self._tokenizer.decode(row.ids, skip_special_tokens=True) if row.ids else ""
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


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p (the first always stays)."""
    sorted_p, order = probs.sort(descending=True)  # (vocab,)
    keep = (sorted_p.cumsum(0) - sorted_p) < top_p  # mass before each token is still short of top_p
    filtered = torch.zeros_like(probs)
    filtered[order[keep]] = sorted_p[keep]
    return filtered
