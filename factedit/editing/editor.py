"""The Editor: the one object that computes, applies, records and reverts edits.

    editor = Editor("ft_l", tokenizer=tok, journal="edits.sqlite")
    record = editor.edit(model, "The capital of France is", "Rome")
    editor.revert(model, record.id)

An Editor binds to the first model it is used with (and, with a journal, replays the journal's
active edits onto it, after checking it is the journal's base model). See design.md for the steps.
"""
# long: the public API of one object over one lock; each job it does lives elsewhere (preview.py, diff.py,
# journal.py, replay_journal.py, safety/safeguards.py, artifacts/) and what is left here is glue and docs.

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from cachetools import LRUCache
from torch import nn
from transformers import PreTrainedTokenizerBase

from .._version import __version__
from ..artifacts import adapters, gguf_export
from ..artifacts.exported import EXPORT_FORMAT, read_exported
from ..artifacts.peft_ia3 import IA3Export, export_ia3_adapter
from ..core.cost import ms_since
from ..core.delta import Delta
from ..core.errors import ConfigError, EditNotFoundError, InvalidRequestError, ModelMismatchError
from ..core.methods import StreamState, config_to_dict, get_method, make_config
from ..core.record import EditRecord, new_edit_id
from ..core.request import EditRequest, TokenizedRequest, as_requests, max_context, tokenize_request, with_subject
from ..model.loading import model_id as model_id_of
from ..model.owner import OWNER_ATTRIBUTE, BaseWeights
from ..model.views import is_view, viewed_model
from ..model.weights import WeightState, model_fingerprint, tensor_sha256
from ..safety.drift import GuardConfig
from ..safety.safeguards import Guard, KeptEdit, Safeguards, accepts, resolve_guard
from ..scoring.sequences import score_requests
from .diff import EditDiff, diff_edit
from .journal import Journal
from .measured import Measured, reusable, weights_token
from .preview import BeforeScores, EditPreview, check_probes, edit_effect, preview_delta, with_delta
from .replay_journal import replay

LOG = logging.getLogger(__name__)


class Editor:
    """Edits facts in a causal LM with one registered method and undoes them exactly.

    Args:
        method: a registered method name (`factedit.available_methods()`).
        tokenizer: the model's tokenizer.
        journal: path of a persistent journal (created if missing), or an open `Journal`; None keeps
            history in memory only.
        score: measure each edit before and after (target probability, top-5, locality); turn off
            when an evaluation measures on its own.
        guard: the drift guard (drift.py): a `GuardConfig` (or a mapping of its fields), a largest
            allowed perplexity ratio of the reference text against the base model, None (off), or
            "auto" (on for methods registered as guarded: `mend`, `ultraedit` and the editors that act
            at every token, `adapter`, `bitfit`, `ia3`). An edit past the bound is undone and raises
            `DriftError`.
        **overrides: fields of the method's config dataclass; unknown names are errors. Methods whose
            config has `preserve` (a `PreserveConfig`, or None for off) keep their deltas in the null
            space of the reference corpus's keys (preserve.py).
    """

    def __init__(
        self,
        method: str,
        *,
        tokenizer: PreTrainedTokenizerBase,
        journal: str | os.PathLike | Journal | None = None,
        score: bool = True,
        guard: Guard = "auto",
        **overrides: Any,
    ) -> None:
        spec = get_method(method)
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ConfigError(
                f"tokenizer must be the model's HuggingFace tokenizer, not {type(tokenizer).__name__} "
                "(factedit.load_model returns both)"
            )
        resolve_guard(guard, spec.guarded)  # refuse a bad guard option before anything else
        self.method = method
        self._spec = spec
        self._guard_option = guard
        self.config = make_config(spec.config_cls, overrides)
        self.tokenizer = tokenizer
        self.score = score
        self._impl = spec.build(self.config)
        self._journal = journal if isinstance(journal, Journal) or journal is None else Journal(journal)
        self._records: dict[str, EditRecord] = {}
        self._state = WeightState()
        self._model_ref: weakref.ref | None = None
        self._closed = False
        # Parameters whose replayed value differs from what the journal's writer had (attach checks):
        # another torch or processor may round a low-rank delta's product differently. [] = exact.
        self.replay_differs: list[str] = []
        self._model_id = ""
        self._fingerprint = ""
        self._safeguards: Safeguards | None = None  # set when the Editor binds to its model
        self._base_sha256: str | None = None  # with a journal: sha256 of all base parameters
        self.attach_timings: dict[str, float] = {}  # what binding to the model cost (hash_ms)
        self._lock = threading.RLock()  # edits from several threads (app sessions) are serialised
        # (method, config JSON) -> the built method, for previews: the 8 used last are kept.
        self._preview_methods: LRUCache[tuple[str, str], Any] = LRUCache(maxsize=8)
        self._before = BeforeScores()  # previews' scores of the weights before their delta (preview.py)
        self._streams: dict[str, dict[str, torch.Tensor]] = {}  # method -> its lifelong state (StreamState)
        # Called by the fine-tuning methods' loops as progress(step, max_steps, loss) while they compute
        # (edits and previews); None: no reports. Not part of the config: a callable is not serialisable.
        self.progress: Callable[[int, int, float], None] | None = None

    # --- public API --------------------------------------------------------------------------------
    @property
    def history(self) -> list[EditRecord]:
        """Every edit, oldest first, with status active or reverted."""
        with self._lock:
            if self._model_ref is None and self._journal is not None and not self._closed:
                return self._journal.records(deltas=False)
            return [r.without_delta() for r in self._records.values()] if self._closed else list(self._records.values())

    @property
    def guard(self) -> GuardConfig | None:
        """The drift guard in force for the current method (None: off)."""
        return resolve_guard(self._guard_option, self._spec.guarded)

    @property
    def journal_path(self) -> Path | None:
        return self._journal.path if self._journal is not None else None

    def edit(
        self,
        model: nn.Module,
        prompt: str,
        target: str,
        *,
        subject: str | None = None,
        paraphrases: Sequence[str] = (),
        locality: Sequence[str] = (),
    ) -> EditRecord:
        """Make `prompt` continue with `target`; edits `model` in place and returns the record."""
        request = EditRequest(prompt, target, subject, paraphrases, locality)  # validates the types
        return self.edit_batch(model, [request])

    def edit_batch(self, model: nn.Module, requests: Sequence[EditRequest | Mapping[str, Any]]) -> EditRecord:
        """Several facts in one update (one record)."""
        method, impl, config = self.method, self._impl, self.config
        stream = StreamState() if accepts(impl.compute, "stream") else None

        def compute(m: nn.Module, tokenized: list[TokenizedRequest]) -> Delta:
            if stream is not None:  # read once bound: attaching loads the journal's state
                stream.before = self._streams.get(method)
            return self._compute_with(impl, config, m, tokenized, stream)

        return self._edit(model, self._located(self._spec, config, as_requests(requests)), compute, method,
                          config_to_dict(config), stream)

    @staticmethod
    def _located(spec: Any, config: Any, requests: list[EditRequest]) -> list[EditRequest]:
        """The requests with a subject (request.with_subject) for a method that edits at the subject (a
        locating method, or a fine-tuning editor anchored there), so the record says which one was used;
        as given otherwise."""
        anchored = getattr(config, "anchor", None) == "subject"
        return [with_subject(r) for r in requests] if spec.locates or anchored else requests

    def _keys_fn(self, method: str) -> Any:
        """The keys an edit of `method` protects (safeguards.KeysFn): the current method's own, when it
        has them and made the edit; None (every token) otherwise."""
        return getattr(self._impl, "edit_keys", None) if method == self.method else None

    def _stream_for(self, method: str, impl: Any) -> StreamState | None:
        """A StreamState holding `method`'s lifelong state, for a method whose `compute` takes one."""
        return StreamState(before=self._streams.get(method)) if accepts(impl.compute, "stream") else None

    def _compute_with(
        self, impl: Any, config: Any, model: nn.Module, tokenized: list[TokenizedRequest],
        stream: StreamState | None = None,
    ) -> Delta:
        """`impl`'s delta (a built method with its `config`), kept in the null space of preserved keys
        when its config says so; a method whose `compute` takes `progress` gets `self.progress`, a
        lifelong one `stream`."""
        extra: dict[str, Any] = {"stream": stream} if stream is not None else {}
        if self.progress is not None and accepts(impl.compute, "progress"):
            extra["progress"] = self.progress
        if accepts(impl.compute, "moments"):
            extra["moments"] = lambda names: self._safeguards.second_moments(model, self.tokenizer, self._state, names)
        preserve = getattr(config, "preserve", None)
        if preserve is None:
            return impl.compute(model, self.tokenizer, tokenized, **extra)
        preserver = self._safeguards.preserver_for(model, self.tokenizer, self._state, impl.param_names(model),
                                                   preserve, self._kept_edits)
        if accepts(impl.compute, "preserver"):
            delta = impl.compute(model, self.tokenizer, tokenized, preserver=preserver, **extra)
        else:
            delta = impl.compute(model, self.tokenizer, tokenized, **extra)
        return preserver.project(delta)

    def _kept_edits(self) -> list[KeptEdit]:
        """The active edits, oldest first, as a preserver built now holds them: on each matrix the edits
        applied before the last revert of a preserved edit there are held as the preserver that released
        it holds them (its inverse rebuilt, not updated one by one)."""
        last: dict[str, float] = {}  # matrix -> when an edit whose keys were held there was last reverted
        for r in self._records.values():
            if r.status == "reverted" and r.reverted_at is not None:
                for name in r.held:
                    last[name] = max(last.get(name, r.reverted_at), r.reverted_at)
        return [KeptEdit(r.id, [tokenize_request(q, self.tokenizer, None) for q in r.requests], self._keys_fn(r.method),
                         r.held_keys, frozenset(n for n, t in last.items() if r.created_at < t))
                for r in self._records.values() if r.status == "active"]

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
        through functional_call; with the guard on, the drift it would read is read too (`drift`,
        `guard_refuses`); the weights are not written (preview.py). `method` and `overrides`
        as `set_method` takes them (default: this Editor's method and config); the Editor keeps its
        own. `apply_preview` applies exactly the previewed delta. `model` (here and in `diff`, `effect`,
        `toggled_weights`) may be a read view of the bound model (views.py)."""
        check_probes(probes)
        requests = as_requests(requests)
        with self._lock:
            name, config, impl = self._method_for(method, overrides)
            requests = self._located(get_method(name), config, requests)
            context = max_context(model.config)
            tokenized = [tokenize_request(r, self.tokenizer, context) for r in requests]
            self.attach(viewed_model(model))
            stream = self._stream_for(name, impl)
            start = time.perf_counter()
            delta = self._compute_with(impl, config, model, tokenized, stream).detached_cpu()
            compute_ms, start = ms_since(start), time.perf_counter()
            reading = partial(self._safeguards.read_applied, model, self.tokenizer, self._state, self.guard, delta,
                              tokenized, self._keys_fn(name))  # the guard's reading and the keys, with the delta
            result = preview_delta(
                model, self.tokenizer, self._state, delta, tokenized, list(probes), guard=self.guard,
                read_applied=reading, token=weights_token(model, self._fingerprint, self._state.active),
                kept=self._before, method=name, config=config_to_dict(config), timings={},
                weights=tuple(self._state.active), model_fingerprint=self._fingerprint)
            return dataclasses.replace(result, timings={"compute_ms": compute_ms, "score_ms": ms_since(start)},
                                       stream_state=stream.after if stream is not None else None)

    def apply_preview(self, model: nn.Module, preview: EditPreview) -> EditRecord:
        """Apply a preview's delta as a new edit (recorded, journaled and guarded like any edit), without
        computing it, nor its scores and drift while the weights are those it was previewed on (measured.py).
        Refused, with nothing changed, by the guard or once the weights changed (an edit applied or reverted)."""
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
                              stream, preview.measured)

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

    def set_method(self, method: str, **overrides: Any) -> None:
        """Edit with another registered method from now on; weights, history and journal stay.
        Refused (nothing changed) for an unknown method or config key."""
        spec = get_method(method)
        config = make_config(spec.config_cls, overrides)
        impl = spec.build(config)
        with self._lock:
            self.method, self._spec, self.config, self._impl = method, spec, config, impl

    def export_edit(self, edit_id: str, path: str | os.PathLike) -> Path:
        """Write one edit to a self-describing file: safetensors holding the delta, with the record
        (requests, method, config, base model id and fingerprint, version) as JSON metadata."""
        record = self._record_with_delta(edit_id)
        meta = {"format": EXPORT_FORMAT, "record": json.dumps(record.to_dict())}
        path = Path(path)
        path.write_bytes(record.delta.to_bytes(meta))
        return path

    def import_edit(self, model: nn.Module, path: str | os.PathLike) -> EditRecord:
        """Apply an edit exported by `export_edit` (from any method) as a new edit of this Editor.
        Refused, with nothing changed, if it was made on another base model."""
        exported = read_exported(Path(path).read_bytes())  # record, facts and delta checked first
        with self._lock:
            self.attach(model)
            if exported.model_fingerprint != self._fingerprint:
                raise ModelMismatchError(
                    f"{path} was made on model {exported.record['model_id']!r} (fingerprint "
                    f"{exported.model_fingerprint}), not this one ({self._fingerprint})"
                )
            return self._edit(model, list(exported.requests), lambda *_: exported.delta, exported.method,
                              exported.config)

    def export_adapter(
        self,
        path: str | os.PathLike,
        ids: Sequence[str] | None = None,
        *,
        rank: int | None = None,
        exact: bool = False,
        model: nn.Module | None = None,
        format: str = "peft",
        base_gguf: str | os.PathLike | None = None,
    ) -> adapters.AdapterExport | gguf_export.GGUFAdapterExport | IA3Export:
        """Write active edits (`ids`, default all) as one PEFT LoRA adapter folder that `peft` and vLLM
        load, with a model card listing them. Dense edits (ft, ft_l) go through a truncated SVD of
        `rank` (errors in the result) or, with `exact=True`, are refused. Details: adapters.py.
        `format="gguf"`: one GGUF LoRA adapter file for llama.cpp / Ollama instead, checked against the
        base GGUF (`base_gguf`, default the default model's own; gguf_export.py).
        `format="peft-ia3"`: `ia3` edits as one PEFT IA³ adapter (peft_ia3.py; anything else refused).
        Needs the edited model: the one this Editor is bound to, or `model`."""
        if format not in ("peft", "gguf", "peft-ia3"):
            raise ConfigError(f"adapter format must be 'peft', 'gguf' or 'peft-ia3', got {format!r}")
        with self._lock:
            if model is not None:
                self.attach(model)
            bound = self._model_ref() if self._model_ref is not None else None
            if bound is None:
                raise ConfigError("export_adapter needs the edited model: pass model= or edit/attach first")
            if format == "peft-ia3":
                if rank is not None or exact:
                    raise ConfigError("rank and exact are for LoRA adapters; an IA³ adapter is exact")
                self._active_records(ids)  # unknown or reverted ids refused first
                active = [self._record_with_delta(r.id) for r in self._active_records(None)]
                return export_ia3_adapter(bound, active, path, ids=ids)
            adapters.refuse_side_modules(self._active_records(ids), f"a {format} LoRA adapter")
            if format == "gguf":
                return gguf_export.export_gguf_lora(bound, self._active_records(ids), path, base=base_gguf,
                                                    base_weights=self._state.base, rank=rank, exact=exact)
            return adapters.export_adapter(bound, self._active_records(ids), path, rank=rank, exact=exact)

    def export_merged(
        self, model: nn.Module, path: str | os.PathLike, *, format: str = "hf",
        base_gguf: str | os.PathLike | None = None, dtype: str = "f32",
    ) -> Path | gguf_export.GGUFMergedExport:
        """Write `model` with its active edits as a HuggingFace folder (safetensors, config, tokenizer,
        a model card listing the edits) that `AutoModelForCausalLM.from_pretrained` loads.
        `format="gguf"`: one GGUF file, the base GGUF (`base_gguf`, default the default model's own) with
        the edited tensors replaced in `dtype` (gguf_export.py); returns what it wrote (GGUFMergedExport)."""
        if format not in ("hf", "gguf"):
            raise ConfigError(f"merged format must be 'hf' or 'gguf', got {format!r}")
        with self._lock:
            self.attach(model)
            adapters.refuse_side_modules(self._active_records(None), f"a merged {format} model")
            if format == "gguf":
                return gguf_export.export_gguf_merged(model, self._active_records(None), path, base=base_gguf,
                                                      base_weights=self._state.base, dtype=dtype)
            return adapters.export_merged(model, self.tokenizer, self._active_records(None), path)

    def import_adapter(self, model: nn.Module, path: str | os.PathLike) -> EditRecord:
        """Apply a PEFT LoRA adapter folder (LoRA on MLP matrices) as one new edit, method "import":
        journaled, diffable, exactly revertible. Its requests are the original ones when factedit exported
        it (factedit.json), else one placeholder ("Imported PEFT LoRA adapter" -> the folder's name).
        Refused, with nothing changed, for another base model, modules that are not MLP matrices, other
        peft types, LoRA variants and extras (DoRA, bias, modules_to_save), and pickled weights."""
        with self._lock:
            self.attach(model)
            adapter = adapters.read_adapter(model, path, model_id=self._model_id, fingerprint=self._fingerprint)
            return self._edit(model, list(adapter.requests), lambda *_: adapter.delta, adapters.IMPORT_METHOD,
                              adapter.config)

    def _edit(
        self,
        model: nn.Module,
        requests: list[EditRequest],
        compute: Callable[[nn.Module, list[TokenizedRequest]], Delta],
        method: str,
        config: Mapping[str, Any],
        stream: StreamState | None = None,
        measured: Measured | None = None,
    ) -> EditRecord:
        """Steps 1-7 of an edit (design.md): tokenize, score, compute, apply, score, record, journal.
        A lifelong method's new state (`stream.after`) is kept once the edit is journaled. `measured`: a
        preview's scores and guard reading, taken instead of measuring again while still valid."""
        start = time.perf_counter()
        with self._lock:
            context = max_context(model.config)  # validate first: a refused request replays nothing
            tokenized = [tokenize_request(r, self.tokenizer, context) for r in requests]
            self.attach(model)
            timings: dict[str, float] = {}
            reuse = reusable(measured, model, self._fingerprint, self._state.active, self.guard, self.score)
            t = time.perf_counter()
            pre = reuse.pre if reuse else score_requests(model, self.tokenizer, tokenized) if self.score else {}
            timings["score_ms"] = ms_since(t)

            t = time.perf_counter()
            delta = compute(model, tokenized).detached_cpu()
            timings["compute_ms"] = ms_since(t)

            edit_id = new_edit_id()
            first_touched = [n for n in delta.names() if n not in self._state.base]
            t = time.perf_counter()
            self._state.apply(model, edit_id, delta)  # validates; refuses before writing anything
            timings["apply_ms"] = ms_since(t)
            try:
                what = f"this {method} edit of {len(requests)} fact(s)"
                drift = self._safeguards.check_drift(model, self.tokenizer, self._state, self.guard, what, timings,
                                                     reuse.drift if reuse else None, facts=len(requests))
                held = self._safeguards.protect(model, self.tokenizer, edit_id, delta, tokenized,
                                                self._keys_fn(method), reuse.keys if reuse else None)
                state = stream.after if stream is not None else None
                record = self._measure_and_record(model, edit_id, tokenized, pre, reuse.post if reuse else None,
                                                  delta, method, config, timings, start, first_touched, drift, state,
                                                  held)
            except BaseException:
                self._state.revert(model, edit_id)  # guard, scoring or journal failed: change nothing
                self._safeguards.release(edit_id)
                raise
            self._records[edit_id] = record
            if record.state is not None:
                self._streams[method] = dict(record.state)
            return record

    def _measure_and_record(
        self, model, edit_id, tokenized, pre, post, delta, method, config, timings, start, first_touched, drift, state,
        held,
    ) -> EditRecord:
        """Steps 5-7: score after the edit (unless `post` is given), build the record, journal it."""
        t = time.perf_counter()
        if post is None:
            old = [r["old_answer"]["id"] for r in pre["requests"]] if self.score else []
            post = score_requests(model, self.tokenizer, tokenized, old_answers=old) if self.score else {}
        timings["score_ms"] += ms_since(t)
        timings["edit_ms"] = ms_since(start)  # the journal write is timed apart, as journal_ms
        record = EditRecord(
            id=edit_id, method=method, config=dict(config), requests=tuple(r.request for r in tokenized),
            pre=pre, post=post, timings=timings, model_id=self._model_id, model_fingerprint=self._fingerprint,
            factedit_version=__version__, delta=delta, drift=drift, state=state, held_keys=held,
        )
        if self._journal is not None:
            t = time.perf_counter()
            base_hashes = {n: tensor_sha256(self._state.base[n]) for n in first_touched}
            params = dict(model.named_parameters())
            after = {n: tensor_sha256(params[n]) for n in delta.names()}
            self._journal.append(record, base_hashes, self._base_sha256, after)
            timings["journal_ms"] = ms_since(t)
        return record

    def revert(self, model: nn.Module, edit_id: str) -> EditRecord:
        """Undo one active edit exactly; the other edits stay. Returns the updated record."""
        with self._lock:
            self.attach(model)
            record = self._records.get(edit_id)
            if record is None:
                raise EditNotFoundError(f"no edit with id {edit_id!r}; known: {', '.join(self._records) or 'none'}")
            if record.status != "active":
                raise EditNotFoundError(f"edit {edit_id} is already reverted")
            updated = record.with_status("reverted")
            without = self._state.weights_without(model, edit_id)  # base + the other active edits, in order
            if self._journal is not None:  # first: a failed write leaves the model as it was
                self._journal.set_status(updated, {n: tensor_sha256(v) for n, v in without.items()})
            self._state.revert(model, edit_id, without)
            self._mark_reverted([updated])
            return updated

    def revert_all(self, model: nn.Module) -> list[EditRecord]:
        """Revert every active edit, newest first. Returns the updated records.

        What is left is the base model, so the touched parameters are set back to their base values
        once and the journal marks every edit in one transaction: O(edits), where reverting them one
        by one replays the remaining edits each time."""
        with self._lock:
            self.attach(model)
            updated = [r.with_status("reverted") for r in reversed(self._records.values()) if r.status == "active"]
            if not updated:
                return []
            if self._journal is not None:
                base = self._state.base_values({n for r in updated for n in self._state.active[r.id].names()})
                self._journal.set_statuses(updated, {n: tensor_sha256(v) for n, v in base.items()})
            self._state.restore_base(model)
            self._mark_reverted(updated)
            return updated

    def _mark_reverted(self, updated: Sequence[EditRecord]) -> None:
        for record in updated:
            self._safeguards.release(record.id)
            # With a journal the reverted delta lives on disk; `diff`/`export_edit` read it back.
            self._records[record.id] = record.without_delta() if self._journal is not None else record

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

    def record(self, edit_id: str) -> EditRecord:
        """One edit's record, its delta included (read back from the journal for a reverted edit)."""
        with self._lock:
            return self._record_with_delta(edit_id)

    def delta(self, edit_id: str) -> Delta:
        return self._record_with_delta(edit_id).delta

    def warm_guard(self, model: nn.Module, names: Sequence[str] | None = None) -> None:
        """Prepare the drift guard for edits of `model` ahead of the first one: the base model's
        perplexity of every group of reference texts and their input to the lowest block that `names`
        (default: this method's parameters) or earlier edits touch, computed once per model (seconds
        for the default model on a CPU) and cached on disk, so that no edit pays for it. Nothing to do
        with the guard off."""
        if self.guard is None:
            return
        self.attach(model)
        with self._lock:
            names = self._impl.param_names(model) if names is None else names
            self._safeguards.warm_guard(model, self.tokenizer, self._state, self.guard, names)

    def weights_are_base(self, model: nn.Module) -> bool:
        """Whether every parameter an edit has touched equals its base value bit for bit
        (`torch.equal`); true after every edit is reverted."""
        with self._lock:
            params = dict(model.named_parameters())
            return all(torch.equal(params[n].detach().cpu(), base) for n, base in self._state.base.items())

    def attach(self, model: nn.Module) -> None:
        """Bind to `model`; with a journal, check it is the journal's base model and replay the
        journal's active edits onto it. Called by the first edit/revert; idempotent.

        A model belongs to one Editor at a time (its `factedit_editor` attribute names it): another
        open Editor bound to it is refused, since two Editors would each restore their own idea of the
        base weights. `close()` releases the model. A replay that fails (a corrupt delta) leaves the
        model as it was and the Editor unbound.
        """
        with self._lock:
            if self._closed:
                raise ConfigError("this Editor is closed; open a new one (its journal replays the edits)")
            bound = self._model_ref() if self._model_ref is not None else None
            if bound is model:
                return
            if is_view(model):
                raise ConfigError("a read view of a model (views.py) is for reading; edit the model itself")
            if self._model_ref is not None:
                raise ConfigError("this Editor is bound to another model; make one Editor per model")
            owner = getattr(model, OWNER_ATTRIBUTE, None)
            owner = owner() if owner is not None else None
            if owner is not None and owner is not self:
                raise ConfigError(
                    f"this model is already edited by another Editor (method {owner.method!r}, journal "
                    f"{owner.journal_path}); keep using that one (set_method switches its method) or "
                    "close() it first"
                )
            model_id, fingerprint = model_id_of(model), model_fingerprint(model)
            journal = self._journal
            rotation = journal.guard_rotation() if journal else None  # read first: a corrupt one replays nothing
            replayed = replay(journal, model, model_id, fingerprint, self.attach_timings)  # replay_journal.py
            self._base_sha256, self.replay_differs = replayed.base_sha256, replayed.differs
            self._state, self._streams = replayed.state, replayed.streams
            self._records = {r.id: r for r in replayed.records}
            self._model_ref, self._model_id, self._fingerprint = weakref.ref(model), model_id, fingerprint
            self._safeguards = Safeguards(model_id, fingerprint, rotation,
                                          journal.set_guard_rotation if journal else None)
            setattr(model, OWNER_ATTRIBUTE, weakref.ref(self))

    def base_weights(self) -> BaseWeights:
        """The weights this Editor found when it bound its model (owner.py): what a method derives once
        from the model, such as its context prefixes, is derived from these, so a reopened journal
        derives what the process that wrote it did."""
        return BaseWeights(self._fingerprint, dict(self._state.base))

    def close(self) -> None:
        """Close the journal (releases its lock) and release the model to other Editors."""
        with self._lock:
            if self._journal is not None:
                self._journal.close()
            model = self._model_ref() if self._model_ref is not None else None
            owner = getattr(model, OWNER_ATTRIBUTE, None) if model is not None else None
            if owner is not None and owner() is self:
                delattr(model, OWNER_ATTRIBUTE)
            # Unbound for good: a closed Editor must not go on writing a model another Editor may bind.
            self._model_ref, self._closed = None, True

    def __enter__(self) -> Editor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------------
    def _active_records(self, ids: Sequence[str] | None) -> list[EditRecord]:
        """The active edits named by `ids` (all when None), in the order they were applied."""
        active = [r for r in self._records.values() if r.status == "active"]
        if ids is None:
            return active
        if isinstance(ids, str):
            raise ConfigError(f"ids must be a list of edit ids (write [{ids!r}] for one)")
        for edit_id in ids:
            record = self._records.get(edit_id)
            if record is None:
                raise EditNotFoundError(f"no edit with id {edit_id!r}")
            if record.status != "active":
                raise EditNotFoundError(f"edit {edit_id} is reverted; only active edits export")
        return [r for r in active if r.id in set(ids)]

    def compact_journal(self, older_than_s: float = 0.0) -> dict[str, Any]:
        """Drop the journal's deltas of edits reverted at least `older_than_s` seconds ago, keeping their
        records (`Journal.compact`); the active edits and the replay are untouched."""
        with self._lock:
            if self._journal is None:
                raise ConfigError("this Editor has no journal to compact")
            report = self._journal.compact(older_than_s)
            if self._model_ref is not None:  # the records held in memory follow the journal's
                self._records = {r.id: r if r.status == "reverted" else self._records[r.id]
                                 for r in self._journal.records(deltas=False)}
            return report

    def _record_with_delta(self, edit_id: str) -> EditRecord:
        record = self._records.get(edit_id)
        if record is None and self._journal is not None and self._model_ref is None:
            record = self._journal.record(edit_id)
        if record is None:
            raise EditNotFoundError(f"no edit with id {edit_id!r}")
        if record.delta is None:  # a reverted edit whose delta stays in the journal
            record = self._journal.record(edit_id)
        return record

