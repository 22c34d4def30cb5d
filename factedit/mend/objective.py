"""MEND's training objective and its validation metrics, on a frozen base model.

One training step on a batch of edit examples (all edits applied together, as one batch edit):

1. capture pass (frozen model, hooks): edit sequences and locality sequences in one forward; the
   edit loss is backpropagated to the edited matrices (u/δ rows), the locality rows give the
   pre-edit distributions;
2. the editor network maps the rows to ΔW = Σ_t (−α δ̃_t) ũ_tᵀ per matrix (gradients flow into it);
3. edited pass through `torch.func.functional_call` with W + ΔW (the model's own tensors are never
   written) on edit, paraphrase and locality sequences;
4. loss = c_edit · (NLL(edit) + NLL(paraphrase)) / 2 + c_loc · KL(pre ‖ post) at the positions
   that predict the locality answer + c_margin · the neighbour margin loss (below).

Why the margin term: CounterFact's neighbourhood prompts share the edit's relation and its true
object o, and NS asks that o still beats the new target o* there. KL(pre ‖ post) is taken at the
positions of o's tokens and weighs each token by its pre-edit probability, so lifting a rare o* from
1e-4 to 0.3 costs little, yet it flips the neighbour. The margin m = logP(o) − logP(o*) (mean
per-token log-probs, as NS compares them) is the quantity NS thresholds at 0; the term is
relu(min(m_pre, margin) − m_post): the edit may not shrink a neighbour's margin below its pre-edit
value, capped at `margin` nats so that large margins leave room to move.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..model.specs import module_of
from ..safety.preserve import KeyPreserver
from ..scoring.batches import IGNORE, loss_positions, make_batch, next_tokens
from ..scoring.sequences import logits_at, pad_sequences
from .capture import capture, per_request_nll
from .data import EditExample, Pair, cf_pairs, counterfact_flags
from .method import dense_params, edit_rows, scaled_step
from .network import MENDNetwork
from .prefix import PrefixCache


def skipping_cached_blocks(cache: PrefixCache | None, model: nn.Module, requests, pad_id: int):
    """Run only the edited blocks when a prefix cache is given (see prefix.py). `requests` are
    TokenizedRequests or (prompt_ids, target_ids) pairs, the rows of the batch about to run."""
    if cache is None:
        return contextlib.nullcontext()
    rows = [tuple(r.input_ids) if hasattr(r, "input_ids") else tuple(r[0]) + tuple(r[1]) for r in requests]
    return cache.skipping(model, rows, pad_id)


def rows_in(logits: torch.Tensor, select: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """The part (M', V) of row-major logits (M, V) at `select` (B, T) that belongs to rows [first, end)."""
    row_ids = select.nonzero()[:, 0]  # (M,)
    return logits[(row_ids >= first) & (row_ids < end)]


def margin_loss(nll_true: torch.Tensor, nll_new: torch.Tensor, pre_margin: torch.Tensor, cap: float) -> torch.Tensor:
    """Mean of relu(min(m_pre, cap) − m_post), m = logP(true) − logP(new) per locality prompt; (n,) each."""
    post_margin = nll_new - nll_true  # (n,)
    return torch.relu(pre_margin.clamp(max=cap) - post_margin).mean()


def edited_params(
    model: nn.Module, network: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    preserver: KeyPreserver | None = None,
) -> dict[str, torch.Tensor]:
    """{name: W + ΔW} for `functional_call`, ΔW differentiable w.r.t. the editor network."""
    return dense_params(model, unwrap(network), edit_rows(network, factors, preserver))


def unwrap(network: nn.Module) -> MENDNetwork:
    return network.module if hasattr(network, "module") else network  # DDP wraps it in .module


def edit_step_loss(
    model: nn.Module,
    network: nn.Module,
    examples: Sequence[EditExample],
    pad_id: int,
    *,
    c_edit: float,
    c_loc: float,
    c_margin: float = 0.0,
    margin: float = 2.0,
    positions: str = "loss",
    cache: PrefixCache | None = None,
    preserver: KeyPreserver | None = None,
    replay: Sequence[EditExample] = (),
    c_replay: float = 0.0,
    c_norm: float = 0.0,
    updates: dict[str, torch.Tensor] | None = None,
    paraphrases_only: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch edit (module docstring) and its metrics; the model is frozen.
    Rows of both passes, n each: edits, (paraphrases, post only), locality prompts with their own answer,
    the locality prompts with the new target (c_margin > 0). For a stream of edits (train.py): `replay`,
    earlier edits of the episode still to be said (c_replay · their NLL at the edited weights); c_norm ·
    Σ ‖ΔW‖²_F / ‖W‖²_F; `updates` receives each detached ΔW for the episode to apply. With
    `paraphrases_only` the paraphrase term reads only the examples whose rephrase asks the edit's question
    (`EditExample.same_question`), and is the edit's NLL in a batch without one."""
    device, names, n = next(model.parameters()).device, unwrap(network).param_names, len(examples)
    loc_new = [e.loc_new for e in examples] if c_margin > 0 else []
    pre_requests = [e.edit for e in examples] + [e.loc for e in examples] + loc_new
    pre_batch = make_batch(pre_requests, pad_id, device)
    captured = _capture_edits(model, names, pre_batch, pre_requests, n, pad_id, positions, cache)
    pre_loc = rows_in(captured.logits, captured.select, n, 2 * n)  # (M_loc, V)

    new_params = edited_params(model, network, captured.factors, preserver)
    post_requests = [e.edit for e in examples] + [e.rephrase for e in examples] + [e.loc for e in examples] + loc_new
    post_requests += [e.edit for e in replay] if c_replay > 0 else []
    post_batch = make_batch(post_requests, pad_id, device)
    select = loss_positions(post_batch.labels)  # (3n or 4n, T)
    with skipping_cached_blocks(cache, model, post_requests, pad_id):
        logits = logits_at(model, post_batch.input_ids, post_batch.attention_mask, select, params=new_params)
    nll = per_request_nll(logits, post_batch.labels, select)  # (rows,)
    nll_edit, nll_rephrase = nll[:n].mean(), nll[n : 2 * n].mean()
    if paraphrases_only:
        asked = torch.tensor([e.same_question for e in examples], device=nll.device)  # (n,)
        nll_rephrase = nll[n : 2 * n][asked].mean() if bool(asked.any()) else nll_edit
    post_loc = rows_in(logits, select, 2 * n, 3 * n)  # (M_loc, V)
    pre_logp = torch.log_softmax(pre_loc.float(), -1)
    kl = (pre_logp.exp() * (pre_logp - torch.log_softmax(post_loc.float(), -1))).sum(-1).mean()
    loss = c_edit * (nll_edit + nll_rephrase) / 2 + c_loc * kl
    metrics: dict[str, float] = {}
    n_loc_end = 3 * n + len(loc_new)  # rows after it: replayed edits
    if c_replay > 0 and replay:
        nll_replay = nll[n_loc_end:].mean()
        loss = loss + c_replay * nll_replay
        metrics["replay/nll"] = nll_replay.item()
    if c_norm > 0 or updates is not None:
        loss = loss + c_norm * _norm_ratio(model, new_params, names, updates, metrics)
    if loc_new:
        loss = loss + c_margin * _margin_drop(captured, pre_batch.labels, nll, n, margin, metrics)
    metrics.update({
        "edit/nll_pre": captured.loss / n, "edit/nll": nll_edit.item(), "edit/nll_rephrase": nll_rephrase.item(),
        "edit/acc": _edit_accuracy(logits, select, post_batch.labels, n), "loc/kl": kl.item(),
        "loss/total": loss.item(), "edit/alpha_mean": float(unwrap(network).alpha.detach().mean()),
    })
    return loss, metrics


def _capture_edits(model, names, batch, requests, n: int, pad_id: int, positions: str, cache: PrefixCache | None):
    """The pre-edit pass: gradient factors of the first `n` rows (the edits) at the edited matrices, and
    every row's logits at its loss positions."""
    rows = torch.arange(len(requests), device=batch.input_ids.device) < n
    with skipping_cached_blocks(cache, model, requests, pad_id):
        return capture(model, [module_of(x) for x in names], names, batch, rows=rows, positions=positions)


def _margin_drop(captured, pre_labels: torch.Tensor, nll: torch.Tensor, n: int, margin: float,
                 metrics: dict[str, float]) -> torch.Tensor:
    """How much the edit narrowed each locality prompt's lead of its own answer over the new target
    (`margin_loss`); rows n..2n are the locality prompts, 2n..3n the same with the new target."""
    pre_nll = per_request_nll(captured.logits, pre_labels, captured.select)  # (3n,)
    pre_margin = pre_nll[2 * n :] - pre_nll[n : 2 * n]  # (n,)
    own, new = nll[2 * n : 3 * n], nll[3 * n : 4 * n]  # after the edit (post rows: edit, rephrase, loc, loc_new)
    drop = margin_loss(own, new, pre_margin, margin)
    metrics["loc/margin_drop"] = drop.item()
    metrics["loc/ns"] = float((new > own).float().mean())
    return drop


def _norm_ratio(
    model: nn.Module, new_params: dict[str, torch.Tensor], names: Sequence[str],
    updates: dict[str, torch.Tensor] | None, metrics: dict[str, float],
) -> torch.Tensor:
    """Σ ‖ΔW‖²_F / ‖W‖²_F over the edited matrices (differentiable; logged as edit/norm_ratio); with
    `updates`, each detached ΔW is handed to the episode too."""
    params = dict(model.named_parameters())
    changes = {name: new_params[name] - params[name].detach() for name in names}
    if updates is not None:
        updates.update({name: d.detach() for name, d in changes.items()})
    ratio = sum((d.float() ** 2).sum() / (params[k].detach().float() ** 2).sum() for k, d in changes.items())
    metrics["edit/norm_ratio"] = float(ratio.detach())
    return ratio


@torch.no_grad()
def _edit_accuracy(logits: torch.Tensor, select: torch.Tensor, labels: torch.Tensor, n: int) -> float:
    """Share of the edits' target tokens (the first n rows) that are the argmax after the edit."""
    is_edit = select.nonzero()[:, 0] < n
    targets = next_tokens(labels)[select]
    return float((logits[is_edit].argmax(-1) == targets[is_edit]).float().mean())


def mean_logprobs(
    model: nn.Module, pairs: Sequence[Pair], pad_id: int, params: dict[str, torch.Tensor] | None,
    cache: PrefixCache | None = None,
) -> list[float]:
    """Mean per-token log-prob of each (prompt, target) pair, optionally under edited `params`."""
    device = next(model.parameters()).device
    ids, mask = pad_sequences([list(p) + list(t) for p, t in pairs], pad_id)
    labels = torch.full_like(ids, IGNORE)
    for row, (p, t) in enumerate(pairs):
        labels[row, len(p) : len(p) + len(t)] = torch.tensor(t)
    labels = labels.to(device)
    select = loss_positions(labels)
    with skipping_cached_blocks(cache, model, pairs, pad_id):
        logits = logits_at(model, ids.to(device), mask.to(device), select, params=params)
    return [-float(x) for x in per_request_nll(logits, labels, select)]


def harmonic_mean(*values: float) -> float:
    """The harmonic mean of rates in [0, 1] (a zero counts as 1e-9): high only when all of them are."""
    return len(values) / sum(1 / max(v, 1e-9) for v in values)


@torch.no_grad()
def evaluate_single_edits(
    model: nn.Module, network: nn.Module, examples: Sequence[EditExample], tokenizer, pad_id: int,
    positions: str = "loss", cache: PrefixCache | None = None, step_scales: Sequence[float] = (1.0,),
    preserver: KeyPreserver | None = None,
) -> dict[str, float]:
    """CounterFact ES/PS/NS of one edit at a time (the model itself is never written), the step
    scaled as the `mend` method does (MENDConfig.step_scales)."""
    from ..model.hooks import frozen

    base = unwrap(network)
    was_training = base.training
    base.eval()
    names = base.param_names
    totals = {"es": 0.0, "ps": 0.0, "ns": 0.0, "nll": 0.0}
    try:
        with frozen(model):
            for example in examples:
                batch = make_batch([example.edit], pad_id, next(model.parameters()).device)
                with torch.enable_grad(), skipping_cached_blocks(cache, model, [example.edit], pad_id):
                    captured = capture(model, [module_of(x) for x in names], names, batch, positions=positions)
                rows = edit_rows(base, captured.factors, preserver)
                transformed = scaled_step(model, pad_id, [example.edit], [rows], base,
                                          step_scales, captured.owners, cache=cache).rows
                params = dense_params(model, base, transformed)
                scores = mean_logprobs(model, cf_pairs(example, tokenizer), pad_id, params, cache)
                for key, value in counterfact_flags(scores).items():
                    totals[key] += value
                totals["nll"] -= scores[0]
    finally:
        base.train(was_training)
    count = max(1, len(examples))
    out = {f"val/{k}": v / count for k, v in totals.items()}
    out["val/score"] = harmonic_mean(out["val/es"], out["val/ps"], out["val/ns"])
    return out


KEPT_DRIFT_TEXTS = 16  # shipped reference samples read before and after the kept edits (drift.py)
KEPT_DRIFT_TOKENS = 128
# The stream length the drift is judged at: issue 19's 200 kept edits. A validation stream is shorter, and
# 40 edits' drift barely tells an editor that will stop at the guard after 100 from one that keeps 200
# (1.038× against 1.009×: docs/lifelong.md, "Lifelong editing"), so the score reads the drift at the same rate per
# edit over this many.
KEPT_HORIZON = 200


def evaluate_kept_edits(
    model: nn.Module, tokenizer, checkpoint: str | Path, examples: Sequence[EditExample], pad_id: int,
    cache: PrefixCache | None = None,
) -> dict[str, float]:
    """What a stream of edits gets from the `mend` method, read as a user meets it: an Editor with the
    editor at `checkpoint` and the method's defaults (lifelong statistics, second step, drift guard)
    edits `examples` one after another and keeps them; then every fact's CounterFact ES/PS/NS is read at
    the final weights (val/kept_es, _ps, _ns; a refused edit stays unapplied, val/kept_refused is their
    share) and the drift of the whole model (val/kept_drift: the perplexity of shipped reference samples
    after, over before; val/kept_drift_horizon: that at the same rate per edit over KEPT_HORIZON edits).
    val/kept_score is the harmonic mean of the three rates and 1/kept_drift_horizon (capped at 1). Every
    edit is reverted afterwards (exactly, as the Editor does)."""
    from ..core.errors import DriftError
    from ..editing.editor import Editor
    from ..model.hooks import frozen
    from ..safety.drift import reference_perplexity
    from ..safety.reference import reference_texts

    texts = reference_texts("samples")[:KEPT_DRIFT_TEXTS]
    totals, refused = {"es": 0.0, "ps": 0.0, "ns": 0.0}, 0
    with torch.no_grad(), frozen(model):
        before = reference_perplexity(model, tokenizer, texts, max_tokens=KEPT_DRIFT_TOKENS)
        editor = Editor("mend", tokenizer=tokenizer, score=False, checkpoint=str(checkpoint))
        try:
            for example in examples:
                try:
                    editor.edit_batch(model, [example.edit.request])
                except DriftError:
                    refused += 1
            for example in examples:
                flags = counterfact_flags(mean_logprobs(model, cf_pairs(example, tokenizer), pad_id, None, cache))
                for key in totals:
                    totals[key] += flags[key]
            drift = reference_perplexity(model, tokenizer, texts, max_tokens=KEPT_DRIFT_TOKENS) / before
        finally:
            editor.revert_all(model)
            editor.close()
    count = max(1, len(examples))
    out = {f"val/kept_{k}": v / count for k, v in totals.items()}
    horizon = drift ** (KEPT_HORIZON / count)
    out.update({"val/kept_refused": refused / count, "val/kept_drift": drift, "val/kept_drift_horizon": horizon})
    rates = (out["val/kept_es"], out["val/kept_ps"], out["val/kept_ns"], min(1.0, 1 / horizon))
    out["val/kept_score"] = harmonic_mean(*rates)
    return out
