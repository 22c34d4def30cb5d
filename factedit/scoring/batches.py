"""Labelled batches of edit requests and their target loss, shared by the editors that train or take a
gradient (the fine-tuning family, MEND).

Training text is `prompt + target` for every request, right-padded; the loss is the mean negative
log-likelihood of the target tokens.

With context prefixes (`prefixed_batch`, MEMIT's context templates from contexts.py) each request also
trains under each prefix: rows `prefix + ". " + prompt + target`, request-major and prefix-minor, the
prompt alone first. All rows of a request share its target ids (the join rule depends only on the
prompt's end), so the token mean is the mean over its contexts. With `chat` a request also trains asked
through the chat template, its target (without the leading space) as the start of the reply. The stop
check reads the prompt-alone rows only: the edit is done when the prompt itself gives the target.

Anchored (`anchored=True`, subject-anchored fine-tuning): the same rows built as the locate-then-edit
family builds its value rows (scoring/positions.py), each carrying the position of the subject's last
token, where a fine-tuning editor lets the loss reach the edited block (peft/training.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.errors import InvalidRequestError
from ..core.request import TokenizedRequest, encode_prompt, max_context, subject_span
from ..model.contexts import ContextPrefixes, ids_as_written, in_chat, in_context, reply_ids, subject_positions
from .padding import IGNORE
from .positions import chat_row, first_rows, subject_of, value_rows
from .sequences import logits_at, pad_id_of, pad_sequences

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): target ids at target positions, IGNORE elsewhere
    stop: torch.Tensor | None = None  # (B,) bool: rows the stop check reads (the prompt alone); None = all
    anchor: torch.Tensor | None = None  # (B,) long: the subject's last token in each row; None = not anchored


def training_batch(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
    prefixes: ContextPrefixes | None, chat: bool = False, anchored: bool = False,
) -> TrainingBatch:
    """The batch an editor trains on: the requests alone, or also (with `prefixes`) under the model's
    context prefixes, written by the model the first time this editor meets it, and (with `chat`) each
    asked through the tokenizer's chat template; with `anchored`, every row's `anchor` is the position
    of the request's subject's last token (`subject_of`: the given subject, else the one found in the
    prompt)."""
    device = next(model.parameters()).device
    if anchored:
        contexts = prefixes.get(model, tokenizer) if prefixes is not None else ()
        return anchored_batch(requests, tokenizer, contexts, device, max_context(model.config), chat=chat)
    if prefixes is None and not chat:
        return make_batch(requests, pad_id_of(tokenizer), device)
    contexts = prefixes.get(model, tokenizer) if prefixes is not None else ("",)
    return prefixed_batch(requests, tokenizer, contexts, pad_id_of(tokenizer), device, max_context(model.config),
                          chat=chat)


def make_batch(requests: Sequence[TokenizedRequest], pad_id: int, device: torch.device) -> TrainingBatch:
    """The requests' prompt + target rows; each row's `anchor` where every request carries one."""
    batch = _rows_batch([(r.prompt_ids, r.target_ids) for r in requests], pad_id, device)
    if requests and all(r.anchor is not None for r in requests):
        anchor = torch.tensor([r.anchor for r in requests], dtype=torch.long, device=device)  # (B,)
        return TrainingBatch(batch.input_ids, batch.attention_mask, batch.labels, anchor=anchor)
    return batch


def prefixed_requests(
    requests: Sequence[TokenizedRequest], tokenizer: PreTrainedTokenizerBase, prefixes: Sequence[str],
    context_length: int | None = None, anchored: bool = False,
) -> list[TokenizedRequest]:
    """Each request, then the same fact under each non-empty prefix (`in_context`: the prefixed prompt's
    ids, the request's own target ids), request by request. A prefixed prompt longer than
    `context_length` with its target is left out (the request itself was checked). With `anchored`
    every request out carries the position of its subject's last token (`subject_of`; the locate
    family's rule, scoring/positions.py) as `anchor`."""
    out = []
    for r in requests:
        contexts = ("", *(p for p in prefixes if p))  # the prompt alone is the request itself
        if anchored:
            span = subject_span(r.request.prompt, subject_of(r))
            found = [(tuple(ids), at) for ids, at in subject_positions(tokenizer, contexts, r.request.prompt, span)]
            if found[0][0] != r.prompt_ids:
                raise InvalidRequestError(f"the tokenizer does not give {r.request.prompt!r} the same ids twice")
        else:
            found = [(r.prompt_ids, None)] + [
                (tuple(encode_prompt(tokenizer, in_context(p, r.request.prompt)[0])), None) for p in contexts[1:]]
        out.append(replace(r, anchor=found[0][1]) if anchored else r)
        for ids, anchor in found[1:]:
            if context_length is not None and len(ids) + len(r.target_ids) > context_length:
                LOG.debug("a context of %r left out: it would not fit the model's context", r.request.prompt)
                continue
            out.append(TokenizedRequest(r.request, ids, r.target_ids, anchor=anchor))
    return out


def chat_requests(
    requests: Sequence[TokenizedRequest], tokenizer: PreTrainedTokenizerBase, context_length: int | None = None,
    anchored: bool = False,
) -> list[TokenizedRequest]:
    """Each request asked as one user message through the tokenizer's chat template (`in_chat`), the
    target without its leading space as the start of the assistant's reply; none when the tokenizer has
    no chat template, and a row longer than `context_length` is left out. With `anchored` each carries
    the position of its subject's last token in the chat text as `anchor` (`chat_row`, the locate
    family's rule)."""
    out = []
    for r in requests:
        if anchored:
            row = chat_row(tokenizer, r, 0)
            asked = None if row is None else (row.ids, row.target, row.subject)
        else:
            chat = in_chat(tokenizer, r.request.prompt.strip())
            asked = None if chat is None else (ids_as_written(tokenizer, chat[0]),
                                               reply_ids(tokenizer, r.request.target), None)
        if asked is None:
            continue
        ids, target, anchor = asked
        if context_length is not None and len(ids) + len(target) > context_length:
            LOG.debug("the chat row of %r left out: it would not fit the model's context", r.request.prompt)
            continue
        out.append(TokenizedRequest(r.request, tuple(ids), tuple(target), anchor=anchor))
    return out


def prefixed_batch(
    requests: Sequence[TokenizedRequest], tokenizer: PreTrainedTokenizerBase, prefixes: Sequence[str],
    pad_id: int, device: torch.device, context_length: int | None = None, chat: bool = False,
) -> TrainingBatch:
    """Each request's prompt alone, then under each non-empty prefix (`in_context`, tokenized with
    `encode_prompt`), then (with `chat`, when the tokenizer has a chat template) asked as a chat
    (`in_chat`, the target as the reply's start), each followed by its target ids; `stop` marks the
    prompt-alone rows. A row longer than `context_length` is left out (the prompt alone always fits:
    the request was checked)."""
    rows: list[tuple[Sequence[int], Sequence[int]]] = []
    stop: list[bool] = []
    for r in requests:
        for asked in prefixed_requests([r], tokenizer, prefixes, context_length):  # r itself first
            rows.append((asked.prompt_ids, asked.target_ids))
            stop.append(asked is r)
        for asked in chat_requests([r], tokenizer, context_length) if chat else ():
            rows.append((asked.prompt_ids, asked.target_ids))
            stop.append(False)
    batch = _rows_batch(rows, pad_id, device)
    return TrainingBatch(batch.input_ids, batch.attention_mask, batch.labels, torch.tensor(stop, device=device))


def anchored_batch(
    requests: Sequence[TokenizedRequest], tokenizer: PreTrainedTokenizerBase, prefixes: Sequence[str],
    device: torch.device, context_length: int | None = None, chat: bool = False,
) -> TrainingBatch:
    """`prefixed_batch`'s rows (the prompt alone, under each non-empty prefix, with `chat` as a chat),
    each with the position of its subject's last token as `anchor`; `stop` marks the prompt-alone rows."""
    contexts = ("", *(p for p in prefixes if p))  # value_rows reads the prompt alone as the empty prefix
    rows = value_rows(tokenizer, contexts, requests, None, chat=chat, context_length=context_length)
    first = torch.zeros_like(rows.owner, dtype=torch.bool)
    first[first_rows(rows.owner, len(requests))] = True  # each request's prompt alone
    return TrainingBatch(rows.input_ids.to(device), rows.attention_mask.to(device), rows.labels.to(device),
                         first.to(device), rows.subject.to(device))


def _rows_batch(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, device: torch.device
) -> TrainingBatch:
    """rows: (prompt ids, target ids) -> right-padded prompt + target with the target labelled."""
    ids, mask = pad_sequences([list(p) + list(t) for p, t in rows], pad_id)
    labels = torch.full_like(ids, IGNORE)
    for row, (prompt, target) in enumerate(rows):
        labels[row, len(prompt) : len(prompt) + len(target)] = torch.tensor(list(target), dtype=labels.dtype)
    return TrainingBatch(ids.to(device), mask.to(device), labels.to(device))


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: position t whose output predicts a labelled token t + 1."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """(B, T): the label of token t + 1, the one position t predicts (IGNORE at the end)."""
    out = torch.full_like(labels, IGNORE)
    out[:, :-1] = labels[:, 1:]
    return out


def batch_target_logits(
    model: nn.Module, batch: TrainingBatch, params: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Logits (M, V) at the batch's positions that predict a target token, row-major (`logits_at`: the
    language-model head, a quarter of a pass on the default model, runs on those positions only)."""
    return logits_at(model, batch.input_ids, batch.attention_mask, loss_positions(batch.labels), params)


def target_nll_at(
    logits: torch.Tensor, labels: torch.Tensor, stop: torch.Tensor | None = None
) -> tuple[torch.Tensor, bool]:
    """Mean NLL over target tokens, and whether every target token of the `stop` rows (None = all
    rows) is already the argmax.

    logits: (M, V) at `loss_positions(labels)`, row-major (`batch_target_logits`); labels: (B, T);
    stop: (B,) bool.
    """
    predicting = loss_positions(labels)  # (B, T)
    targets = next_tokens(labels)[predicting]  # (M,)
    loss = nn.functional.cross_entropy(logits.float(), targets)
    checked = predicting if stop is None else predicting & stop[:, None]
    on_stop = checked[predicting]  # (M,)
    done = bool((logits.argmax(-1)[on_stop] == targets[on_stop]).all())
    return loss, done
