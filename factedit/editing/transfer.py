"""The Editor's artifacts: one edit as a self-describing file (export_edit / import_edit), the active edits
as a PEFT or GGUF LoRA adapter, the edited model as a HuggingFace folder or a GGUF file, and a PEFT LoRA
adapter imported as one edit. A part of `Editor` (editor.py), split off by job; imports go through the
Editor's one edit path (recorded, journaled, guarded, exactly revertible)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..artifacts import adapters, gguf_export
from ..artifacts.exported import EXPORT_FORMAT, read_exported
from ..core.errors import ConfigError, EditNotFoundError, ModelMismatchError
from ..core.record import EditRecord
from ..model.weights import WeightState

__all__ = ["EditorTransfer"]


class EditorTransfer:
    """Exports and imports of `Editor` (which defines the state used here)."""

    _lock: threading.RLock
    _state: WeightState
    _records: dict[str, EditRecord]
    _fingerprint: str
    _model_id: str

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
    ) -> adapters.AdapterExport | gguf_export.GGUFAdapterExport:
        """Write active edits (`ids`, default all) as one PEFT LoRA adapter folder that `peft` and vLLM
        load, with a model card listing them. Dense edits (ft, ft_l) go through a truncated SVD of
        `rank` (errors in the result) or, with `exact=True`, are refused. Details: adapters.py.
        `format="gguf"`: one GGUF LoRA adapter file for llama.cpp / Ollama instead, checked against the
        base GGUF (`base_gguf`, default the default model's own; gguf_export.py).
        Needs the edited model: the one this Editor is bound to, or `model`."""
        if format not in ("peft", "gguf"):
            raise ConfigError(f"adapter format must be 'peft' or 'gguf', got {format!r}")
        with self._lock:
            if model is not None:
                self.attach(model)
            bound = self._model_ref() if self._model_ref is not None else None
            if bound is None:
                raise ConfigError("export_adapter needs the edited model: pass model= or edit/attach first")
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
