"""The Editor's read-only side: what an edit would do (preview, then apply it as computed), what an
applied or reverted edit does now (effect, toggled weights) and what it changed (diff). A part of
`Editor` (editor.py), split off by job; the weights are never written here except by `apply_preview`,
which applies through the Editor's one edit path."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.cost import ms_since
from ..core.errors import ConfigError, InvalidRequestError, ModelMismatchError
from ..core.methods import StreamState, config_to_dict, get_method, make_config
from ..core.record import EditRecord
from ..core.request import EditRequest, as_requests, max_context, tokenize_request
from ..model.views import viewed_model
from ..model.weights import WeightState
from .diff import EditDiff, diff_edit
from .preview import EditPreview, edit_effect, preview_delta, with_delta

__all__ = ["EditorInspection", "check_probes"]


class EditorInspection:
    """Previews, effects and diffs of `Editor` (which defines the state used here)."""

    _lock: threading.RLock
    _state: WeightState
    _fingerprint: str

    def preview(
        self,
        model: nn.Module,
        requests: Sequence[EditRequest | Mapping[str, Any]],
        *,
        probes: Sequence[str] = (),
        method: str | None = None,
        **overrides: Any,
    ) -> EditPreview:
        """What an edit of `requests` would do, without doing it: the delta is computed as `edit_batch`
        computes it (the method, then the preservation projection) on the current weights, and scored
        on the requests' prompts, paraphrases, locality prompts and `probes` with the delta added
        through functional_call; the weights are not written (preview.py). `method` and `overrides`
        as `set_method` takes them (default: this Editor's method and config); the Editor keeps its
        own. `apply_preview` applies exactly the previewed delta. `model` (here and in `diff`, `effect`,
        `toggled_weights`) may be a read view of the bound model (views.py)."""
        check_probes(probes)
        requests = as_requests(requests)
        with self._lock:
            name, config, impl = self._method_for(method, overrides)
            requests = self._located(get_method(name), requests)
            context = max_context(model.config)
            tokenized = [tokenize_request(r, self.tokenizer, context) for r in requests]
            self.attach(viewed_model(model))
            stream = self._stream_for(name, impl)
            start = time.perf_counter()
            delta = self._compute_with(impl, config, model, tokenized, stream).detached_cpu()
            compute_ms, start = ms_since(start), time.perf_counter()
            result = preview_delta(
                model, self.tokenizer, self._state, delta, tokenized, list(probes), method=name,
                config=config_to_dict(config), timings={}, weights=tuple(self._state.active),
                model_fingerprint=self._fingerprint,
            )
            return dataclasses.replace(result, timings={"compute_ms": compute_ms, "score_ms": ms_since(start)},
                                       stream_state=stream.after if stream is not None else None)

    def apply_preview(self, model: nn.Module, preview: EditPreview) -> EditRecord:
        """Apply a preview's delta as a new edit (recorded, journaled and guarded like any edit), without
        computing it again. Refused, with nothing changed, once the weights differ from those it was
        computed on (an edit applied or reverted since)."""
        with self._lock:
            self.attach(model)
            if preview.model_fingerprint != self._fingerprint:
                raise ModelMismatchError("this preview was computed on another model")
            if tuple(preview.weights) != tuple(self._state.active):
                raise ConfigError(
                    "the weights changed since this preview was computed (an edit was applied or reverted); "
                    "preview it again"
                )
            delta = preview.delta
            stream = StreamState(after=preview.stream_state) if preview.stream_state is not None else None
            return self._edit(model, list(preview.requests), lambda *_: delta, preview.method, preview.config,
                              stream)

    def effect(self, edit_id: str, model: nn.Module, probes: Sequence[str] = ()) -> dict[str, Any]:
        """What an edit does on the current weights, scored with the weights untouched: an active edit
        without/with it, a reverted one as it is now/re-applied (`preview.edit_effect`)."""
        check_probes(probes)
        with self._lock:
            record = self._record_with_delta(edit_id)
            self.attach(viewed_model(model))
            return edit_effect(record, self._state, model, self.tokenizer, list(probes))

    def toggled_weights(self, edit_id: str, model: nn.Module) -> tuple[bool, dict[str, torch.Tensor]]:
        """(active, values): whether the edit is active, and the values its parameters would have with it
        toggled: without it (the other active edits kept) when active, re-applied on the current weights
        when reverted. The model is not changed (use the values through functional_call)."""
        with self._lock:
            record = self._record_with_delta(edit_id)
            if record.delta.modules:
                raise InvalidRequestError(f"edit {edit_id} ({record.method}) adds side modules, which weights alone "
                                          "cannot toggle; use Editor.effect(edit_id, model, probes) instead")
            self.attach(viewed_model(model))
            if record.id in self._state.active:
                return True, self._state.weights_without(model, record.id)
            return False, with_delta(model, record.delta)

    def _method_for(self, method: str | None, overrides: Mapping[str, Any]) -> tuple[str, Any, Any]:
        """(name, config, built method) for a preview: this Editor's own (method None), or one built from
        `overrides` (as `set_method` takes them) and kept for later previews."""
        if method is None:
            if overrides:
                raise ConfigError("preview: config overrides need the method they are for (method=...)")
            return self.method, self.config, self._impl
        spec = get_method(method)
        config = make_config(spec.config_cls, overrides)
        key = (method, json.dumps(config_to_dict(config), sort_keys=True, default=str))
        if key not in self._preview_methods:
            self._preview_methods[key] = spec.build(config)
        return method, config, self._preview_methods[key]

    def diff(self, edit_id: str, model: nn.Module | None = None, probes: Sequence[str] = ()) -> EditDiff:
        """What an edit changed: per parameter ‖Δ‖_F, ‖Δ‖/‖W‖ and rank, and the top-5 next tokens
        before and after on its prompts; with `model` and `probes`, also on those prompts (scored
        with and without the edit, the model untouched)."""
        check_probes(probes)
        with self._lock:
            record = self._record_with_delta(edit_id)
            if model is not None:
                self.attach(viewed_model(model))
            return diff_edit(record, self._state, self.tokenizer, model, list(probes))


def check_probes(probes: Sequence[str]) -> None:
    """Probes are a list of non-empty prompts (a string alone is a common slip)."""
    if isinstance(probes, str):
        raise InvalidRequestError(f"probes must be a list of prompts (write [{probes!r}] for one)")
    for probe in probes:
        if not isinstance(probe, str) or not probe.strip():
            raise InvalidRequestError(f"every probe must be a non-empty prompt, not {probe!r}")
