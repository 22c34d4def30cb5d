"""Passes that run only what the value's δ can change: each row from its subject's last token on.

δ is added at the subject's last token s_b of row b, so (causal attention) the tokens before s_b are
the same at every step of the value fit. They are run once (the "heads", with their key/value cache);
each step runs the "tails" [s_b, len_b) only, attending to the heads' cache, and from block L up
(replay.start_at_block: what enters block L at the tails does not change either). For the default
model and five prefixes a tail is about a quarter of a row.

    tails = split_at_subject(model, rows, select, layer=7, reads={...})   # one head pass, one tail pass
    logits = tail_logits(model, tails, hooks={...})                        # (M, V), as logits_at gives

The cache is copied for every pass (a pass appends the tails to it). `check_against` compares the
first tail pass with a full pass over the same rows: an architecture whose cache does not replay
exactly is caught, not trusted (the caller then runs whole rows).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..model.hooks import ForwardHook, forward_hooks
from ..model.replay import capture_block_input
from ..scoring.positions import Rows
from .reads import Start, started


@dataclass(frozen=True)
class Tails:
    """Rows split at each row's subject token (module docstring)."""

    ids: torch.Tensor  # (B, Q) each row's tokens from its subject's last token on, right-padded
    mask: torch.Tensor  # (B, P + Q) the heads' real tokens, then the tails'
    positions: torch.Tensor  # (B, Q) each tail token's position in its row
    select: torch.Tensor  # (B, Q) the row selection, in tail coordinates (same order, row-major)
    cache: Any  # the heads' key/value cache (None: no row has a head)
    start: Start | None  # what enters block L at the tails


def _pad_rows(pieces: list[torch.Tensor], fill: int) -> torch.Tensor:
    width = max(1, max(p.shape[0] for p in pieces))
    out = torch.full((len(pieces), width), fill, dtype=pieces[0].dtype, device=pieces[0].device)
    for b, piece in enumerate(pieces):
        out[b, : piece.shape[0]] = piece
    return out


def _cut(rows: Rows, select: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(head ids (B, P), head mask (B, P), tail ids (B, Q), tail mask (B, Q), tail select (B, Q)); pads
    are id 0 under mask 0."""
    lengths = rows.attention_mask.sum(1).tolist()
    cuts = rows.subject.tolist()
    ids = rows.input_ids
    heads = [ids[b, :c] for b, c in enumerate(cuts)]
    tails = [ids[b, c:n] for b, (c, n) in enumerate(zip(cuts, lengths, strict=True))]
    ones = [torch.ones(t.shape[0], dtype=rows.attention_mask.dtype, device=ids.device) for t in heads + tails]
    chosen = [select[b, c:n] for b, (c, n) in enumerate(zip(cuts, lengths, strict=True))]
    return (_pad_rows(heads, 0), _pad_rows(ones[: len(heads)], 0), _pad_rows(tails, 0),
            _pad_rows(ones[len(heads):], 0), _pad_rows(chosen, 0).bool())


@torch.no_grad()
def _head_cache(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """The heads' key/value cache. A row without a head attends to its first pad in this pass only (a
    query with no key gives NaN, which would reach the cache); the tails never attend to it."""
    if not bool(mask.any()):
        return None
    visible = mask.clone()
    visible[:, 0] = 1
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)  # (B, P) right padding
    return model(input_ids=ids, attention_mask=visible, position_ids=positions, use_cache=True).past_key_values


def _kwargs(model: nn.Module, tails: Tails) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"input_ids": tails.ids, "position_ids": tails.positions, "use_cache": True}
    if tails.cache is None:  # no heads: the tails are whole rows
        kwargs["attention_mask"] = tails.mask[:, -tails.ids.shape[1]:]
    else:
        kwargs.update(attention_mask=tails.mask, past_key_values=copy.deepcopy(tails.cache))
    keep = tails.select.any(0).nonzero().squeeze(1)  # (K,)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep
    return kwargs


def tail_logits(model: nn.Module, tails: Tails, hooks: Mapping[str, ForwardHook] = {}) -> torch.Tensor:
    """Logits (M, V) at the selected tail positions, row-major; the LM head runs on them only.
    Gradients flow as usual (to whatever `hooks` add)."""
    kwargs = _kwargs(model, tails)
    rows = tails.select[:, kwargs["logits_to_keep"]] if "logits_to_keep" in kwargs else tails.select

    def gather(module: nn.Module, args: tuple) -> tuple:
        return (args[0][rows].unsqueeze(0), *args[1:])  # (1, M, d)

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        with started(model, tails.start), forward_hooks(model, hooks=hooks):
            return model(**kwargs).logits.squeeze(0)  # (M, V)
    finally:
        handle.remove()


def split_at_subject(
    model: nn.Module, rows: Rows, select: torch.Tensor, layer: int, hooks: Mapping[str, ForwardHook] = {},
) -> tuple[Tails, torch.Tensor]:
    """(the tails of `rows`, their logits (M, V) at `select` (B, T) on the model as it is). The heads
    run once; the first tail pass records what enters block `layer` (>= 1: later passes start there)
    and runs `hooks` (to read the unedited states)."""
    head_ids, head_mask, ids, tail_mask, chosen = _cut(rows, select)
    cache = _head_cache(model, head_ids, head_mask)
    positions = rows.subject[:, None] + torch.arange(ids.shape[1], device=ids.device)  # (B, Q)
    tails = Tails(ids, torch.cat([head_mask, tail_mask], 1), positions, chosen, cache, None)
    if layer < 1:
        with torch.no_grad():
            return tails, tail_logits(model, tails, hooks)
    with torch.no_grad(), capture_block_input(model, layer) as captured:
        logits = tail_logits(model, tails, hooks)
    return Tails(ids, tails.mask, positions, chosen, cache, Start(layer, captured)), logits
