"""What an edit would do, or did, scored with the model's weights untouched.

- `preview_delta`: an edit's delta, computed but not applied (`Editor.preview`), scored on its prompts,
  paraphrases, locality prompts and probes with the delta added to the current weights through
  `torch.func.functional_call` (views.py's `FunctionalModel`). `Editor.apply_preview` then applies
  exactly that delta, as `import_edit` applies a stored one.
- `edit_effect`: the same scores for an edit already made, on the current weights: an active edit
  against the weights without it (the other active edits kept), a reverted one against the current
  weights with it re-applied. Either way the columns show what the edit does.
- `compare_prompts`: per prompt, the top next tokens of two versions of a model, the probability of
  the answer before under the other version, and the largest change of any next token's probability
  over the whole vocabulary (`shift`), so a change that is not a top-1 flip is seen too.

functional_call swaps the module's parameters for the duration of a call: another thread running the
same model at that moment would see the swapped tensors. Callers that share a model across threads
hold it alone meanwhile (EditSession does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from cachetools import LRUCache
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.delta import Delta
from ..core.errors import ConfigError, InvalidRequestError
from ..core.record import EditRecord
from ..core.request import EditRequest, TokenizedRequest, encode_prompt, encode_target
from ..model.specs import layer_index
from ..model.views import FunctionalModel
from ..model.weights import WeightState, checked_updates
from ..safety.drift import GuardConfig
from ..scoring.sequences import (
    SequenceScore,
    pad_id_of,
    request_pairs,
    score_sequences,
    summarize_requests,
    top_tokens,
)
from .diff import ParamChange, param_changes
from .measured import Measured

# What a prompt is, in the rows below: the edit's own prompt, a paraphrase (scored on the target too),
# a locality prompt of the request, or a probe.
EDIT, PARAPHRASE, LOCALITY, PROBE = "edit", "paraphrase", "locality", "probe"


@dataclass(frozen=True)
class EditPreview:
    """An edit computed on the current weights and scored without being applied.

    rows: `compare_prompts` rows (kind edit / paraphrase / locality / probe), "before" = the current
        weights, "after" = with the delta added.
    weights: ids of the edits that were active when the delta was computed: `Editor.apply_preview`
        refuses the preview once they differ (the delta was fitted to those weights).
    """

    method: str
    config: Mapping[str, Any]
    requests: tuple[EditRequest, ...]
    rows: list[dict[str, Any]]
    params: list[ParamChange]
    layers: tuple[int, ...]  # transformer blocks the delta touches
    timings: Mapping[str, float]  # compute_ms (the method), score_ms (the rows and the norms)
    weights: tuple[str, ...]
    model_fingerprint: str
    delta: Delta = field(repr=False, compare=False)
    # A lifelong method's state after this delta (methods.StreamState.after); `apply_preview` keeps it.
    stream_state: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    drift: float | None = None  # what the drift guard would read with the delta applied (None: guard off)
    max_drift: float | None = None  # the guard's bound: past it, applying the delta is refused
    # What applying the delta would measure again (scores, the guard's reading); apply_preview reuses it.
    measured: Measured | None = field(default=None, repr=False, compare=False)

    @property
    def edit_row(self) -> dict[str, Any]:
        """The row of the (first) edit prompt."""
        return next(r for r in self.rows if r["kind"] == EDIT)

    @property
    def p_new(self) -> float:
        """p(target) on the edit prompt with the delta (joint probability of its tokens)."""
        return self.edit_row["target_after"]

    @property
    def p_old(self) -> float:
        """p(the current top-1 answer) on the edit prompt with the delta."""
        return self.edit_row["old"]["after"]

    @property
    def guard_refuses(self) -> bool:
        """Whether the drift guard would refuse to apply this delta on the weights it was previewed on."""
        return self.drift is not None and not self.drift <= self.max_drift  # NaN is refused too

    @property
    def norm(self) -> float:
        """‖Δ‖_F over every parameter the delta touches."""
        return sum(p.fro_norm**2 for p in self.params) ** 0.5

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "config": dict(self.config), "requests": [r.to_dict() for r in self.requests],
            "rows": self.rows, "params": [vars(p) for p in self.params], "layers": list(self.layers),
            "timings": dict(self.timings), "weights": list(self.weights), "p_new": self.p_new, "p_old": self.p_old,
            "norm": self.norm, "drift": self.drift, "max_drift": self.max_drift,
        }


def prompt_items(
    requests: Sequence[EditRequest], probes: Sequence[str] = ()
) -> list[tuple[str, str, str | None]]:
    """(kind, prompt, target or None) for every prompt of `requests`, then `probes` (each prompt once)."""
    items: list[tuple[str, str, str | None]] = []
    for request in requests:
        items.append((EDIT, request.prompt, request.target))
        items += [(PARAPHRASE, text, request.target) for text in request.paraphrases]
        items += [(LOCALITY, text, None) for text in request.locality]
    seen = {prompt for _, prompt, _ in items}
    items += [(PROBE, text, None) for text in dict.fromkeys(probes) if text not in seen]
    return items


@torch.no_grad()
def score_prompts(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, items: Sequence[tuple[str, str, str | None]]
) -> list[tuple[torch.Tensor, float | None]]:
    """Per (kind, prompt, target) item: the next-token log-distribution (vocab,) after the prompt and,
    with a target, its joint probability (the target joined as everywhere, request.py), in one pass."""
    pairs = [
        (encode_prompt(tokenizer, prompt), encode_target(tokenizer, prompt, target) if target else ())
        for _, prompt, target in items
    ]
    scores = score_sequences(model, pairs, pad_id_of(tokenizer))
    return [(s.next_logprobs, s.joint_prob if target else None)
            for s, (_, _, target) in zip(scores, items, strict=True)]


def compare_prompts(
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[tuple[str, str, str | None]],
    before: Sequence[tuple[torch.Tensor, float | None]],
    after: Sequence[tuple[torch.Tensor, float | None]],
    top_k: int = 5,
) -> list[dict[str, Any]]:
    """Rows {"kind", "prompt", "target", "before", "after" (top-k), "old" (the top-1 before, with its
    probability before and after), "shift" (signed, the largest change of any token's probability),
    "shift_token", "flipped" (the top-1 differs), "target_before", "target_after"}."""
    rows = []
    for (kind, prompt, target), (lp_before, t_before), (lp_after, t_after) in zip(items, before, after, strict=True):
        p_before, p_after = lp_before.exp(), lp_after.exp()
        change = p_after - p_before  # (vocab,)
        moved = int(change.abs().argmax())
        old = int(p_before.argmax())
        rows.append({
            "kind": kind, "prompt": prompt, "target": target,
            "before": top_tokens(tokenizer, lp_before, top_k), "after": top_tokens(tokenizer, lp_after, top_k),
            "old": {"token": tokenizer.decode([old]), "id": old, "before": round(float(p_before[old]), 6),
                    "after": round(float(p_after[old]), 6)},
            "shift": round(float(change[moved]), 6),
            "shift_token": {"token": tokenizer.decode([moved]), "id": moved,
                            "before": round(float(p_before[moved]), 6), "after": round(float(p_after[moved]), 6)},
            "flipped": old != int(p_after.argmax()),
            "target_before": t_before, "target_after": t_after,
        })
    return rows


def with_delta(model: nn.Module, delta: Delta) -> dict[str, torch.Tensor]:
    """The touched parameters' values with `delta` added, as applying it would write them (`W + Δ` in the
    parameter's dtype and device); the model is not changed."""
    params = dict(model.named_parameters())
    return {name: params[name].detach() + update for name, update in checked_updates(params, delta).items()}


def touched_layers(model: nn.Module, names: Sequence[str]) -> tuple[int, ...]:
    layers = set()
    for name in names:
        try:
            layers.add(layer_index(model, name))
        except ConfigError:  # a parameter outside the transformer blocks
            continue
    return tuple(sorted(layers))


def preview_delta(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    state: WeightState,
    delta: Delta,
    tokenized: Sequence[TokenizedRequest],
    probes: Sequence[str],
    *,
    token: tuple[Any, ...] = (),
    guard: GuardConfig | None = None,
    read_applied: Callable[[Mapping[str, torch.Tensor]], tuple[Mapping[int, float] | None, Any]] | None = None,
    kept: BeforeScores | None = None,
    **fields: Any,
) -> EditPreview:
    """Score `delta` on the requests and probes (module docstring), and read what applying it would read
    (`read_applied` of its new values: the guard's reading under `guard`, the keys to protect). What
    applying the delta would measure again is kept for `apply_preview` (measured.py), with the weights' `token`.
    `kept`: scores of the current weights kept from earlier previews. `fields`: the rest of EditPreview
    (method, config, timings, weights, model_fingerprint)."""
    requests = tuple(t.request for t in tokenized)
    items = prompt_items(requests, probes)
    extra = [prompt for kind, prompt, _ in items if kind == PROBE]
    with torch.no_grad():
        before = (kept or BeforeScores()).get(model, tokenizer, tokenized, extra, token)
        values = with_delta(model, delta)
        with state.side_as(model, extra=delta):  # a delta's side modules join the active ones meanwhile
            after = _score(FunctionalModel(model, values), tokenizer, tokenized, extra)
            drift, keys = read_applied(values) if read_applied is not None else (None, None)
    pre = summarize_requests(tokenizer, tokenized, before[0])
    old = [r["old_answer"]["id"] for r in pre["requests"]]
    post = summarize_requests(tokenizer, tokenized, after[0], old_answers=old)
    # param_changes reads only `.delta` of the record it is given; a dense rank waits for the diff (an SVD)
    changes = param_changes(SimpleNamespace(delta=delta), state, model, ranks=False)
    rows = compare_prompts(tokenizer, items, _as_items(items, [*before[0], *before[1]]),
                           _as_items(items, [*after[0], *after[1]]))
    return EditPreview(requests=requests, rows=rows, params=changes, layers=touched_layers(model, delta.names()),
                       delta=delta, drift=max(drift.values()) if drift else None,
                       max_drift=guard.max_ratio if guard is not None else None,
                       measured=Measured(token, pre, post, drift, guard, keys), **fields)


Scores = tuple[list[SequenceScore], list[SequenceScore]]  # (the requests' pairs, the probes)


def _score(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, tokenized: Sequence[TokenizedRequest], probes: Sequence[str],
) -> Scores:
    """(scores of the requests' pairs, exactly as `score_requests` scores them; scores of the probes)."""
    pad = pad_id_of(tokenizer)
    scored = score_sequences(model, request_pairs(tokenizer, tokenized), pad)
    return scored, score_sequences(model, [(encode_prompt(tokenizer, p), ()) for p in probes], pad) if probes else []


class BeforeScores:
    """The current weights' scores of a preview's prompts ("before"), kept per weights token (measured.py)
    and prompts: previews of one fact with several methods or settings on the same weights (a comparison)
    score them once. Scoring is deterministic, so a kept score is the one scoring again would give."""

    def __init__(self, size: int = 4) -> None:
        self._kept: LRUCache[tuple[Any, ...], Scores] = LRUCache(maxsize=size)

    def get(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, tokenized: Sequence[TokenizedRequest],
        probes: Sequence[str], token: tuple[Any, ...],
    ) -> Scores:
        pairs = tuple((tuple(p), tuple(t)) for p, t in request_pairs(tokenizer, tokenized))
        key = (token, pairs, tuple(probes))
        if key not in self._kept:
            self._kept[key] = _score(model, tokenizer, tokenized, probes)
        return self._kept[key]


def _as_items(
    items: Sequence[tuple[str, str, str | None]], scores: Sequence[SequenceScore],
) -> list[tuple[torch.Tensor, float | None]]:
    """`score_prompts`'s form of `scores` (one per item, in order)."""
    return [(s.next_logprobs, s.joint_prob if target else None)
            for s, (_, _, target) in zip(scores, items, strict=True)]


def edit_effect(
    record: EditRecord,
    state: WeightState,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    probes: Sequence[str],
) -> dict[str, Any]:
    """What `record`'s edit does on the current weights (module docstring): {"edit_id", "active",
    "params", "layers", "rows"}; "before"/"after" in the rows = without/with the edit."""
    items = prompt_items(record.requests, probes)
    active = record.id in state.active
    with torch.no_grad():
        if active:
            without = FunctionalModel(model, state.weights_without(model, record.id))
            with state.side_as(model, without=record.id):
                before = score_prompts(without, tokenizer, items)
            after = score_prompts(model, tokenizer, items)
        else:
            again = FunctionalModel(model, with_delta(model, record.delta))
            before = score_prompts(model, tokenizer, items)
            with state.side_as(model, extra=record.delta):
                after = score_prompts(again, tokenizer, items)
    return {
        "edit_id": record.id,
        "active": active,
        "params": [vars(p) for p in param_changes(record, state, model)],
        "layers": list(touched_layers(model, record.delta.names())),
        "rows": compare_prompts(tokenizer, items, before, after),
    }


def check_probes(probes: Sequence[str]) -> None:
    """Probes are a list of non-empty prompts (a string alone is a common slip)."""
    if isinstance(probes, str):
        raise InvalidRequestError(f"probes must be a list of prompts (write [{probes!r}] for one)")
    for probe in probes:
        if not isinstance(probe, str) or not probe.strip():
            raise InvalidRequestError(f"every probe must be a non-empty prompt, not {probe!r}")
