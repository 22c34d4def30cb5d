"""Passes that run only what the value's δ can change: each row from its subject's last token on.

δ is added at the subject's last token s_b of row b, so (causal attention) the tokens before s_b are
the same at every step of the value fit. They are run once (the "heads", with their key/value cache);
each step runs the "tails" [s_b, len_b) only, attending to the heads' cache, and from block L up
(replay.start_at_block: what enters block L at the tails does not change either).

A request's rows are packed side by side into one sequence (its heads into one, its tails into
another), each token attending only to its own row's earlier tokens (a 4D attention mask) at its own
row's positions. Its prompt rows' tails are a few tokens and its chat row's two to three times as long:
padded to one width the rows ran mostly pads, and on a CPU a pass costs about its tokens (the default
model, one request: 39 tail tokens a pass packed, 96 padded; the heads 87 for 216).

    tails = split_at_subject(model, rows, select)                     # the heads' pass
    tails, logits, reads = first_pass(model, tails, layer=7, reads=["model.layers.7"])
    logits = tail_logits(model, tails, hooks={...})   # (M, V), as logits_at gives them on whole rows

A hook adds to or reads a row's state at `tails.subject_at`. The cache is copied for every pass (a
pass appends the tails to it). The caller compares the first tail pass with a full pass over the same
rows (values._agree): an architecture whose cache or mask does not replay exactly (a sliding window
shorter than a row, a model that builds its own mask) is caught, not trusted.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..model.hooks import ForwardHook, forward_hooks
from ..model.replay import CapturedInput, capture_block_input
from ..scoring.positions import Rows
from .reads import Start, block_hidden, started

At = tuple[torch.Tensor, torch.Tensor]  # (sequence (B,), position (B,)): where each row's subject token is


@dataclass(frozen=True)
class Tails:
    """Rows packed one sequence per request and split at each row's subject token (module docstring)."""

    ids: torch.Tensor  # (R, Q) each request's rows' tails side by side, right-padded
    positions: torch.Tensor  # (R, Q) each tail token's position in its own row
    mask: torch.Tensor  # (R, 1, Q, P + Q) additive: which heads' and tails' tokens each tail token sees
    select: torch.Tensor  # (R, Q) the rows' selected positions, in packed coordinates
    order: torch.Tensor  # (M,) the row-major index (in the rows' selection) of each packed selected position
    subject_at: At  # each row's (B) subject's last token in the packed tails
    cache: Any  # the heads' key/value cache (None: no row has a head)
    start: Start | None = None  # what enters block L at the tails

    def of_requests(self, keep: torch.Tensor) -> Tails:
        """The tails of the requests `keep` (R,) bool only: their packed rows, in order, each logit
        row-major over those requests' rows. A fit runs only the requests still short of their stop."""
        if bool(keep.all()):
            return self
        index = keep.nonzero().squeeze(1)  # (R',)
        cache = None
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)
            cache.batch_select_indices(index)
        start = None
        if self.start is not None:
            start = Start(self.start.layer, CapturedInput(self.start.captured.hidden[index], self.start.captured.form))
        kept_rows = keep[self.subject_at[0]]  # (B,): a row of a kept request
        renumber = torch.cumsum(keep.long(), 0) - 1  # (R,) a kept packed row's new index
        at = (renumber[self.subject_at[0][kept_rows]], self.subject_at[1][kept_rows])
        kept_selected = keep[self.select.nonzero()[:, 0]]  # (M,) packed order: in a kept request
        order = self.order[kept_selected].argsort().argsort()  # ranks: row-major over the kept rows
        return Tails(self.ids[index], self.positions[index], self.mask[index], self.select[index], order, at, cache,
                     start)


@dataclass
class _Packed:
    """One side (heads or tails) being packed: per token its id, position in its row, row (-1: a pad)."""

    ids: list[list[int]]
    positions: list[list[int]]
    rows: list[list[int]]

    @classmethod
    def empty(cls, sequences: int) -> _Packed:
        return cls([[] for _ in range(sequences)], [[] for _ in range(sequences)], [[] for _ in range(sequences)])

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, positions, rows), each (R, width) right-padded: pad id 0, position 0, row -1."""
        width = max(1, max(len(p) for p in self.ids))

        def pad(lists: list[list[int]], fill: int) -> torch.Tensor:
            return torch.tensor([p + [fill] * (width - len(p)) for p in lists], dtype=torch.long, device=device)

        return pad(self.ids, 0), pad(self.positions, 0), pad(self.rows, -1)


def _sees(query_rows: torch.Tensor, query_pos: torch.Tensor, key_rows: torch.Tensor, key_pos: torch.Tensor,
          dtype: torch.dtype) -> torch.Tensor:
    """The additive mask (R, 1, q, k): a real token sees its own row's tokens at its position or before; a
    pad sees itself only (the last q keys are the queries), so no softmax runs over nothing."""
    same = (query_rows[:, :, None] == key_rows[:, None, :]) & (query_rows[:, :, None] >= 0)  # (R, q, k)
    sees = same & (key_pos[:, None, :] <= query_pos[:, :, None])
    q = query_rows.shape[1]
    sees[:, :, -q:] |= torch.eye(q, dtype=torch.bool, device=sees.device) & (query_rows[:, :, None] < 0)
    zero = torch.zeros((), dtype=dtype, device=sees.device)
    return torch.where(sees, zero, torch.finfo(dtype).min)[:, None]


def _pack(rows: Rows, select: torch.Tensor) -> tuple[_Packed, _Packed, list[list[bool]], list[int], At]:
    """(heads, tails, the tails' selection, the order of the selected positions, subject_at) in lists."""
    lengths = rows.attention_mask.sum(1).tolist()
    cuts = rows.subject.tolist()
    owner = rows.owner.tolist()
    counts = select.sum(1)
    first = (torch.cumsum(counts, 0) - counts).tolist()  # (B,) each row's first index in the selection
    requests = sorted(set(owner))
    heads, tails = _Packed.empty(len(requests)), _Packed.empty(len(requests))
    chosen: list[list[bool]] = [[] for _ in requests]
    order: list[int] = []
    at_sequence, at_position = [0] * len(owner), [0] * len(owner)
    for r, request in enumerate(requests):
        for b in (b for b, o in enumerate(owner) if o == request):
            ids = rows.input_ids[b].tolist()
            heads.ids[r] += ids[: cuts[b]]
            heads.positions[r] += list(range(cuts[b]))
            heads.rows[r] += [b] * cuts[b]
            at_sequence[b], at_position[b] = r, len(tails.ids[r])
            tails.ids[r] += ids[cuts[b] : lengths[b]]
            tails.positions[r] += list(range(cuts[b], lengths[b]))
            tails.rows[r] += [b] * (lengths[b] - cuts[b])
            chosen[r] += select[b, cuts[b] : lengths[b]].tolist()
            order += range(first[b], first[b] + int(counts[b]))
    device = rows.input_ids.device
    return heads, tails, chosen, order, (torch.tensor(at_sequence, device=device),
                                         torch.tensor(at_position, device=device))


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def _head_cache(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> Any:
    """The packed heads' key/value cache (None when no row has a head)."""
    if not bool((rows >= 0).any()):
        return None
    mask = _sees(rows, positions, rows, positions, _dtype(model))
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values


def _kwargs(model: nn.Module, tails: Tails) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"input_ids": tails.ids, "position_ids": tails.positions, "use_cache": True,
                              "attention_mask": tails.mask}
    if tails.cache is not None:
        kwargs["past_key_values"] = copy.deepcopy(tails.cache)
    keep = tails.select.any(0).nonzero().squeeze(1)  # (K,)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep
    return kwargs


def tail_logits(model: nn.Module, tails: Tails, hooks: Mapping[str, ForwardHook] = {}) -> torch.Tensor:
    """Logits (M, V) at the selected tail positions, in the rows' row-major order (as logits_at gives
    them); the LM head runs on them only. Gradients flow as usual (to whatever `hooks` add)."""
    kwargs = _kwargs(model, tails)
    picked = tails.select[:, kwargs["logits_to_keep"]] if "logits_to_keep" in kwargs else tails.select

    def gather(module: nn.Module, args: tuple) -> tuple:
        return (args[0][picked].unsqueeze(0), *args[1:])  # (1, M, d)

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        with started(model, tails.start), forward_hooks(model, hooks=hooks):
            logits = model(**kwargs).logits.squeeze(0)  # (M, V) packed order
    finally:
        handle.remove()
    return logits[tails.order.argsort()]


def split_at_subject(model: nn.Module, rows: Rows, select: torch.Tensor) -> Tails:
    """The tails of `rows` with `select` (B, T): the rows packed and their heads run (once)."""
    heads, packed, chosen, order, at = _pack(rows, select)
    device, dtype = rows.input_ids.device, _dtype(model)
    head_ids, head_positions, head_rows = heads.tensors(device)
    ids, positions, tail_rows = packed.tensors(device)
    keys_rows, keys_positions = tail_rows, positions
    if bool((head_rows >= 0).any()):
        keys_rows, keys_positions = torch.cat([head_rows, tail_rows], 1), torch.cat([head_positions, positions], 1)
    return Tails(ids, positions, _sees(tail_rows, positions, keys_rows, keys_positions, dtype),
                 torch.tensor([c + [False] * (ids.shape[1] - len(c)) for c in chosen], device=device),
                 torch.tensor(order, dtype=torch.long, device=device), at,
                 _head_cache(model, head_ids, head_positions, head_rows))


def first_pass(
    model: nn.Module, tails: Tails, layer: int, hooks: Mapping[str, ForwardHook] = {}, reads: Sequence[str] = (),
) -> tuple[Tails, torch.Tensor, dict[str, torch.Tensor]]:
    """(the tails, recording what enters block `layer` (>= 1: later passes start there); their logits
    (M, V) with `hooks` (gradients flow as usual); {module: (B, H) its output at each row's subject
    token, detached} for the modules `reads`)."""
    taken: dict[str, torch.Tensor] = {}

    def taking(name: str, inner: ForwardHook | None) -> ForwardHook:
        def take(module: nn.Module, args: tuple, output: object) -> object:
            changed = inner(module, args, output) if inner is not None else None  # a hook on the same module first
            taken[name] = block_hidden(output if changed is None else changed)[tails.subject_at].detach()  # (B, H)
            return changed

        return take

    hooks = {**hooks, **{name: taking(name, hooks.get(name)) for name in reads}}
    if layer < 1:
        return tails, tail_logits(model, tails, hooks), taken
    with capture_block_input(model, layer) as captured:
        logits = tail_logits(model, tails, hooks)
    return replace(tails, start=Start(layer, captured)), logits, taken
