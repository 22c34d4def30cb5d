"""The target value v* (MEMIT's compute_z): the hidden state at the subject's last token that makes
the model say the target.

A vector δ_i per request is added to the output of block L's MLP down projection at the subject's
last token of every row of request i (its prompt under each context prefix, and its KL row). Adam on δ:

    loss_i = mean over i's prefixed prompts of the target's mean NLL
             + kl_factor · KL(p_edited ‖ p_unedited) of the next token after kl_prompt(subject)
             + after_kl · mean over i's target rows of KL(p_edited ‖ p_unedited) of the after_tokens tokens
               after the target (the first: the next token; the rest along the unedited model's continuation)
             + weight_decay · ‖δ_i‖ / ‖h_i‖²
    ‖δ_i‖ <= clamp_norm · ‖h_i‖  after each step

h_i is block L's output at the subject's last token of the prompt alone (MEMIT; with one edited
block, the down projection's own output, as ROME measures it: exact for blocks that normalise their MLP
output, e.g. Gemma's); v*_i = h_i + δ_i. The
requests' δ are independent (the loss is a sum over requests). Each step runs only what δ changes:
each row from its subject's last token on, from block L up, the tokens before it cached, a request's
rows packed into one sequence (tails.py); the first step is the pass that reads h.
Each request stops once its NLL is below `stop_nll` (its δ is kept from then on, as if it were fitted
alone: MEMIT fits each z on its own), and the fit once every request has; with `chat_context` its chat
row counts in the loss and not in that check (the prompt's rows decide, as without it). With
v_optimizer "gradient" each step moves δ_i by v_lr · ‖h_i‖ along its own gradient instead of Adam's;
with v_shrink_checks > 0 each δ_i that met the stop is then cut, by bisection, to the least fraction of
it that still meets it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..model.hooks import ForwardHook, forward_hooks
from ..scoring.positions import IGNORE, Rows, continued, first_rows
from ..scoring.said import eos_ids_of, generate_ids
from ..scoring.sequences import logits_at, pad_id_of
from .config import LocateConfig
from .reads import read_at_subject, started
from .tails import At, Tails, first_pass, split_at_subject, tail_logits

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Passes:
    """Passes over the rows of some of the requests, each request's δ added at its rows' subject token."""

    # (δ (N, H), which requests (N,) bool) -> logits (M', V) at the selected positions of their rows, row-major
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    tails: bool  # tail passes (else whole rows)


@dataclass(frozen=True)
class Selected:
    """The rows of some requests and what the losses read of them."""

    rows: Rows
    select: torch.Tensor  # (B, T) positions predicting a target token, or a KL row's last
    targets: torch.Tensor  # (M,) the label each selected position predicts (IGNORE at KL positions)
    base_kl: torch.Tensor | None  # (K, V) the unedited log-probabilities at the KL positions

    def of_requests(self, keep: torch.Tensor) -> Selected:
        """The rows of the requests `keep` (N,) bool, in order."""
        if bool(keep.all()):
            return self
        row_kept = keep[self.rows.owner]  # (B,)
        position_kept = row_kept[self.select.nonzero()[:, 0]]  # (M,)
        base_kl = self.base_kl[position_kept[self.targets == IGNORE]] if self.base_kl is not None else None
        return Selected(self.rows.subset(row_kept), self.select[row_kept], self.targets[position_kept], base_kl)


@dataclass(frozen=True)
class Values:
    target: torch.Tensor  # (N, H) v*: block L's output wanted at the subject's last token
    initial: torch.Tensor  # (N, H) h: what it is before the edit
    steps: int  # Adam steps taken
    nll: torch.Tensor  # (N,) each request's target NLL at the end (over the rows the stop reads)
    tails: bool = True  # the steps ran tail passes (tails.py), not whole rows

    @classmethod
    def joined(cls, parts: Sequence[Values]) -> Values:
        """The values of requests fitted in groups, in the groups' order (steps: the most any took)."""
        return cls(torch.cat([p.target for p in parts]), torch.cat([p.initial for p in parts]),
                   max(p.steps for p in parts), torch.cat([p.nll for p in parts]), all(p.tails for p in parts))


def selection(rows: Rows, after: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(select (B, T) positions predicting a target token, or the last token of a KL row, and with
    `after` every position of a row with a target from the target's last token to the row's last (what
    comes after the target: the next token, and those `continued` appended); and the label each selected
    position predicts (IGNORE for KL and after positions)), row-major."""
    labelled = rows.labels != IGNORE  # (B, T)
    select = torch.zeros_like(labelled)
    select[:, :-1] = labelled[:, 1:]
    last = rows.attention_mask.sum(1) - 1  # (B,)
    select[rows.kl, last[rows.kl]] = True
    if after:
        at = torch.arange(labelled.shape[1], device=labelled.device)[None]  # (1, T)
        target_end = torch.where(labelled, at, -1).amax(1)  # (B,): the target's last token (-1: none)
        select |= (at >= target_end[:, None]) & (at <= last[:, None]) & labelled.any(1)[:, None]
    targets = torch.full_like(rows.labels, IGNORE)
    targets[:, :-1] = rows.labels[:, 1:]
    return select, targets[select]


@torch.no_grad()
def with_what_follows(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: Rows, tokens: int, context_length: int | None,
) -> Rows:
    """`rows` with the model's greedy continuation (at most `tokens`, cut before an end of sequence and at
    `context_length`) after the text of each row with a target, as the model says it before the edit:
    what `after_kl` holds beyond the token right after the target."""
    has_target = (rows.labels != IGNORE).any(1).tolist()
    lengths = rows.attention_mask.sum(1).tolist()
    texts = [rows.input_ids[b, :n].tolist() for b, n in enumerate(lengths) if has_target[b]]
    said = iter(generate_ids(model, texts, tokens, pad_id_of(tokenizer), eos_ids_of(model, tokenizer)))
    room = [tokens if context_length is None else max(0, min(tokens, context_length - n)) for n in lengths]
    return continued(rows, [next(said)[: room[b]] if has else [] for b, has in enumerate(has_target)],
                     pad_id_of(tokenizer))


def _losses(logits: torch.Tensor, part: Selected, n: int):
    """(nll (n,), nll of the rows the stop reads (n,), kl (n,), after (n,)) per request from logits
    (M, V) at `part.select`: the NLL over all of a request's target rows, and over those without its
    chat row (NaN for a request with no rows in `part`); KL(edited ‖ unedited) at its KL row, and its
    mean over the positions after its targets (`selection(after=True)`; 0 without them)."""
    rows, select, targets, base_kl = part.rows, part.select, part.targets, part.base_kl
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (M, V)
    row = select.nonzero()[:, 0]  # (M,)
    on_target = targets != IGNORE
    picked = -logprobs[on_target].gather(1, targets[on_target, None]).squeeze(1)  # (M_t,)
    rows_t = row[on_target]
    b = rows.input_ids.shape[0]
    per_row = torch.zeros(b, device=logits.device).index_add(0, rows_t, picked)
    count = torch.zeros(b, device=logits.device).index_add(0, rows_t, torch.ones_like(picked))
    per_row = per_row / count.clamp(min=1)  # (B,) mean NLL of each row's target
    rewrite = ~rows.kl
    nll = _mean_per_request(per_row, rows.owner, rewrite, n)
    stop = _mean_per_request(per_row.detach(), rows.owner, rewrite & ~rows.chat, n)
    kl, after = torch.zeros(n, device=logits.device), torch.zeros(n, device=logits.device)
    if base_kl is not None:
        edited = logprobs[~on_target]  # (K, V): the KL rows' last and the after positions, in row order
        terms = (edited.exp() * (edited - base_kl)).sum(-1)  # KL(edited ‖ unedited)
        owners, at_kl_row = rows.owner[row[~on_target]], rows.kl[row[~on_target]]  # (K,)
        kl = kl.index_add(0, owners[at_kl_row], terms[at_kl_row])
        at_end = ~at_kl_row
        count = torch.zeros(n, device=logits.device).index_add(0, owners[at_end], torch.ones_like(terms[at_end]))
        after = after.index_add(0, owners[at_end], terms[at_end]) / count.clamp(min=1)
    return nll, stop, kl, after


def _mean_per_request(per_row: torch.Tensor, owner: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) the mean of per_row (B,) over each request's rows where `rows` (B,) is set."""
    total = torch.zeros(n, device=per_row.device).index_add(0, owner[rows], per_row[rows])
    return total / torch.zeros(n, device=per_row.device).index_add(0, owner[rows], rows[rows].float())


def _passes(
    model: nn.Module, rows: Rows, select: torch.Tensor, layer: int, measured: str, check: bool, out_module: str,
    delta: torch.Tensor,
) -> tuple[Passes, torch.Tensor, torch.Tensor]:
    """(passes over `rows` adding δ (N, H) at the output of `out_module`; the unedited h (B, H) of module
    `measured` at each row's subject token; the first pass's logits (M, V) at `select`, with `delta`
    added when it ran tails (graph attached: the fit's first step), else unedited and detached). Tail
    passes (tails.py) when `check` is off or a full pass agrees with them, else whole rows from block
    `layer` up."""
    try:
        with torch.no_grad():
            tails = split_at_subject(model, rows, select)
        with torch.enable_grad():
            adding = {out_module: _adding(delta[rows.owner], tails.subject_at)}
            tails, logits, read = first_pass(model, tails, layer, adding, reads=[measured])
        if not check or _agree(logits.detach(), model, rows, select):
            # The running requests change only when one meets the stop (and not at all while δ is
            # shortened): their tails, a copy of the cache among them, are made once per such set.
            last: dict[tuple[bool, ...], Tails] = {}

            def on_tails(added: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
                key = tuple(keep.tolist())
                if key not in last:
                    last.clear()
                    last[key] = tails.of_requests(keep)  # packed row r: request r
                part = last[key]
                return tail_logits(model, part, {out_module: _adding(added[rows.owner[keep[rows.owner]]],
                                                                     part.subject_at)})

            return Passes(on_tails, True), read[measured], logits
        LOG.warning("%s: tail passes differ from full passes; v* runs whole rows", type(model).__name__)
    except RuntimeError as error:  # a cache the packed mask does not fit (a sliding window's keeps fewer keys)
        LOG.warning("%s: tail passes failed (%s); v* runs whole rows", type(model).__name__, error)
    _, hidden, start = read_at_subject(model, rows, [], measured, record=layer if layer >= 1 else None)
    at = (torch.arange(rows.input_ids.shape[0], device=rows.subject.device), rows.subject)
    owner_of_selected = rows.owner[select.nonzero()[:, 0]]  # (M,)

    def whole(hooks: Mapping[str, ForwardHook]) -> torch.Tensor:
        with started(model, start), forward_hooks(model, hooks=hooks):
            return logits_at(model, rows.input_ids, rows.attention_mask, select)

    def on_rows(added: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # every row run, the kept read
        return whole({out_module: _adding(added[rows.owner], at)})[keep[owner_of_selected]]

    with torch.no_grad():
        return Passes(on_rows, False), hidden, whole({})


def _agree(logits: torch.Tensor, model: nn.Module, rows: Rows, select: torch.Tensor) -> bool:
    with torch.no_grad():
        full = logits_at(model, rows.input_ids, rows.attention_mask, select)  # (M, V)
    return bool(torch.allclose(logits, full, atol=1e-3, rtol=1e-4))


def fit_values(
    model: nn.Module, rows: Rows, n: int, out_module: str, layer: int, measured: str, config: LocateConfig,
    check: bool = True,
) -> Values:
    """v* for each of `n` requests (module docstring); `rows` from positions.value_rows, `out_module`
    the down projection of block `layer`, `measured` the module whose output h and v* are (block
    `layer`, or `out_module` itself). `check`: compare the tail passes with a full pass first (once per
    model is enough). The model's weights are not touched (the caller freezes it)."""
    select, targets = selection(rows, after=bool(config.after_kl))
    width = model.get_input_embeddings().embedding_dim  # H: the residual stream's
    delta = torch.zeros(n, width, device=rows.input_ids.device, requires_grad=True)  # (N, H)
    passes, hidden, first = _passes(model, rows, select, layer, measured, check, out_module, delta)
    initial = hidden[first_rows(rows.owner, n)]  # (N, H): the prompt alone (its first row: the empty prefix)
    base = first.detach()  # δ = 0: the unedited logits
    reads_kl = bool(config.kl_factor or config.after_kl)
    base_kl = torch.log_softmax(base.float(), -1)[targets == IGNORE] if reads_kl else None  # (K, V)
    everything = Selected(rows, select, targets, base_kl)
    optimizer = torch.optim.Adam([delta], lr=config.v_lr)
    norms = initial.norm(dim=1)  # (N,)
    steps = 0
    met = torch.zeros(n, dtype=torch.bool, device=initial.device)  # (N,): requests whose δ is final
    stop_nll = torch.full((n,), float("inf"), device=initial.device)  # (N,): each request's last reading
    for steps in range(config.v_steps + 1):
        running = ~met  # only these requests' rows are run: the others' δ is final (as if fitted alone)
        with torch.enable_grad():
            # the first pass ran step 0 (δ = 0, every request) already, when it ran through δ
            logits = first if steps == 0 and first.requires_grad else passes.run(delta, running)
            nll, now, kl, after = _losses(logits, everything.of_requests(running), n)
            stop_nll = torch.where(running, now.detach(), stop_nll)
            met |= running & (stop_nll < config.v_stop_nll)
            if bool(met.all()) or steps == config.v_steps:
                break
            loss = nll + (config.kl_factor or 0.0) * kl + (config.after_kl or 0.0) * after
            if config.v_weight_decay:
                loss = loss + config.v_weight_decay * delta.norm(dim=1) / norms**2
            optimizer.zero_grad(set_to_none=True)
            loss[running].sum().backward()
        final = delta.detach().clone()  # (N, H): the rows of `met` are restored from it after the step
        if config.v_optimizer == "adam":
            optimizer.step()
        else:  # "gradient": a step of v_lr × ‖h_i‖ along each request's own gradient
            with torch.no_grad():
                grad = delta.grad  # (N, H)
                delta.sub_(config.v_lr * norms[:, None] * grad / grad.norm(dim=1, keepdim=True).clamp(min=1e-12))
        if config.clamp_norm is not None:
            with torch.no_grad():
                limit = config.clamp_norm * norms  # (N,)
                scale = (limit / delta.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
        with torch.no_grad():  # a request that met the stop keeps its δ while the others go on
            delta[met] = final[met]
    if config.v_shrink_checks:
        fraction, stop_nll = _shortest(passes, everything, n, delta.detach(), config.v_stop_nll, stop_nll,
                                       config.v_shrink_checks)
        delta = delta.detach() * fraction[:, None]
    return Values(initial + delta.detach(), initial, steps, stop_nll, passes.tails)


def _adding(per_row: torch.Tensor, at: At) -> ForwardHook:
    """A hook adding per_row (B, H) to its module's output at `at`: each row's subject's last token."""

    def add(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        added = torch.zeros_like(output)  # (R, Q, H) packed tails, or (B, T, H) whole rows
        added[at] = per_row.to(output.dtype)
        return output + added

    return add


@torch.no_grad()
def _shortest(
    passes: Passes, everything: Selected, n: int, delta: torch.Tensor, stop: float, nll: torch.Tensor, checks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """((n,) the smallest fraction of each request's δ (N, H) found by `checks` bisection passes that
    still meets the stop, 1 for a request that did not meet it; (n,) the stop NLL there).

    Adam at a large learning rate walks δ past the length the target needs; every unit of ‖v* − h‖
    left over is spread into the weights and, kept edits adding up, into the model's drift."""
    met = nll < stop  # (n,)
    low, high = torch.zeros(n, device=delta.device), torch.ones(n, device=delta.device)
    best = nll.clone()
    if not bool(met.any()):
        return high, best
    part = everything.of_requests(met)  # only the requests that met the stop are shortened
    for _ in range(checks):
        middle = torch.where(met, (low + high) / 2, high)
        _, at_middle, _, _ = _losses(passes.run(delta * middle[:, None], met), part, n)
        holds = met & (at_middle < stop)
        high = torch.where(holds, middle, high)
        low = torch.where(met & ~holds, middle, low)
        best = torch.where(holds, at_middle, best)
    return high, best
