"""Drift of the whole model: perplexity of reference text, against the base model's, and the guard.

`reference_perplexity` is the perplexity of text sampled from the unedited default model
(`reference.py`); divided by the base model's value it is the drift ratio that evaluation reports and
the guard bounds (1.0 = unchanged; collapsing models reach 10-10⁹).

The guard (`DriftGuard`) measures the ratio on a few of those texts (the next few and the worst so
far, at each check) after an edit is applied and, past `max_ratio`, has the Editor undo the edit and
raise `DriftError` with the numbers: nothing changed, nothing journaled.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.errors import ConfigError, DriftError
from ..core.request import max_context
from ..model.replay import BlockForm, capture_block_input, start_at_block
from ..scoring.sequences import pad_id_of, pad_sequences
from .guard_store import GuardStore
from .reference import reference_texts

LOG = logging.getLogger(__name__)


@torch.no_grad()
def reference_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_tokens: int | None = None,
    batch_size: int = 16,
    params: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """exp(mean NLL) over every predicted token of `texts` (each cut at `max_tokens`).

    `params` replace some of the model's tensors (through `functional_call`; the model is not written),
    e.g. base values to measure the unedited model while edits are applied.
    """
    limits = [x for x in (max_tokens, max_context(model.config)) if x is not None]
    limit = min(limits) if limits else None
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        encoded = [tokenizer(t).input_ids[:limit] for t in texts[start : start + batch_size]]
        ids, mask = pad_sequences([e for e in encoded if len(e) > 1], pad_id_of(tokenizer))
        nll, tokens = _batch_nll(model, ids, mask, params)
        total, count = total + nll, count + tokens
    return math.exp(total / max(count, 1))


@torch.no_grad()
def batch_perplexity(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """exp(mean NLL) of one padded batch, ids and mask (B, T)."""
    nll, tokens = _batch_nll(model, ids, mask, params)
    return math.exp(nll / max(tokens, 1))


def _batch_nll(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, params: Mapping[str, torch.Tensor] | None,
) -> tuple[float, int]:
    """(summed NLL, predicted tokens) of one padded batch (B, T)."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if params:
        on_device = {name: value.to(device) for name, value in params.items()}
        logits = torch.func.functional_call(model, on_device, args=(), kwargs=kwargs, strict=False).logits
    else:
        logits = model(**kwargs).logits  # (B, T, V)
    logprobs = torch.log_softmax(logits[:, :-1].float(), -1)  # (B, T-1, V): position t predicts t + 1
    picked = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    valid = mask[:, 1:].bool()
    return -float(picked[valid].double().sum()), int(valid.sum())


@dataclass(frozen=True)
class GuardConfig:
    """The Editor's drift guard. `max_ratio`: largest allowed perplexity of the reference text after an
    edit, over the base model's; `texts`/`max_tokens`: the size of one group of the shipped samples
    (a check reads one or two groups, from the lowest edited block up; its time is `guard_ms`). 4 × 24
    follows the drift of all 64 samples as closely as 4 × 48 at half the cost (bench_guard.py, docs/accumulate.md).
    `quick_share`: a check that finds the next group, and every group's last reading, within this share
    of the allowed rise (`max_ratio` − 1) stops after that one group; otherwise it reads the worst group
    again too. 0: always both (DriftGuard's docstring says what the quick check gives up).
    `whole_from`: an edit of at least this many facts is checked on the whole reference text instead (all
    the shipped samples in full, evaluation's drift/ppl_ratio): many facts at once move the samples
    unevenly, and a few short groups read far below the whole (docs/evaluation.md, "The guard and a large batch").
    None: groups for every edit."""

    max_ratio: float = 1.5
    texts: int = 4
    max_tokens: int = 24
    quick_share: float = 0.5
    whole_from: int | None = 16

    def __post_init__(self) -> None:
        if not (isinstance(self.max_ratio, (int, float)) and self.max_ratio > 1.0):
            raise ConfigError(f"guard max_ratio must be a number > 1, got {self.max_ratio!r}")
        if not (isinstance(self.texts, int) and self.texts >= 1 and isinstance(self.max_tokens, int)
                and self.max_tokens >= 2):
            raise ConfigError("guard texts must be an int >= 1 and max_tokens an int >= 2")
        if not (isinstance(self.quick_share, (int, float)) and 0.0 <= self.quick_share < 1.0):
            raise ConfigError(f"guard quick_share must be a number in [0, 1), got {self.quick_share!r}")
        if self.whole_from is not None and not (isinstance(self.whole_from, int) and self.whole_from >= 1):
            raise ConfigError(f"guard whole_from must be an int >= 1 or None, got {self.whole_from!r}")

    def reads_whole(self, facts: int) -> bool:
        """Whether an edit of `facts` facts is checked on the whole reference text (`whole_from`)."""
        return self.whole_from is not None and facts >= self.whole_from

    @property
    def quick_limit(self) -> float:
        """The ratio up to which one group's reading may stand for the check (`quick_share`)."""
        return 1.0 + self.quick_share * (self.max_ratio - 1.0)


@dataclass
class _Group:
    """One group of reference texts the guard reads, and what is known of it."""

    texts: list[str]
    ids: torch.Tensor | None = None  # (B, T), tokenized on first read
    mask: torch.Tensor | None = None  # (B, T)
    base: float | None = None  # the base model's perplexity of it
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # block L -> its input (B, T, H) on base weights
    last: float | None = None  # its ratio when last read


WHOLE = -1  # the key of the whole reference text's ratio among a check's {group: ratio}
_NOT_REPLAYABLE = "not replayable"
_REPLAY_RTOL = 1e-4  # a replayed base perplexity must match the full pass's (cached inputs may come from
# another process, whose thread count can move the last bits)


class DriftGuard:
    """Measures drift against the base model's perplexity (see module docstring).

    The shipped samples are split into groups of `texts`. Each check reads the next group in turn and
    the group that read worst so far, and answers the larger ratio. Reading always the same few would
    let edits that spare them through while the rest drifts; reading only the next group lets edits
    through whenever it happens to be a mild one (a selection effect: after 1,000 attempted sequential
    `mend` edits, all 64 texts were at 2.7× under a 1.5× bound).

    The quick check (`GuardConfig.quick_share`): while every group's last reading and the next group's
    reading are far below the bound (by default under half of the allowed rise), the worst group is not
    read again and the check costs one group, not two. What it gives up: between two readings of a group,
    edits accepted on other groups' readings may raise it unseen; the rotation reads every group again
    within len(groups) checks, and the first reading past the quick limit brings back full checks until
    every group reads under it again, so what goes unseen is what that many edits add to a group already
    under the quick limit (kept edits move the guard's texts by thousandths each: docs/lifelong.md "Lifelong").

    Cost: the base model's perplexity of a group is measured the first time the group is read (or
    taken from `store`). When the caller says no parameter below block `start_layer` has been touched,
    the group's input to that block is kept from that first full pass (or the store), and reads run only
    blocks `start_layer`.. and the head (replay.py). Replaying is checked once per block: it must give
    a group's base perplexity again; where it does not, the guard reads in full.
    """

    def __init__(self, config: GuardConfig, store: GuardStore | None = None) -> None:
        self.config = config
        self.store = store
        self.samples = reference_texts("samples")
        size = min(config.texts, len(self.samples))
        self.groups = [_Group(self.samples[i : i + size]) for i in range(0, len(self.samples) - size + 1, size)]
        self._whole_base: float | None = None  # the base model's perplexity of every sample in full
        self._next = 0
        self._forms: dict[int, BlockForm | str] = {}  # block -> its checked output form, or _NOT_REPLAYABLE
        self.base_perplexity: float | None = None  # of the worst group of the last check

    def rotation(self) -> dict[str, Any]:
        """Where the rotation stands, as JSON: the config it runs under, the next group, each group's last
        ratio. A journal keeps it after every check, so that a reopened Editor's guard reads the groups
        and makes the decisions the writer's would have (`resume`)."""
        return {"config": asdict(self.config), "next": self._next, "last": [g.last for g in self.groups]}

    def resume(self, rotation: Mapping[str, Any]) -> bool:
        """Take up a `rotation()` made under this guard's config (and so its groups); False, nothing
        taken, for another config (its guard would have started afresh, as this one does) or a malformed one."""
        last = rotation.get("last")
        if (rotation.get("config") != asdict(self.config) or not isinstance(last, list)
                or len(last) != len(self.groups) or not isinstance(rotation.get("next"), int)
                or not 0 <= rotation["next"] < len(self.groups)
                or not all(x is None or isinstance(x, (int, float)) for x in last)):
            return False
        for group, value in zip(self.groups, last, strict=True):
            group.last = None if value is None else float(value)
        self._next = rotation["next"]
        return True

    def plan(self) -> tuple[int, ...]:
        """The groups a full check reads: the next group in turn, and the group that read worst so far (the
        quick check reads only the first)."""
        index = self._next
        read = [i for i, g in enumerate(self.groups) if g.last is not None]
        worst = max(read, key=lambda i: self.groups[i].last, default=index)
        return tuple(dict.fromkeys((index, worst)))

    def ratio(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, base_params: Mapping[str, torch.Tensor],
        start_layer: int | None = None, known: Mapping[int, float] | None = None, whole: bool = False,
    ) -> float:
        """The larger perplexity ratio, over the base model's, of the next group of texts and, unless the
        quick check lets that reading stand, of the worst group so far (`plan`); with `whole`, of every
        sample in full instead. `base_params` hold the base values of the parameters edits have touched;
        `start_layer`, when given, is a block below which no parameter has been touched. `known`: ratios
        of groups already read on these very weights (`read` during a preview); those groups are not
        read again. A group check is recorded (the rotation moves on, `last` is set)."""
        known = known or {}
        ratios = self._check(lambda i: known[i] if i in known else self._read(
            model, tokenizer, i, base_params, start_layer, None), whole)
        if WHOLE in ratios:
            self.base_perplexity = self._whole_base
            return ratios[WHOLE]
        for i, value in ratios.items():
            self.groups[i].last = value
        self._next = (self._next + 1) % len(self.groups)
        chosen = max(ratios, key=ratios.__getitem__)
        self.base_perplexity = self.groups[chosen].base
        return ratios[chosen]

    def read(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, base_params: Mapping[str, torch.Tensor],
        start_layer: int | None, params: Mapping[str, torch.Tensor], whole: bool = False,
    ) -> dict[int, float]:
        """{group: ratio} of the groups the next check reads (`plan`, quick check included; {WHOLE: ratio}
        with `whole`), with `params` swapped in for the model's own (an edit not applied yet, through
        functional_call); nothing is recorded, so a preview can read what applying its delta would, and
        `ratio(known=...)` take it over."""
        return self._check(lambda i: self._read(model, tokenizer, i, base_params, start_layer, params), whole)

    def _check(self, read: Callable[[int], float], whole: bool = False) -> dict[int, float]:
        """{group: ratio} of one check: the next group (`plan`'s first) by `read`, then the worst group,
        unless the quick check lets the first reading stand (class docstring); {WHOLE: ratio} with
        `whole`. Nothing is recorded."""
        if whole:
            return {WHOLE: read(WHOLE)}
        first, *rest = self.plan()
        ratios = {first: read(first)}
        lasts = [g.last for g in self.groups if g.last is not None]
        limit = self.config.quick_limit
        if rest and not (ratios[first] <= limit and lasts and max(lasts) <= limit):
            ratios[rest[0]] = read(rest[0])
        return ratios

    def _read(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, index: int,
        base_params: Mapping[str, torch.Tensor], start_layer: int | None, params: Mapping[str, torch.Tensor] | None,
    ) -> float:
        """One group's ratio on the model (with `params` swapped in), its base prepared first; for WHOLE, every
        sample's in full (`reference_perplexity`, as evaluation reads drift)."""
        if index == WHOLE:
            if self._whole_base is None:
                self._whole_base = reference_perplexity(model, tokenizer, self.samples, params=base_params)
            return reference_perplexity(model, tokenizer, self.samples, params=params) / self._whole_base
        group, layer = self._checked(model, tokenizer, index, base_params, start_layer)
        return self._perplexity(model, group, params, layer) / group.base

    def _checked(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, index: int,
        base_params: Mapping[str, torch.Tensor], start_layer: int | None,
    ) -> tuple[_Group, int | None]:
        """`_prepared`, with replay from the group's start block checked (once per block)."""
        group, layer = self._prepared(model, tokenizer, index, base_params, start_layer)
        if layer is not None and layer not in self._forms and not self._check_replay(model, group, base_params, layer):
            # The stored base perplexity and block input are not this model's: compute both again
            # with a full pass (and store them), then check once more.
            group.base, group.hidden = None, {}
            group, layer = self._prepared(model, tokenizer, index, base_params, start_layer)
            if layer is not None and not self._check_replay(model, group, base_params, layer):
                self._forms[layer] = _NOT_REPLAYABLE
        return group, layer

    @staticmethod
    def _start_block(group: _Group, start_layer: int | None) -> int | None:
        """The block a read of `group` starts at: `start_layer`, or the highest block below it whose input
        is already kept (valid too: nothing below `start_layer` is touched); None for a full pass."""
        if start_layer is None or start_layer < 1:
            return None
        kept = [block for block in group.hidden if 1 <= block <= start_layer]
        return max(kept) if kept else start_layer

    def prepare(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, base_params: Mapping[str, torch.Tensor],
        start_layer: int | None = None,
    ) -> None:
        """Find every group's base perplexity and input to `start_layer` now (from the store, or one full
        pass per group missing there), and check replay from the blocks they start at, so that later
        checks read only from there and the first edits do not pay for the checks (0.3 s a block on the
        default model). Blocks above `start_layer` whose input a group keeps (from the store) are checked
        too: reads of edits that touch only higher blocks start there."""
        for index, group in enumerate(self.groups):
            self._checked(model, tokenizer, index, base_params, start_layer)
            if start_layer is not None:
                for layer in sorted(b for b in group.hidden if b > start_layer and b not in self._forms):
                    self._checked(model, tokenizer, index, base_params, layer)

    def _prepared(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, index: int,
        base_params: Mapping[str, torch.Tensor], start_layer: int | None,
    ) -> tuple[_Group, int | None]:
        """A group tokenized, with its base perplexity and its input to the block its reads start at
        (from the store, or from one full pass on the base weights), and that block (`_start_block`)."""
        group = self.groups[index]
        if group.ids is None:
            limits = [x for x in (self.config.max_tokens, max_context(model.config)) if x is not None]
            encoded = [tokenizer(t).input_ids[: min(limits)] for t in group.texts]
            group.ids, group.mask = pad_sequences([e for e in encoded if len(e) > 1], pad_id_of(tokenizer))
            if self.store is not None:
                group.base, group.hidden = self.store.load(index)
        layer = self._start_block(group, start_layer)  # after the store is read: it may keep a lower block
        if group.base is not None and (layer is None or layer in group.hidden):
            return group, layer
        with contextlib.ExitStack() as stack:
            captured = stack.enter_context(capture_block_input(model, layer)) if layer is not None else None
            group.base = self._perplexity(model, group, base_params, None)
        if captured is not None and captured.hidden is not None:
            group.hidden[layer] = captured.hidden
        if self.store is not None:
            self.store.save(index, group.base, group.hidden)
        return group, layer

    def _check_replay(
        self, model: nn.Module, group: _Group, base_params: Mapping[str, torch.Tensor], layer: int,
    ) -> bool:
        """Whether reads may start at `layer`: the block's output form (from a two-token pass) and one
        replayed read on the base weights, which must give the group's base perplexity. False when that
        read disagrees with the base perplexity (which then cannot be trusted either); True otherwise,
        the form set to what was found (or "not replayable")."""
        self._forms[layer] = _NOT_REPLAYABLE
        if layer not in group.hidden:
            return True
        assert group.ids is not None and group.mask is not None
        device = next(model.parameters()).device
        with torch.no_grad(), capture_block_input(model, layer) as captured:
            model(input_ids=group.ids[:1, :2].to(device), attention_mask=group.mask[:1, :2].to(device))
        if captured.form == "unknown":
            LOG.info("the guard reads in full: block %d's output is not replayable", layer - 1)
            return True
        self._forms[layer] = captured.form
        try:
            replayed = self._perplexity(model, group, base_params, layer)
        except (TypeError, IndexError, AttributeError, RuntimeError) as error:  # blocks that pass on more
            LOG.warning("the guard reads in full: starting at block %d failed (%s)", layer, error)
            self._forms[layer] = _NOT_REPLAYABLE
            return True
        if not math.isclose(replayed, group.base, rel_tol=_REPLAY_RTOL):
            LOG.warning("the guard's kept state gives perplexity %.6g from block %d, its base says %.6g: "
                        "computing both again", replayed, layer, group.base)
            self._forms.pop(layer)
            return False
        return True

    def _perplexity(
        self, model: nn.Module, group: _Group, params: Mapping[str, torch.Tensor] | None, layer: int | None,
    ) -> float:
        """Perplexity of one group (one batch); from block `layer`'s kept input where replay is checked."""
        assert group.ids is not None and group.mask is not None
        form = self._forms.get(layer, _NOT_REPLAYABLE) if layer in group.hidden else _NOT_REPLAYABLE
        replay = start_at_block(model, layer, group.hidden[layer], form) if form != _NOT_REPLAYABLE else None
        with replay or contextlib.nullcontext():
            return batch_perplexity(model, group.ids, group.mask, params)

    def check(self, ratio: float, what: str) -> None:
        """Raise DriftError when `ratio` is past the bound (or not a number)."""
        if not ratio <= self.config.max_ratio:  # NaN fails too
            raise DriftError(
                f"{what} would raise the perplexity of the reference text to {ratio:.3g}× the base model's "
                f"(the guard allows {self.config.max_ratio:g}×, base perplexity {self.base_perplexity:.3f}); "
                "it was undone and not journaled. Try another method, fewer facts at once, or raise the "
                "bound with Editor(..., guard=GuardConfig(max_ratio=...)) / guard=None.",
                ratio=ratio, max_ratio=self.config.max_ratio,
            )
