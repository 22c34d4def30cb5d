"""What keeps accumulated edits from breaking a model, for one Editor: key preservation and the guard.

- Preservation (`preserve.py`): when the method's config has `preserve` set, every delta is projected
  onto the null space of the reference corpus's keys before it is applied (methods that accept a
  `preserver` also fit inside it), and the keys of each applied edit are protected in later
  least-squares solves until it is reverted.
- The guard (`drift.py`): after an edit is applied, the perplexity of reference text over the base
  model's; past the bound the Editor undoes the edit and raises `DriftError`. Its rotation (the next
  group, each group's last reading) is journaled after every check, so a reopened journal's guard
  goes on from where its writer's stood.

Both are measured on the base weights (`WeightState.base` for parameters already edited), so an
Editor that replayed a journal sees the same base as the one that wrote it. The keys held for an edit
are those taken right after it (`EditRecord.held_keys`, journaled), so a reopened journal holds what its
writer held; for an edit that carries none (a journal written before they were kept) they are taken on
the replayed model when preservation is first needed. A preserver built later holds them the way the
writer's did (`KeptEdit.rebuilt`), so its inverse is the writer's bit for bit.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.configs import validated
from ..core.cost import ms_since
from ..core.delta import Delta
from ..core.errors import ConfigError
from ..core.request import TokenizedRequest
from ..model.specs import layer_index, module_of
from ..model.weights import WeightState
from .drift import DriftGuard, GuardConfig
from .guard_store import GuardStore
from .keys import edit_keys, key_statistics
from .preserve import KeyPreserver, PreserveConfig, build_preserver
from .reference import key_corpus, reference_texts

# What Editor(guard=...) accepts; "auto": the method's default; a mapping: GuardConfig's fields (from a
# YAML or Hydra config)
Guard = GuardConfig | Mapping[str, Any] | float | None | str
# A method's own keys of an edit, {param name: (N, in)} for the given param names and requests, on the
# current weights (e.g. locate-then-edit: the subject's last token, over context prefixes). Methods
# without one get every token of prompt + target (`keys.edit_keys`).
KeysFn = Callable[[nn.Module, PreTrainedTokenizerBase, Sequence[str], Sequence[TokenizedRequest]],
                  dict[str, torch.Tensor]]
Held = Mapping[str, torch.Tensor] | None  # the keys held for an edit (EditRecord.held_keys)


@dataclass(frozen=True)
class KeptEdit:
    """An active edit whose keys a preserver built now holds (`Safeguards.preserver_for`)."""

    id: str
    requests: Sequence[TokenizedRequest]
    keys: KeysFn | None  # the method's own keys, or None (every token)
    held: Held  # the keys held for it right after it, when known
    # The matrices for which it was applied before the last revert of an edit a preserver held there:
    # that preserver rebuilt its inverse of them from the keys then held (KeyPreserver.release), so a
    # new one does too (KeyPreserver.protect's `rebuilt`).
    rebuilt: frozenset[str] = frozenset()


def resolve_guard(option: Guard, guarded_by_default: bool) -> GuardConfig | None:
    """GuardConfig from `Editor(guard=...)`: a GuardConfig or its fields as a mapping, a max ratio, None
    (off) or "auto"."""
    if isinstance(option, GuardConfig) or option is None:
        return option
    if isinstance(option, Mapping):
        return validated(GuardConfig, dict(option), "guard")
    if option == "auto":
        return GuardConfig() if guarded_by_default else None
    if isinstance(option, (int, float)) and not isinstance(option, bool):
        return GuardConfig(max_ratio=float(option))
    raise ConfigError(
        f"guard must be a GuardConfig (or its fields), a max perplexity ratio > 1, None or 'auto'; got {option!r}"
    )


def lowest_touched_block(model: nn.Module, state: WeightState, names: Sequence[str] = ()) -> int | None:
    """The lowest block holding a parameter an edit has touched, or one of `names` (None: one is
    outside the blocks); the weights below it are the base model's, so the guard may start its reads there."""
    try:
        return min((layer_index(model, name) for name in [*state.base, *names]), default=None)
    except ConfigError:
        return None


def accepts(compute: Callable[..., Any], name: str) -> bool:
    """Whether a method's `compute` takes the keyword `name` ("preserver", "progress")."""
    return name in inspect.signature(compute).parameters


class Safeguards:
    """The preserver and the guard of one Editor bound to one model (see the module docstring)."""

    def __init__(
        self, model_id: str, fingerprint: str, rotation: Mapping[str, Any] | None = None,
        keep_rotation: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """`rotation`: the guard's rotation a journal kept (`DriftGuard.rotation`, with the model's
        fingerprint), taken up by the guard when it is made under the same config; `keep_rotation` is
        given the rotation after every check (the journal's `set_guard_rotation`)."""
        self.model_id, self.fingerprint = model_id, fingerprint
        self.preserver: KeyPreserver | None = None
        self.guard: DriftGuard | None = None
        self._rotation, self._keep_rotation = rotation, keep_rotation

    def preserver_for(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, state: WeightState,
        names: Sequence[str], config: PreserveConfig,
        active: Callable[[], Sequence[KeptEdit]],
    ) -> KeyPreserver:
        """The preserver for `names` under `config`, built on first need; the keys of the `active()`
        edits are protected when it is built: those held, and for a matrix it covers that they do not,
        taken now; in the order and the way the preserver that held them did (`KeptEdit`), so that its
        inverse is the one a process that made the edits has."""
        current = self.preserver
        if current is not None and current.config == config and set(names) <= set(current.names):
            return current
        wanted = sorted(set(names) | (set(current.names) if current and current.config == config else set()))
        preserver = build_preserver(model, tokenizer, wanted, config, fingerprint=self.fingerprint,
                                    model_id=self.model_id, base_params=state.base_values(wanted))
        for kept in active() if config.protect_edits else ():
            taken = dict(kept.held or {})
            missing = [n for n in preserver.names if n not in taken]
            if missing:
                taken.update(self._keys(model, tokenizer, missing, kept.requests, kept.keys))
            preserver.protect(kept.id, taken, rebuilt=kept.rebuilt)
        self.preserver = preserver
        return preserver

    def protect(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, edit_id: str, delta: Delta,
        requests: Sequence[TokenizedRequest], keys: KeysFn | None = None,
        known: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor] | None:
        """Protect the keys of an applied edit, for the matrices the preserver covers: those `keys` (the
        method's KeysFn) gives, else those of every token of its sequences. `known`: those keys, taken
        on these same weights by a preview (`applied_keys`), used when they cover every such matrix.
        Returns the keys held ({name: (N, in)}, on CPU; None when none are)."""
        names = self._protected_names(delta)
        if not names:
            return None
        covered = keys is None and known is not None and set(names) <= set(known)
        taken = {n: known[n] for n in names} if covered else self._keys(model, tokenizer, names, requests, keys)
        self.preserver.protect(edit_id, taken)
        return {n: k.detach().cpu() for n, k in taken.items()}

    def applied_keys(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, delta: Delta,
        requests: Sequence[TokenizedRequest], keys: KeysFn | None, params: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor] | None:
        """The keys `protect` would take once `delta` is applied, read now with its new values `params`
        swapped in (the weights untouched); None where it would take none, or a method's own (`keys`)."""
        names = self._protected_names(delta)
        if not names or keys is not None:
            return None
        modules = {name: module_of(name) for name in names}
        taken = edit_keys(model, tokenizer, sorted(set(modules.values())), requests, params)
        return {name: taken[module] for name, module in modules.items()}

    def _protected_names(self, delta: Delta) -> list[str]:
        """The delta's matrices whose keys the preserver protects (none without one, or protection off)."""
        if self.preserver is None or not self.preserver.config.protect_edits:
            return []
        return [n for n in delta.names() if n in self.preserver.bases]

    def release(self, edit_id: str) -> None:
        if self.preserver is not None:
            self.preserver.release(edit_id)

    def second_moments(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, state: WeightState, names: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """{param name: E[k kᵀ] (in, in)} of the reference corpus's keys of each weight matrix, on the
        base weights (keys.key_statistics: cached on disk per base model)."""
        modules = {name: module_of(name) for name in names}
        moments = key_statistics(model, tokenizer, sorted(set(modules.values())), key_corpus(),
                                 fingerprint=self.fingerprint, model_id=self.model_id,
                                 params=state.base_values(list(state.base)))
        return {name: moments[module] for name, module in modules.items()}

    @staticmethod
    def _keys(
        model, tokenizer, names: Sequence[str], requests: Sequence[TokenizedRequest], keys: KeysFn | None = None,
    ) -> dict[str, torch.Tensor]:
        if keys is not None:
            return keys(model, tokenizer, names, requests)
        modules = {name: module_of(name) for name in names}
        keys = edit_keys(model, tokenizer, sorted(set(modules.values())), requests)
        return {name: keys[module] for name, module in modules.items()}

    def check_drift(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, state: WeightState, config: GuardConfig | None,
        what: str, timings: dict[str, float], known: Mapping[int, float] | None = None, facts: int = 1,
    ) -> float | None:
        """The drift ratio after an edit of `facts` facts (None with the guard off); raises DriftError past
        the bound. `known`: the groups' ratios a preview read on these same weights (`read_drift`), not
        read again."""
        if config is None:
            return None
        guard = self._guard(model, config)
        start = time.perf_counter()
        base = state.base_values(list(state.base))
        ratio = guard.ratio(model, tokenizer, base, lowest_touched_block(model, state), known,
                            whole=config.reads_whole(facts))
        timings["guard_ms"] = ms_since(start)
        if self._keep_rotation is not None and not config.reads_whole(facts):  # a whole read moves no rotation
            self._keep_rotation({**guard.rotation(), "fingerprint": self.fingerprint})
        guard.check(ratio, what)
        return ratio

    def read_applied(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, state: WeightState, config: GuardConfig | None,
        delta: Delta, requests: Sequence[TokenizedRequest], keys: KeysFn | None, params: Mapping[str, torch.Tensor],
    ) -> tuple[dict[int, float] | None, dict[str, torch.Tensor] | None]:
        """(the guard's reading, the keys `protect` would take) once `delta` is applied, read now with its new
        values `params` swapped in (`read_drift`, `applied_keys`); None for what applying would not read."""
        drift = (self.read_drift(model, tokenizer, state, config, delta.names(), params, facts=len(requests))
                 if config is not None else None)
        return drift, self.applied_keys(model, tokenizer, delta, requests, keys, params)

    def read_drift(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, state: WeightState, config: GuardConfig,
        names: Sequence[str], params: Mapping[str, torch.Tensor], facts: int = 1,
    ) -> dict[int, float]:
        """What the guard's next check would read ({group: ratio}) once an edit of `facts` facts touching
        `names`, whose new values are `params`, is applied, read now with the weights untouched
        (DriftGuard.read); nothing recorded."""
        guard = self._guard(model, config)
        base = state.base_values(list(state.base))
        return guard.read(model, tokenizer, base, lowest_touched_block(model, state, names), params,
                          whole=config.reads_whole(facts))

    def warm_guard(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, state: WeightState, config: GuardConfig,
        names: Sequence[str],
    ) -> None:
        """Prepare the guard for edits of `names` (DriftGuard.prepare at the lowest block they or earlier
        edits touch): a full pass per group the cache lacks, none when it has them all."""
        layer = lowest_touched_block(model, state, names)
        self._guard(model, config).prepare(model, tokenizer, state.base_values(list(state.base)), layer)

    def _guard(self, model: nn.Module, config: GuardConfig) -> DriftGuard:
        if self.guard is None or self.guard.config != config:
            param = next(model.parameters())
            store = GuardStore(self.fingerprint, self.model_id, reference_texts("samples"), config.texts,
                               config.max_tokens, param.dtype, param.device)
            self.guard = DriftGuard(config, store)
            if self._rotation is not None and self._rotation.get("fingerprint") == self.fingerprint:
                self.guard.resume(self._rotation)
            self._rotation = None  # taken up once: a guard made later (another config) starts afresh
        return self.guard
