"""Where a locate-then-edit method reads and writes: the subject's last token, in every text it runs
(also where subject-anchored fine-tuning lets its loss reach the edited block: batches.anchored_batch).

("last" instead reads and writes at the prompt's last token: MEMIT's fact_token option.)
Key rows: each request's prompt under each context prefix (the first prefix is empty: the prompt
alone). Value rows: the same followed by the target (labelled), optionally the prompt asked through the
chat template with the target as the reply, then one row of `kl_prompt` about the subject. Every row
carries the position of the subject's last token and the request it belongs to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedTokenizerBase

from ..core.request import TokenizedRequest, find_subject, subject_span
from ..model.contexts import in_chat, reply_ids, subject_positions, token_at
from .padding import IGNORE
from .sequences import pad_id_of, pad_sequences

SUBJECT_LAST, LAST = "subject_last", "last"  # where keys are read and values written


@dataclass(frozen=True)
class Rows:
    """A right-padded batch of texts with the subject's last token in each."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    subject: torch.Tensor  # (B,) long: position of the subject's last token
    owner: torch.Tensor  # (B,) long: the request (index into the requests) the row belongs to
    labels: torch.Tensor  # (B, T): target ids at target positions, IGNORE elsewhere (key rows: all IGNORE)
    kl: torch.Tensor  # (B,) bool: a kl_prompt row
    chat: torch.Tensor  # (B,) bool: the fact asked as a chat (chat_row)

    def to(self, device: torch.device) -> Rows:
        return Rows(*(t.to(device) for t in self._fields()))

    def subset(self, keep: torch.Tensor) -> Rows:
        """The rows `keep` (B,) bool, in order (padding as it was)."""
        return Rows(*(t[keep] for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.attention_mask, self.subject, self.owner, self.labels, self.kl, self.chat)


def subject_of(request: TokenizedRequest) -> str:
    """The request's subject, or the one `find_subject` reads in its prompt."""
    return request.request.subject if request.request.subject is not None else find_subject(request.request.prompt)


@dataclass(frozen=True)
class _Item:
    ids: list[int]
    subject: int  # index of the subject's last token (or the read position) in ids
    owner: int  # the request
    target: list[int]  # labelled after ids (empty: a key or KL row)
    kl: bool = False
    chat: bool = False


def _batch(tokenizer: PreTrainedTokenizerBase, items: Sequence[_Item], context_length: int | None = None) -> Rows:
    """The items as one batch, those longer than `context_length` left out: a context (prefix, chat
    template) that would not fit the model. Each request's prompt alone fits (the request was checked)."""
    if context_length is not None:
        items = [i for i in items if len(i.ids) + len(i.target) <= context_length]
    ids, mask = pad_sequences([list(i.ids) + list(i.target) for i in items], pad_id_of(tokenizer))
    labels = torch.full_like(ids, IGNORE)
    for row, item in enumerate(items):
        labels[row, len(item.ids) : len(item.ids) + len(item.target)] = torch.tensor(item.target, dtype=torch.long)
    flags = {name: torch.tensor([getattr(i, name) for i in items], dtype=torch.bool) for name in ("kl", "chat")}
    return Rows(ids, mask, torch.tensor([i.subject for i in items]), torch.tensor([i.owner for i in items]), labels,
                **flags)


def positions(
    tokenizer: PreTrainedTokenizerBase, prefixes: Sequence[str], prompt: str, subject: str, position: str,
) -> list[tuple[list[int], int]]:
    """(ids, read position) of `prompt` under each prefix: the subject's last token ("subject_last"), or
    the prompt's last token ("last", MEMIT's fact_token="last")."""
    found = subject_positions(tokenizer, prefixes, prompt, subject_span(prompt, subject))
    return found if position == SUBJECT_LAST else [(ids, len(ids) - 1) for ids, _ in found]


def key_rows(
    tokenizer: PreTrainedTokenizerBase, prefixes: Sequence[str], requests: Sequence[TokenizedRequest],
    position: str = "subject_last", context_length: int | None = None,
) -> Rows:
    """Each request's prompt under each prefix (rows request-major, prefix-minor), no target, cut after
    the read position: with causal attention nothing after it changes what is read there. Rows longer
    than `context_length` are left out."""
    items = []
    for owner, request in enumerate(requests):
        for ids, index in positions(tokenizer, prefixes, request.request.prompt, subject_of(request), position):
            items.append(_Item(ids[: index + 1], index, owner, []))
    return _batch(tokenizer, items, context_length)


def chat_row(
    tokenizer: PreTrainedTokenizerBase, request: TokenizedRequest, owner: int, position: str = "subject_last",
) -> _Item | None:
    """The request asked as a chat (`in_chat`), the assistant's reply starting with the target; None
    when the tokenizer has no chat template."""
    prompt = request.request.prompt.strip()
    chat = in_chat(tokenizer, prompt)
    if chat is None:
        return None
    text, offset = chat
    ids, index = token_at(tokenizer, text, offset + subject_span(prompt, subject_of(request))[1], special_tokens=False)
    return _Item(ids, index if position == SUBJECT_LAST else len(ids) - 1, owner,
                 reply_ids(tokenizer, request.request.target), chat=True)


def value_rows(
    tokenizer: PreTrainedTokenizerBase, prefixes: Sequence[str], requests: Sequence[TokenizedRequest],
    kl_prompt: str | None, position: str = "subject_last", chat: bool = False, context_length: int | None = None,
) -> Rows:
    """Each request's prompt + target under each prefix, then (with `chat`, when the tokenizer has a
    chat template) the request asked as a chat (`chat_row`), then (with `kl_prompt`) its KL row. Rows
    longer than `context_length` are left out."""
    items = []
    for owner, request in enumerate(requests):
        subject = subject_of(request)
        for ids, index in positions(tokenizer, prefixes, request.request.prompt, subject, position):
            items.append(_Item(ids, index, owner, list(request.target_ids)))
        asked = chat_row(tokenizer, request, owner, position) if chat else None
        if asked is not None:
            items.append(asked)
        if kl_prompt is not None:
            start = kl_prompt.index("{}")
            ids, index = token_at(tokenizer, kl_prompt.replace("{}", subject), start + len(subject))
            items.append(_Item(ids, index if position == SUBJECT_LAST else len(ids) - 1, owner, [], kl=True))
    return _batch(tokenizer, items, context_length)


def continued(rows: Rows, tails: Sequence[Sequence[int]], pad_id: int) -> Rows:
    """`rows` with `tails[b]` appended after row b's text, unlabelled (what a model says after the target,
    for a term that holds it: values.selection(after=True) reads every position from the target's last
    token on)."""
    lengths = rows.attention_mask.sum(1).tolist()
    pairs = enumerate(zip(lengths, tails, strict=True))
    texts = [rows.input_ids[b, :n].tolist() + list(tail) for b, (n, tail) in pairs]
    ids, mask = pad_sequences(texts, pad_id)
    labels = torch.full_like(ids, IGNORE)
    labels[:, : rows.labels.shape[1]] = rows.labels
    return replace(rows, input_ids=ids, attention_mask=mask, labels=labels)


def first_rows(owner: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) long: the index of each owner's first row (rows are grouped by owner, in order)."""
    first = torch.full((n,), -1, dtype=torch.long, device=owner.device)
    positions = torch.arange(owner.shape[0], device=owner.device)
    return first.scatter_reduce(0, owner, positions, reduce="amin", include_self=False)
