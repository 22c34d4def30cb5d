"""The registered `mend` method: one forward and one backward pass of the base model per edit batch,
then the trained editor network turns the captured u/δ rows into low-rank factors.

The checkpoint is loaded once, when the method is built (`Editor("mend", ...)`); the base model is
checked against it the first time `compute` sees that model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.delta import Delta, ParamDelta
from ..core.errors import ConfigError
from ..core.methods import MethodSpec, StreamState
from ..core.request import TokenizedRequest, max_context
from ..model.contexts import ContextPrefixes
from ..model.hooks import frozen
from ..model.specs import layer_index, mlp_param_names, module_of, weight_layout
from ..safety.keys import anchor_keys
from ..safety.preserve import KeyPreserver
from ..scoring.batches import chat_requests, loss_positions, make_batch, next_tokens, prefixed_requests
from ..scoring.sequences import logits_at, pad_id_of
from .capture import capture
from .checkpoint import MENDCheckpoint, check_model, load_checkpoint
from .config import MENDConfig
from .network import EditedParam, MENDNetwork, Stats, dense_update
from .prefix import PrefixCache

LOG = logging.getLogger(__name__)


def length_groups(requests: Sequence[TokenizedRequest], size: int | None) -> list[list[TokenizedRequest]]:
    """Requests sorted by length, in passes of at most `size` (None: one pass): less padding.

    The edit loss is a sum over requests, so the passes' u/δ rows together are those of one pass.
    """
    ordered = sorted(requests, key=lambda r: len(r.input_ids))
    if size is None:
        return [ordered]
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def edited_params(model: nn.Module, layers: Sequence[int], matrices: Sequence[str]) -> list[EditedParam]:
    """The matrices MEND edits, with their widths and layouts (from the ModelSpec, never from shapes)."""
    out = []
    params = dict(model.named_parameters())
    for name in mlp_param_names(model, layers, matrices):
        layout = weight_layout(model, name)
        rows, cols = params[name].shape
        d_in, d_out = (rows, cols) if layout == "in_out" else (cols, rows)
        out.append(EditedParam(name, int(d_in), int(d_out), layout))
    return out


def new_network(
    model: nn.Module, layers: Sequence[int] = (-3, -2, -1), matrices: Sequence[str] = ("gate", "in", "out"),
    *, rank: int = 256, n_hidden: int = 1, alpha_init: float = 1.0, aggregation: str = "sum",
) -> MENDNetwork:
    """An untrained editor for `model` (identity network, no statistics, step size `alpha_init`)."""
    return MENDNetwork(edited_params(model, layers, matrices), rank=rank, n_hidden=n_hidden,
                       alpha_init=alpha_init, aggregation=aggregation)


def edit_rows(
    network: MENDNetwork, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], preserver: KeyPreserver | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The editor's update as rows (x (N, d_in), v (N, d_out)), ΔW = Σ v xᵀ, by its aggregation
    (network.py): the transformed rows themselves, or the least-squares fit of the values at the keys."""
    return candidate_rows(network, factors, preserver, (None,))[0]


def candidate_rows(
    network: MENDNetwork, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], preserver: KeyPreserver | None,
    ridges: Sequence[float | None], stats: dict[str, Stats] | None = None, key_weighted: bool = False,
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """`edit_rows` under each ridge of the least-squares solve (None = the preserver's own); one
    candidate for editors that sum their rows (a ridge means nothing to them). `stats` normalise
    instead of the network's own (lifelong editing); `key_weighted` scales each value by its
    normalised key's squared norm ‖ũ‖² (UltraEdit's value rule)."""
    transformed = network(factors, stats)
    if key_weighted:
        transformed = {name: (u_t, d_t * (u_t * u_t).sum(-1, keepdim=True)) for name, (u_t, d_t) in transformed.items()}
    if getattr(network, "module", network).aggregation == "sum":  # DDP wraps the network in .module
        return [transformed]
    if preserver is None:
        raise ConfigError(
            "this MEND editor aggregates by least squares in the null space of preserved keys; "
            "it needs `preserve` (a PreserveConfig), not None"
        )
    keys = {name: u for name, (u, _) in factors.items()}
    values = {name: v for name, (_, v) in transformed.items()}
    return [preserver.solve_rows(keys, values, ridge) for ridge in ridges]


def lifelong_stats(
    network: MENDNetwork, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], stream: StreamState | None, tag: str,
    initial: Callable[[], dict[str, Stats]] | None = None,
) -> dict[str, Stats] | None:
    """The statistics this edit normalises with: those the stream carries (else `initial()`, called
    only then, else the network's own) with the edit's rows merged in; `stream.after` gets them. None
    without a stream (frozen statistics). `tag` names the editor the statistics belong to: another
    editor's are not used."""
    if stream is None:
        return None
    start = stats_from_tensors(stream.before, tag, network.stats()) if stream.before else None
    if start is None:
        start = initial() if initial is not None else network.stats()
    merged = network.merged_stats(start, rows)
    stream.after = stats_to_tensors(merged, tag)
    return merged


def stats_to_tensors(stats: dict[str, Stats], tag: str) -> dict[str, torch.Tensor]:
    return {name: t for key, s in stats.items() for name, t in s.tensors(f"{tag}/{key}").items()}


def stats_from_tensors(
    tensors: dict[str, torch.Tensor], tag: str, like: dict[str, Stats],
) -> dict[str, Stats] | None:
    """Statistics for the shape keys of `like` from `stats_to_tensors` output; None when they belong to
    another editor (tag) or another shape."""
    try:
        loaded = {key: Stats.from_tensors(tensors, f"{tag}/{key}") for key in like}
    except KeyError:
        LOG.info("the stream's statistics belong to another editor; starting from this editor's own")
        return None
    if any(loaded[k].mean.shape != like[k].mean.shape for k in like):
        return None
    return loaded


def capture_rows(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
    names: Sequence[str], positions: str, pass_size: int | None, checks: PrefixCache | None,
    params: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """(rows, owners): every request's u/δ rows per matrix (one forward and backward per pass of
    `length_groups`) and each row's request as an index into the length-sorted order. With `checks`
    the hidden states entering the first edited block are recorded, so step checks run only the
    edited blocks; a capture of requests whose states are kept (a second step's) runs only those
    blocks too. `params` replace the model's own tensors (a second step's capture at W + ΔW; only
    edited blocks differ, so the kept states below them hold). Keyed on the subject, `requests` carry
    their anchors (`edit_requests`)."""
    device = next(model.parameters()).device
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    owners, seen = [], 0
    pad_id = pad_id_of(tokenizer)
    with frozen(model):
        for group in length_groups(requests, pass_size):
            batch = make_batch(group, pad_id, device)
            with _below_edited_blocks(model, checks, group, pad_id):
                captured = capture(model, [module_of(n) for n in names], names, batch, positions=positions,
                                   params=params)
            for name in names:
                factors[name].append(captured.factors[name])
            owners.append(captured.owners + seen)
            seen += len(group)
    rows = {n: (torch.cat([u for u, _ in f]), torch.cat([d for _, d in f])) for n, f in factors.items()}
    return rows, torch.cat(owners)


def capture_with_followers(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
    following: Sequence[TokenizedRequest], names: Sequence[str], positions: str, pass_size: int | None,
    checks: PrefixCache | None, params: dict[str, torch.Tensor] | None = None,
    averaged: Sequence[TokenizedRequest] = (), mean_with_request: bool = True,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """`capture_rows` of `requests` and of the rows that follow their facts (the chat rows of
    `chat_requests`; with `prefix_rows="follow"`, the prefixed prompts), each follower's rows owned by
    its fact's first request: a follower takes that request's step scale and steps, and the step checks
    read the requests alone (the chat row checked as well had to lead by the margin in the chat too: one
    at a time that cost 19 forward+backward passes an edit against 7.5, docs/lifelong.md). `averaged`
    (`prefix_rows` "mean" and "mean_follow", keyed on the subject: one row a request) are more contexts
    of the same facts whose rows are averaged into one row a fact, MEMIT's key averaged over contexts:
    with `mean_with_request` the fact's first request's row is one of them, else that row stays as it
    is and the contexts' mean follows its step. Followers and contexts of facts not among `requests`
    are left out."""
    leader = {}  # id(EditRequest) -> the first request of that fact
    for r in requests:
        leader.setdefault(id(r.request), r)
    followers = [c for c in following if id(c.request) in leader]
    joined = [c for c in averaged if id(c.request) in leader]
    if not followers and not joined:
        return capture_rows(model, tokenizer, requests, names, positions, pass_size, checks, params)
    if joined and positions != "subject":
        raise ValueError('rows are averaged over contexts only for an edit keyed on the subject (positions="subject")')
    everything = [*requests, *followers, *joined]
    rows, owners = capture_rows(model, tokenizer, everything, names, positions, pass_size, checks, params)
    index = {id(r): i for i, r in enumerate(r for group in length_groups(requests, pass_size) for r in group)}
    captured = [r for group in length_groups(everything, pass_size) for r in group]
    joined_ids = {id(c) for c in joined}
    others = joined_ids | {id(c) for c in followers}
    owner_of = torch.tensor([index[id(leader[id(r.request)]) if id(r) in others else id(r)] for r in captured])
    owned = owner_of.to(owners.device)[owners]  # (rows,): each row's request among `requests`
    if not joined:
        return rows, owned
    pooled_ids = joined_ids | ({id(r) for r in requests} if mean_with_request else set())
    pooled = torch.tensor([id(r) in pooled_ids for r in captured], device=owners.device)[owners]
    return averaged_rows(rows, owned, pooled, len(requests))


def averaged_rows(
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]], owners: torch.Tensor, pooled: torch.Tensor, count: int,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """One row per request that owns `pooled` rows, the mean of those, then the other rows as they are;
    owners (rows,) in the same order (`count` requests)."""
    pooled_owners, kept = owners[pooled], (~pooled).nonzero().squeeze(-1)
    counts = torch.bincount(pooled_owners, minlength=count)  # (count,)
    present = counts.nonzero().squeeze(-1)  # (P,) the requests with a mean row
    out = {}
    for name, (u, d) in rows.items():  # u (rows, in), d (rows, out)
        means = [torch.zeros(count, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, pooled_owners, x[pooled])
                 [present] / counts[present, None].to(x.dtype) for x in (u, d)]  # (P, in), (P, out)
        out[name] = (torch.cat([means[0], u[kept]]), torch.cat([means[1], d[kept]]))
    return out, torch.cat([present, owners[kept]])


def _below_edited_blocks(
    model: nn.Module, checks: PrefixCache | None, group: Sequence[TokenizedRequest], pad_id: int,
) -> contextlib.AbstractContextManager:
    """The blocks below the edited ones for a capture of `group`: skipped where `checks` keeps every
    row's states, else run and their output recorded into `checks` (nothing without `checks`)."""
    if checks is None:
        return nullcontext()
    sequences = [tuple(r.input_ids) for r in group]
    if all(seq in checks.store for seq in sequences):
        return checks.skipping(model, sequences, pad_id)
    return checks.recording(model, sequences)


def edit_requests(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
    prefixes: ContextPrefixes | None, positions: str, chat: bool = False,
) -> list[TokenizedRequest]:
    """The requests an edit captures: each under each of `prefixes` (`prefixed_requests`; the prompt
    alone without), then with `chat` each asked through the chat template (`chat_requests`), each
    carrying its subject's last token as `anchor` when keyed there."""
    out = list(requests)
    if prefixes is not None or positions == "subject":
        contexts = prefixes.get(model, tokenizer) if prefixes is not None else ("",)
        out = prefixed_requests(requests, tokenizer, contexts, max_context(model.config),
                                anchored=positions == "subject")
    if chat:
        out += chat_requests(requests, tokenizer, max_context(model.config), anchored=positions == "subject")
    return out


def subject_keys(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, names: Sequence[str],
    requests: Sequence[TokenizedRequest], prefixes: ContextPrefixes | None, chat: bool = False,
) -> dict[str, torch.Tensor]:
    """{name: (N, in)}: the keys a subject-keyed edit (positions="subject") wrote at, the inputs of the
    matrices `names` at the subject's last token of each request in each context it was edited in: what
    later edits hold when `preserve.protect_edits` is on (safeguards.KeysFn)."""
    modules = {name: module_of(name) for name in names}
    anchored = edit_requests(model, tokenizer, requests, prefixes, "subject", chat)
    keys = anchor_keys(model, tokenizer, sorted(set(modules.values())), anchored)
    return {name: keys[module] for name, module in modules.items()}


def subject_keys_fn(
    positions: str, prefixes: ContextPrefixes | None, chat: bool = False,
) -> Callable[..., dict[str, torch.Tensor]] | None:
    """The `edit_keys` of an editor network method: `subject_keys` for a subject-keyed edit; None = the
    keys of every token of its prompt and target (safeguards)."""
    return functools.partial(subject_keys, prefixes=prefixes, chat=chat) if positions == "subject" else None


def factors_to_delta(network: MENDNetwork, transformed: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Delta:
    """Low-rank ParamDeltas in each parameter's layout from rows ũ (N, d_in) and −α·δ̃ (N, d_out)."""
    params = {}
    for p in network.params:
        u_t, d_t = transformed[p.name]
        u_t, d_t = u_t.detach(), d_t.detach()
        if p.layout == "in_out":
            params[p.name] = ParamDelta(left=u_t.T.contiguous(), right=d_t.contiguous())  # (d_in, N), (N, d_out)
        else:
            params[p.name] = ParamDelta(left=d_t.T.contiguous(), right=u_t.contiguous())  # (d_out, N), (N, d_in)
    return Delta(params)


class MEND:
    """Computes MEND deltas with a loaded editor (see module docstring)."""

    def __init__(self, config: MENDConfig, checkpoint: MENDCheckpoint | None = None) -> None:
        self.config = config
        self.checkpoint = checkpoint if checkpoint is not None else load_checkpoint(config.checkpoint)
        self.network = self.checkpoint.network.eval()
        self.prefixes = ContextPrefixes.of(config.prefixes)
        self._checked: weakref.WeakSet = weakref.WeakSet()

    def param_names(self, model: nn.Module) -> list[str]:
        return self._check(model)

    @property
    def positions(self) -> str:
        """The positions feeding the editor: the config's, else those the checkpoint was trained with."""
        trained = self.checkpoint.meta.get("train_config", {}).get("positions", "loss")
        return self.config.positions or trained

    def _check(self, model: nn.Module) -> list[str]:
        if model not in self._checked:
            check_model(self.checkpoint, model)
        if self.config.layers is None and self.config.matrices is None:
            self._checked.add(model)
            return self.network.param_names
        trained = self.checkpoint.meta.get("train_config", {})
        layers = self.config.layers if self.config.layers is not None else trained.get("layers", ())
        matrices = self.config.matrices if self.config.matrices is not None else trained.get("matrices", ())
        names = mlp_param_names(model, layers, matrices)
        if sorted(names) != sorted(self.network.param_names):
            raise ConfigError(
                f"layers={layers} matrices={matrices} select {names}, but the MEND "
                f"checkpoint edits {self.network.param_names}; pass the layers/matrices it was trained for"
            )
        self._checked.add(model)
        return self.network.param_names

    @property
    def edit_keys(self) -> Callable[..., dict[str, torch.Tensor]] | None:
        """The keys an edit protects (with `preserve.protect_edits`): a subject-keyed edit's own
        (`subject_keys`); None = those of every token of its prompt and target."""
        return subject_keys_fn(self.positions, self.prefixes, self.config.chat_context)

    @property
    def stream_tag(self) -> str:
        """Names this editor's statistics in a stream (another checkpoint's are not used)."""
        return "mend-" + str(self.checkpoint.meta.get("weights_sha256", "untracked"))[:16]

    def compute(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
        preserver: KeyPreserver | None = None, stream: StreamState | None = None,
    ) -> Delta:
        """The editor's delta for `requests`; with `stream` (and `lifelong`) the normalisation statistics
        continue from the stream's and the new ones go back into it (StreamState)."""
        names = self._check(model)
        network = self.network.to(next(model.parameters()).device)
        return edit_with_network(model, tokenizer, requests, network, names, preserver,
                                 stream if self.config.lifelong else None, self.stream_tag,
                                 positions=self.positions, pass_size=self.config.pass_size,
                                 step_scales=self.config.step_scales, fallback_ridges=self.config.fallback_ridges,
                                 extra_steps=self.config.extra_steps, prefixes=self.prefixes,
                                 take_margin=self.config.take_margin, finish_steps=self.config.finish_steps,
                                 chat=self.config.chat_context, prefix_rows=self.config.prefix_rows)


def edit_with_network(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
    network: MENDNetwork, names: Sequence[str], preserver: KeyPreserver | None, stream: StreamState | None,
    tag: str, *, positions: str, pass_size: int | None, step_scales: Sequence[float],
    fallback_ridges: Sequence[float] = (), key_weighted: bool = False,
    initial: Callable[[], dict[str, Stats]] | None = None, extra_steps: int = 0,
    prefixes: ContextPrefixes | None = None, take_margin: float = 0.0, finish_steps: int = 0, chat: bool = False,
    prefix_rows: str = "checked",
) -> Delta:
    """One edit by an editor network (MEND's, or the identity for `ultraedit`): capture the rows,
    normalise them (lifelong when `stream` is given), transform, aggregate, scale the step; then up
    to `extra_steps` more steps for the requests whose target is not yet the argmax, and after them up
    to `finish_steps` more keyed at the "loss" positions (for a subject-keyed edit still short of its
    target). With `prefixes` each request under each of them is one more request of the edit
    (`prefixed_requests`; `prefix_rows`: "checked" as the request is, "follow" its step, "mean": its
    rows averaged with the request's, or "mean_follow": averaged into one row that follows its step),
    and with `chat` each asked through the chat template (`chat_requests`, following its step). A
    target takes once each of its tokens leads every other by `take_margin` in log-probability (0: is
    the argmax)."""
    context = max_context(model.config)
    following = chat_requests(requests, tokenizer, context, anchored=positions == "subject") if chat else []
    averaged: list[TokenizedRequest] = []
    own = {(id(r.request), r.prompt_ids) for r in requests}  # each request's prompt alone
    requests = edit_requests(model, tokenizer, requests, prefixes, positions)
    if prefixes is not None and prefix_rows != "checked":
        prefixed = [r for r in requests if (id(r.request), r.prompt_ids) not in own]
        averaged, following = ((prefixed, following) if prefix_rows in ("mean", "mean_follow")
                               else ([], prefixed + following))
        requests = [r for r in requests if (id(r.request), r.prompt_ids) in own]
    mean_with_request = prefix_rows == "mean"

    def contexts_at(step_positions: str) -> tuple[list[TokenizedRequest], list[TokenizedRequest]]:
        """(following, averaged) for a capture at `step_positions`: averaging needs one row a request
        (keyed on the subject); elsewhere the averaged contexts follow."""
        return (following, averaged) if step_positions == "subject" else ([*averaged, *following], [])

    # More than one level to check: the capture pass records the hidden states entering the first
    # edited block, so each check runs only the edited blocks.
    checks = None
    if len(step_scales) > 1 or fallback_ridges or extra_steps or finish_steps:
        checks = PrefixCache(model, min(layer_index(model, n) for n in names))
    step_following, step_averaged = contexts_at(positions)
    rows, owners = capture_with_followers(model, tokenizer, requests, step_following, names, positions, pass_size,
                                          checks, averaged=step_averaged, mean_with_request=mean_with_request)
    pad_id = pad_id_of(tokenizer)
    with torch.no_grad():
        stats = lifelong_stats(network, rows, stream, tag, initial)
        candidates = candidate_rows(network, rows, preserver, (None, *fallback_ridges), stats, key_weighted)
        step = scaled_step(model, pad_id, requests, candidates, network, step_scales, owners, pass_size, checks,
                           margin=take_margin)
    transformed, known = step.rows, step.taken  # known: each request's check under all steps so far, or None
    for step_positions in [positions] * extra_steps + ["loss"] * finish_steps:
        # A fresh gradient at the weights the steps so far left, for the requests still short of the
        # target: the same editor, normalisation, solve and step checks, its rows added to the update.
        params = dense_params(model, network, transformed)
        groups = length_groups(requests, pass_size)
        ordered = [r for group in groups for r in group]
        if known is None:
            with torch.no_grad():
                known = torch.cat([_targets_taken(model, pad_id, group, params, checks, take_margin)
                                   for group in groups])  # (R,) in `ordered` order
        missing = [r for r, ok in zip(ordered, known.tolist(), strict=True) if not ok]
        if not missing:
            break
        step_following, step_averaged = contexts_at(step_positions)
        rows, owners = capture_with_followers(model, tokenizer, missing, step_following, names, step_positions,
                                              pass_size, checks, params, averaged=step_averaged,
                                              mean_with_request=mean_with_request)
        with torch.no_grad():
            if stats is not None:  # lifelong: the second step's rows are seen too
                stats = network.merged_stats(stats, rows)
                stream.after = stats_to_tensors(stats, tag)
            candidates = candidate_rows(network, rows, preserver, (None, *fallback_ridges), stats, key_weighted)
            more = scaled_step(model, pad_id, missing, candidates, network, step_scales, owners, pass_size,
                               checks, base=params, margin=take_margin)
        transformed = {name: (torch.cat([u, more.rows[name][0]]), torch.cat([d, more.rows[name][1]]))
                       for name, (u, d) in transformed.items()}
        # The step's checks saw every request only when every request was still short; else check again.
        known = more.taken if len(missing) == len(requests) else None
    return factors_to_delta(network, transformed)


def dense_params(
    model: nn.Module, network: MENDNetwork, transformed: dict[str, tuple[torch.Tensor, torch.Tensor]],
    base: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """{name: W + ΔW} for `functional_call` (the model's own tensors are not written); `base` replaces W
    (the weights a first step left, for a second step)."""
    params = base if base is not None else dict(model.named_parameters())
    return {
        p.name: params[p.name].detach() + dense_update(*transformed[p.name], p.layout).to(params[p.name].dtype)
        for p in network.params
    }


class Step(NamedTuple):
    """A step of `scaled_step`: its rows (ũ, −α·δ̃) per matrix, and whether each request's target tokens
    are all the argmax under it ((R,) bool in length-sorted order; None where no check saw exactly
    this step)."""

    rows: dict[str, tuple[torch.Tensor, torch.Tensor]]
    taken: torch.Tensor | None


def scaled_step(
    model: nn.Module, pad_id: int, requests: Sequence[TokenizedRequest],
    candidates: Sequence[dict[str, tuple[torch.Tensor, torch.Tensor]]], network: MENDNetwork,
    step_scales: Sequence[float], owners: torch.Tensor, pass_size: int | None = None,
    cache: PrefixCache | None = None, base: dict[str, torch.Tensor] | None = None, margin: float = 0.0,
) -> Step:
    """The step each request gets: the smallest level under which every one of its target tokens is
    the argmax, given the others' steps; a request the largest level does not make take gets that one.
    The levels are each candidate (rows of the same shape, `candidate_rows`, smallest first) times
    each of `step_scales` (MENDConfig, increasing), an order in which the update only grows. A single
    level is applied unchecked.

    The search checks the smallest level, then the largest, then bisects between them. The two ends
    are where most steps of a lifelong edit are decided: its first steps often fall short even at the
    largest level (one check settles them, where a search upwards spends one per level), and a step
    near the target often takes at the smallest, where a larger one can overshoot to another token.
    Between the ends the search assumes that a larger step takes where a smaller one does: 2 + ⌈log2 L⌉
    checks of L levels at most, each fact of a batch on its own level.

    owners (N,): each row's request, as an index into the length-sorted order of `length_groups`.
    With `cache` holding the requests' states below the edited blocks, checks run only those blocks.
    `base`: the weights the step is added to (dense_params). `margin`: what "takes" asks (_targets_taken).
    """
    n_levels = len(candidates) * len(step_scales)
    scales = torch.tensor(step_scales, dtype=torch.float32, device=owners.device).repeat(len(candidates))  # (L,)
    which = torch.arange(len(candidates), device=owners.device).repeat_interleave(len(step_scales))  # (L,)

    def rows_at(level: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # level (R,)
        return _rows_at(candidates, which[level][owners], scales[level][owners])

    top = torch.full((len(requests),), n_levels - 1, dtype=torch.long, device=owners.device)  # (R,)
    if n_levels == 1:
        return Step(rows_at(top), None)
    groups = length_groups(requests, pass_size)
    checked: dict[tuple[int, ...], torch.Tensor] = {}  # levels (R,) -> taken (R,) of each check

    def check(level: torch.Tensor) -> torch.Tensor:
        key = tuple(level.tolist())
        if key not in checked:
            params = dense_params(model, network, rows_at(level), base)
            taken = torch.cat([_targets_taken(model, pad_id, group, params, cache, margin)
                               for group in groups])  # (R,)
            checked[key] = taken.to(level.device)
        return checked[key]

    # Per request, [low, high] holds the smallest level that takes (the top stands for "none does")
    # and is bisected while low < high. A request settles at the bottom when it takes there, at the
    # top when it does not take there either.
    low, high = torch.zeros_like(top), top.clone()
    at_bottom = check(low)
    high = torch.where(at_bottom, low, high)
    at_top = check(high)
    low = torch.where(at_bottom | ~at_top, high, low + 1)
    while bool((low < high).any()):
        active = low < high
        middle = torch.where(active, (low + high) // 2, high)
        taken = check(middle)
        high = torch.where(active & taken, middle, high)
        low = torch.where(active & ~taken, middle + 1, low)
    return Step(rows_at(high), checked.get(tuple(high.tolist())))


def _rows_at(
    candidates: Sequence[dict[str, tuple[torch.Tensor, torch.Tensor]]], row_candidate: torch.Tensor,
    row_scale: torch.Tensor,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rows (ũ, −α·δ̃) with row i taken from candidate row_candidate[i] (N,) and its δ̃ times row_scale[i]."""
    if len(candidates) == 1:
        return candidates[0] if bool((row_scale == 1.0).all()) else _rows_scaled(candidates[0], row_scale)
    index = row_candidate.to(torch.long)
    rows = torch.arange(index.shape[0], device=index.device)
    picked = {
        name: (torch.stack([c[name][0] for c in candidates])[index, rows],  # (L, N, d_in) -> (N, d_in)
               torch.stack([c[name][1] for c in candidates])[index, rows])  # (L, N, d_out) -> (N, d_out)
        for name in candidates[0]
    }
    return _rows_scaled(picked, row_scale)


def _rows_scaled(
    transformed: dict[str, tuple[torch.Tensor, torch.Tensor]], row_scale: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rows (ũ, −α·δ̃) with each δ̃ row times its scale (N,)."""
    return {name: (u_t, d_t * row_scale.to(d_t)[:, None]) for name, (u_t, d_t) in transformed.items()}


def _targets_taken(
    model: nn.Module, pad_id: int, requests: Sequence[TokenizedRequest], params: dict[str, torch.Tensor],
    cache: PrefixCache | None = None, margin: float = 0.0,
) -> torch.Tensor:
    """(B,) bool: whether every target token of each request is the argmax under `params`, and with
    `margin` > 0 also leads the runner-up token by at least `margin` (logits, i.e. log-probabilities)."""
    batch = make_batch(requests, pad_id, next(model.parameters()).device)
    select = loss_positions(batch.labels)  # (B, T)
    skip = cache.skipping(model, [tuple(r.input_ids) for r in requests], pad_id) if cache else nullcontext()
    with skip:
        logits = logits_at(model, batch.input_ids, batch.attention_mask, select, params=params)  # (M, V)
    targets = next_tokens(batch.labels)[select]  # (M,)
    misses = logits.argmax(-1) != targets  # (M,)
    if margin > 0:
        runner_up = logits.scatter(-1, targets[:, None], float("-inf")).amax(-1)  # (M,)
        misses |= logits.gather(-1, targets[:, None])[:, 0] - runner_up < margin
    request_of = select.nonzero()[:, 0]  # (M,) row-major, as logits_at returns them
    return torch.zeros(len(requests), device=misses.device).index_add(0, request_of, misses.float()) == 0


def build(config: MENDConfig) -> MEND:
    return MEND(config)


METHOD = MethodSpec("mend", MENDConfig, build, guarded=True)
